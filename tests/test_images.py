"""Image preprocessing: equal to transformers' Llama 4 image processor, and clear errors for bad input.

The reference processor imports torchvision. PyPI's torchvision is built against PyPI's CUDA torch, so beside the
CPU torch herd installs its C++ ops cannot load and `import torchvision` fails ('operator torchvision::nms does not
exist'). The parity test therefore runs the reference in a throwaway venv (this interpreter's packages plus the
torchvision release that pairs with this torch) and declares the two op schemas whose registration breaks the
import; resize and pad, all the Llama 4 processor uses, are plain torch ops and run unchanged.
"""
import importlib.util
import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from herd.checkpoint import to_hf_preprocessor_config
from herd.config import ModelConfig, VisionConfig
from herd.images import (ImageError, ImageTokenIds, best_fit, decode_image, image_tokens, normalize,
                         prepare_images, tile_image)

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = textwrap.dedent('''
    import importlib.util, json, sys
    from pathlib import Path
    import torch
    so = next(Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]).glob("_C*.so"))
    try:
        torch.ops.load_library(str(so))
    except (OSError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")   # kept alive for the process
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    from PIL import Image
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
    from transformers.models.llama4.processing_llama4 import Llama4Processor
    args = json.loads(sys.argv[1])
    out = {}
    for name, (folder, paths) in args["runs"].items():
        proc = Llama4ImageProcessor.from_pretrained(folder)
        # one pass: resized, padded, tiled uint8 (+ aspect ratios); then the processor's own bf16 normalization,
        # the elementwise step it applies to exactly these tiles
        raw = proc([Image.open(p) for p in paths], return_tensors="pt", do_rescale=False, do_normalize=False)
        norm = proc.rescale_and_normalize(raw["pixel_values"], True, proc.rescale_factor, True, proc.image_mean,
                                          proc.image_std)
        aspects = raw["aspect_ratios"].tolist()
        n = (proc.size.height // 14) ** 2 // 4
        out[name] = {"raw": raw["pixel_values"], "norm": norm, "aspects": aspects,
                     "tokens": [Llama4Processor._prompt_split_image(None, a, n) for a in aspects]}
    torch.save(out, args["out"])
''')


def torchvision_spec() -> str:
    """The torchvision release built for this torch: 0.(N+15) pairs with 2.N since torch 2.0 / torchvision 0.15."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return f"torchvision==0.{minor + 15}.*"


@pytest.fixture(scope="module")
def reference_python(tmp_path_factory):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is not None:
        return sys.executable
    venv = tmp_path_factory.mktemp("reference") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--disable-pip-version-check", torchvision_spec()], capture_output=True, text=True, timeout=600)
    if r.returncode:
        pytest.skip(f"no {torchvision_spec()} for the reference processor: {r.stderr.strip()[-300:]}")
    return str(py)


def sample_images(folder: Path) -> list[Path]:
    """Sizes and aspect ratios that exercise every branch: upscaled small images, exact tiles, tall/wide grids,
    a 16-tile canvas, two float-rounding cases (155x248 resizes to 209 rows, not 210; 1380x1035 divides by a
    canvas side in float32), transparency, palette and grayscale modes."""
    rs = np.random.RandomState(0)
    specs = [((100, 80), "RGB"), ((500, 700), "RGB"), ((336, 336), "RGB"), ((1380, 1035), "RGB"),
             ((37, 901), "RGB"), ((1100, 1100), "RGB"), ((155, 248), "RGB"), ((700, 500), "RGBA"),
             ((400, 300), "P"), ((90, 400), "L")]
    paths = []
    for i, ((h, w), mode) in enumerate(specs):
        x = np.arange(w, dtype=np.uint32)[None, :] * 255 // w
        y = np.arange(h, dtype=np.uint32)[:, None] * 255 // h
        smooth = np.stack(np.broadcast_arrays(x, y, (x + 3 * y) % 256), -1)
        arr = (smooth + rs.randint(0, 40, (h, w, 3), dtype=np.uint32)).astype(np.uint8)   # gradients + noise
        im = Image.fromarray(arr)
        if mode == "RGBA":
            im.putalpha(Image.fromarray(np.broadcast_to(x, (h, w)).astype(np.uint8)))   # transparent on the left
        elif mode != "RGB":
            im = im.convert(mode)
        paths.append(folder / f"img{i}_{h}x{w}_{mode}.png")
        im.save(paths[-1], compress_level=1)
    return paths


def write_preprocessor(folder: Path, vision: VisionConfig) -> str:
    folder.mkdir()
    cfg = ModelConfig(vision=vision)
    (folder / "preprocessor_config.json").write_text(json.dumps(to_hf_preprocessor_config(cfg)))
    return str(folder)


LLAMA4_NAMES = {"<|image_start|>": "image_start", "<|image_end|>": "image_end", "<|tile_x_separator|>": "tile_x",
                "<|tile_y_separator|>": "tile_y", "<|image|>": "image", "<|patch|>": "patch"}


def hf_token_ids(text: str) -> list[int]:
    ids = ImageTokenIds()
    names = text.replace("|>", "|>\n").split()
    return [getattr(ids, LLAMA4_NAMES[n]) for n in names]


def test_matches_transformers_image_processor(tmp_path, reference_python):
    paths = sample_images(tmp_path)
    full, four = VisionConfig(), VisionConfig(max_tiles=4)
    runs = {"max16": (write_preprocessor(tmp_path / "p16", full), [str(p) for p in paths]),
            "max4": (write_preprocessor(tmp_path / "p4", four), [str(paths[1]), str(paths[3])])}
    out = tmp_path / "reference.pt"
    r = subprocess.run([reference_python, "-c", REFERENCE, json.dumps({"runs": runs, "out": str(out)})],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(out)
    for name, vision in (("max16", full), ("max4", four)):
        files, got = runs[name][1], ref[name]
        assert got["raw"].dtype == torch.uint8 and len(got["aspects"]) == len(files)
        start = 0
        for path, want_aspect, want_tokens in zip(files, got["aspects"], got["tokens"]):
            tiles, aspect = tile_image(decode_image(path), vision.image_size, vision.max_tiles)
            assert list(aspect) == want_aspect, path
            assert torch.equal(tiles, got["raw"][start:start + len(tiles)]), path          # bit-exact
            start += len(tiles)
            block = image_tokens(aspect, vision.tokens_per_tile)
            assert block == hf_token_ids(want_tokens), path
            rh, rw = aspect
            tiles_n = rh * rw + (rh * rw > 1)
            assert tiles.shape[0] == tiles_n and block.count(ImageTokenIds().patch) == 144 * tiles_n
        assert start == len(got["raw"])
        # transformers normalizes in bf16, herd in fp32: they may differ by one bf16 rounding step (2^-7 at
        # |x| near 1), never more.
        pixels, blocks = prepare_images(files, vision, max_images=len(files))
        assert got["norm"].shape == pixels.shape and len(blocks) == len(files)
        assert (got["norm"].float() - pixels).abs().max() <= 2 ** -7
    assert {tuple(a) for a in ref["max16"]["aspects"]} >= {(1, 1), (2, 3), (4, 3), (4, 4), (1, 3)}


def test_tiling_by_hand():
    """Spec 4.5 worked examples: canvases, the global tile, never upscaling past one tile side, padding."""
    assert best_fit(500, 700, 336, 16) == (672, 1008)       # 2x3: 672/500 is the smallest upscale
    assert best_fit(100, 80, 336, 16) == (336, 336)         # ties on scale 3.36 go to the smallest canvas
    assert best_fit(3000, 1000, 336, 16) == (2016, 672)      # no upscale possible: mildest downscale
    img = Image.fromarray(np.full((100, 80, 3), 200, np.uint8))
    tiles, aspect = tile_image(img)
    assert aspect == (1, 1) and tiles.shape == (1, 3, 336, 336)
    # resized to 336 x 268 (height limits), then black padding on the right
    assert (tiles[0, :, :, :268] == 200).all() and (tiles[0, :, :, 268:] == 0).all()
    wide = Image.fromarray(np.full((336, 700, 3), 50, np.uint8))
    tiles, aspect = tile_image(wide)
    assert aspect == (1, 3) and tiles.shape == (4, 3, 336, 336)              # 3 tiles + global tile
    assert (tiles[3] == 50).all()                                             # global: squashed, no padding
    assert (tiles[2, :, :, 28:] == 0).all() and (tiles[2, :, :, :28] == 50).all()   # 700 - 672 = 28 columns
    assert normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_token_blocks():
    ids = ImageTokenIds()
    one = image_tokens((1, 1), 144)
    assert len(one) == 147 and one[:2] == [ids.image_start, ids.image] and one[-1] == ids.image_end
    for h, w in ((2, 3), (1, 4), (4, 1)):
        block = image_tokens((h, w), 144)
        assert len(block) == 2 + 144 * (h * w + 1) + h * (w - 1) + h + 1
        assert block.count(ids.tile_x) == h * (w - 1) and block.count(ids.tile_y) == h
        assert block[-146:] == [ids.image] + [ids.patch] * 144 + [ids.image_end]


def png_with_size(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (its pixel data is a 1x1 image's): decoders must refuse it from the header."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def encoded(fmt: str, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_unreadable_truncated_empty_and_zero_size(tmp_path):
    with pytest.raises(ImageError, match="cannot read the file"):
        decode_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png: the file is empty"):
        decode_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="unknown format or corrupt header"):
        decode_image(b"%PDF-1.4 definitely not a picture")
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        data = encoded(fmt)
        with pytest.raises(ImageError, match="truncated"):
            decode_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"zero size \(0x5\)"):
        decode_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(png_with_size(0, 10))
    assert decode_image(encoded("WEBP")).size == (64, 48)


def test_oversized_images_refused_from_the_header():
    # over Pillow's decompression-bomb limit (179M pixels) and over herd's own (50M): both refuse before decoding
    with pytest.raises(ImageError, match="refused"):
        decode_image(png_with_size(20000, 20000))
    with pytest.raises(ImageError, match=r"refused, 8000x8000 is 64M pixels"):
        decode_image(png_with_size(8000, 8000))


def vm_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A real 20000x20000 JPEG (400M pixels, 1.2 GB as RGB) becomes 17 tiles while this process's peak memory
    grows far less than one full-size bitmap: libjpeg decodes it at 1/4 scale."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    path = tmp_path / "huge.jpg"
    subprocess.run([sys.executable, "-c", f"from PIL import Image; Image.new('L', (20000, 20000), 90)"
                    f".save({str(path)!r}, quality=50)"], check=True, timeout=300)
    Path("/proc/self/clear_refs").write_text("5")     # Linux: reset the peak RSS (VmHWM) to the current RSS
    start = vm_kb("VmRSS")
    pixels, blocks = prepare_images([path], VisionConfig())
    growth_mb = (vm_kb("VmHWM") - start) / 1024
    assert pixels.shape[0] == 17 and len(blocks[0]) == 2 + 144 * 17 + 4 * 3 + 4 + 1
    assert abs(pixels.mean().item() - (90 / 255 - 0.5) / 0.5) < 0.02
    assert growth_mb < 600, f"peak RSS grew by {growth_mb:.0f} MB"


def test_image_limit_and_bad_image_in_a_list(tmp_path):
    junk = b"not an image"
    with pytest.raises(ImageError, match="11 images given; at most 10"):
        prepare_images([junk] * 11, VisionConfig())            # refused on the count, before decoding anything
    good = encoded("PNG")
    with pytest.raises(ImageError, match=r"image 2 of 3: .*not a readable image"):
        prepare_images([good, junk, good], VisionConfig())
    pixels, blocks = prepare_images([good, good], VisionConfig(), max_images=2)
    assert pixels.shape == (2, 3, 336, 336) and len(blocks) == 2


def test_transparency_and_exif_orientation():
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 0))       # fully transparent: white after compositing
    assert decode_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6                                        # "rotate 90 degrees clockwise to view"
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)
