"""Images -> the tiles and prompt tokens a Llama 4 model takes (spec sections 4.5 and 4.6). CPU only, no model code.

- decode_image: a file, bytes or PIL image -> RGB PIL image, with clear errors for unreadable, truncated, empty and
  oversized input. Huge JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`), so a
  20000x20000 photo never becomes a 1.2 GB bitmap; other formats above MAX_DECODE_PIXELS are refused.
- tile_image: best-fit canvas of up to max_tiles tiles, aspect-preserving resize (never upscaled past one tile
  side), black padding right and bottom, row-major tiles, plus a global tile (whole image squashed to one tile)
  when there is more than one tile. Resizing is torch's antialiased bilinear on uint8, the kernel transformers'
  Llama 4 image processor uses through torchvision, so the tiles match it exactly.
- normalize: uint8 -> (x / 255 - 0.5) / 0.5, float32 in [-1, 1].
- image_tokens: the prompt block of one image; prepare_images: a list of images -> (pixel_values, blocks).
"""
from __future__ import annotations

import io
import math
import platform
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, JpegImagePlugin

MAX_IMAGES = 10                  # images per request; Meta tested Llama 4 with up to 5
MAX_DECODE_PIXELS = 50_000_000   # largest bitmap decoded (150 MB as RGB); the biggest canvas is 16 * 336^2 = 1.8M


class ImageError(ValueError):
    """An image herd cannot use, naming the image and the reason."""


IMAGE_TOKEN_TEXT = {   # ImageTokenIds field -> the special token's text
    "image_start": "<|image_start|>", "image_end": "<|image_end|>", "tile_x": "<|tile_x_separator|>",
    "tile_y": "<|tile_y_separator|>", "image": "<|image|>", "patch": "<|patch|>"}


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of the tokens that frame an image in the prompt (Llama 4 tokenizer defaults, spec 5.1)."""
    image_start: int = 200080    # <|image_start|>
    image_end: int = 200081      # <|image_end|>
    tile_x: int = 200084         # <|tile_x_separator|>: between tiles of a row
    tile_y: int = 200085         # <|tile_y_separator|>: after each row of tiles
    image: int = 200090          # <|image|>: before the global tile
    patch: int = 200092          # <|patch|>: one per vision embedding (ModelConfig.image_token_id)

    @classmethod
    def from_tokenizer(cls, tok) -> "ImageTokenIds":
        """The ids in `tok`'s own vocabulary (any object with token_id(text) -> id | None); ImageError names the
        framing tokens it lacks (only Llama 4's tokenizer has them all)."""
        ids = {field: tok.token_id(text) for field, text in IMAGE_TOKEN_TEXT.items()}
        missing = [IMAGE_TOKEN_TEXT[f] for f, i in ids.items() if i is None]
        if missing:
            raise ImageError(f"the tokenizer has no {', '.join(missing)}: image input needs Llama 4's tokenizer")
        return cls(**ids)


# ---- decoding -------------------------------------------------------------------------------------------------------
def decode_image(src, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """A path, bytes or PIL image -> a fully loaded RGB PIL image, upright per its EXIF orientation.
    Raises ImageError (never a half-decoded image)."""
    if isinstance(src, Image.Image):
        return _decode("image", src, max_pixels)
    if isinstance(src, (str, Path)):
        try:
            with open(src, "rb") as f:       # streamed: Pillow reads the header first and may stop there
                if f.seek(0, io.SEEK_END) == 0:
                    raise ImageError(f"{src}: the file is empty (0 bytes)")
                f.seek(0)
                return _decode(str(src), f, max_pixels)
        except OSError as e:
            raise ImageError(f"{src}: cannot read the file ({e.strerror or e})") from None
    if not src:
        raise ImageError("image: empty (0 bytes)")
    return _decode(f"image ({len(src)} bytes)", io.BytesIO(src), max_pixels)


def _decode(name: str, src, max_pixels: int) -> Image.Image:
    try:
        im = src if isinstance(src, Image.Image) else _open(src)
        w, h = im.size
        if w == 0 or h == 0:
            raise ImageError(f"{name}: the image has zero size ({w}x{h})")
        if w * h > max_pixels:
            im = _reduce_at_decode(im, name, max_pixels)
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused, too many pixels to decode safely ({e})") from None
    except Exception as e:   # Pillow raises OSError, SyntaxError, ValueError, EOFError ... on corrupt data
        if "truncated" in str(e).lower():
            reason = "the file is truncated"
        elif isinstance(e, (Image.UnidentifiedImageError, SyntaxError)):   # SyntaxError: a plugin's bad header
            reason = "unknown format or corrupt header"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise ImageError(f"{name}: not a readable image ({reason})") from None


def _open(fp) -> Image.Image:
    """Read the header only. JPEGs bypass Image.open, whose decompression-bomb check would refuse a huge photo
    before _reduce_at_decode could ask for a scaled-down decode; every size is checked by the caller instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our limit is lower than Pillow's
        if fp.read(3) == b"\xff\xd8\xff":
            fp.seek(0)
            return JpegImagePlugin.JpegImageFile(fp)
        fp.seek(0)
        return Image.open(fp)


def _reduce_at_decode(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    w, h = im.size
    if im.format == "JPEG":
        # smallest DCT scale 1/s (s in 2, 4, 8) that brings the bitmap under the limit; decoding costs the small size
        s = next((s for s in (2, 4, 8) if w * h / (s * s) <= max_pixels), 8)
        im.draft(im.mode, (w // s, h // s))
    if im.size[0] * im.size[1] > max_pixels:
        raise ImageError(f"{name}: refused, {w}x{h} is {w * h / 1e6:.0f}M pixels; herd decodes at most "
                         f"{max_pixels / 1e6:.0f}M pixels (JPEGs up to 64x that, decoded at reduced scale). "
                         "Downscale the image first.")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what Meta's and transformers' preprocessing do)."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


# ---- tiling ---------------------------------------------------------------------------------------------------------
def best_fit(h: int, w: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """The canvas (a * tile, b * tile), a * b <= max_tiles, to resize an h x w image into without distortion:
    the smallest upscale if any canvas allows one, else the mildest downscale; ties go to the smallest area."""
    canvases = [(a * tile, b * tile) for a in range(1, max_tiles + 1) for b in range(1, max_tiles // a + 1)]
    scales = {c: min(Fraction(c[0], h), Fraction(c[1], w)) for c in canvases}   # exact: ties must be ties
    up = [s for s in scales.values() if s >= 1]
    chosen = min(up) if up else max(scales.values())
    return min((c for c, s in scales.items() if s == chosen), key=lambda c: c[0] * c[1])


def resized_size(h: int, w: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Largest aspect-preserving (h', w') inside the canvas, except that a side shorter than one tile is only
    enlarged up to one tile side (small images are not blown up to fill a big canvas). Floors the free side."""
    # NOTE: the references' floating point, reproduced to the last pixel: a target side taken from the canvas list
    # (a torch tensor there) is divided in float32, any other in float64. Rounding matters: floor(155 * (336 / 248))
    # is 209 although 155 * 336 / 248 is exactly 210, and the model was trained on what the references compute.
    th = np.float32(canvas_h) if canvas_h < max(h, tile) else max(h, tile)
    tw = np.float32(canvas_w) if canvas_w < max(w, tile) else max(w, tile)
    scale_h, scale_w = th / h, tw / w
    if scale_w < scale_h:
        return max(int(min(math.floor(h * scale_w), th)), 1), int(tw)
    return int(th), max(int(min(math.floor(w * scale_h), tw)), 1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (3, *size), antialiased bilinear (Pillow-style support widening on downscale)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # torchvision resizes uint8 natively where torch has the fast kernel and in float32 (then rounds) elsewhere;
    # do the same so the tiles equal transformers' on every CPU.
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    y = x[None] if native else x[None].float()
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return y if native else y.round_().clamp_(0, 255).to(torch.uint8)


def tile_image(im: Image.Image, tile: int = 336, max_tiles: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB PIL image -> (uint8 tiles (n, 3, tile, tile), (ratio_h, ratio_w)); n = ratio_h * ratio_w, plus one
    global tile after the others when that is more than 1."""
    w, h = im.size
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)   # (3, h, w), a view of the HWC bytes
    ch, cw = best_fit(h, w, tile, max_tiles)
    nh, nw = resized_size(h, w, ch, cw, tile)
    canvas = torch.zeros(3, ch, cw, dtype=torch.uint8)                      # black padding right and bottom
    canvas[:, :nh, :nw] = _resize(x, (nh, nw))
    rh, rw = ch // tile, cw // tile
    tiles = canvas.view(3, rh, tile, rw, tile).permute(1, 3, 0, 2, 4).reshape(rh * rw, 3, tile, tile)  # row-major
    if rh * rw > 1:
        tiles = torch.cat([tiles, _resize(x, (tile, tile))[None]])          # global tile, aspect not kept
    return tiles, (rh, rw)


def normalize(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 (x / 255 - 0.5) / 0.5 (mean = std = 0.5 per channel): black padding becomes -1."""
    return (tiles.float() / 255.0 - 0.5) / 0.5


# ---- prompt tokens --------------------------------------------------------------------------------------------------
def image_tokens(aspect: tuple[int, int], tokens_per_tile: int, ids: ImageTokenIds = ImageTokenIds()) -> list[int]:
    """The prompt block of one image (spec 4.6): <|image_start|>, then for more than one tile each row's tiles
    (tokens_per_tile <|patch|> each, <|tile_x_separator|> between them) ending in <|tile_y_separator|>, then
    <|image|> and the global (or only) tile's patches, then <|image_end|>."""
    rh, rw = aspect
    patches = [ids.patch] * tokens_per_tile
    out = [ids.image_start]
    if rh * rw > 1:
        for _ in range(rh):
            for x in range(rw):
                out += patches + ([ids.tile_x] if x < rw - 1 else [])
            out.append(ids.tile_y)
    return out + [ids.image] + patches + [ids.image_end]


def prepare_images(images, vision, ids: ImageTokenIds = ImageTokenIds(),
                   max_images: int = MAX_IMAGES) -> tuple[torch.Tensor, list[list[int]]]:
    """Images (paths, bytes or PIL images) -> (pixel_values (n_tiles, 3, S, S) float32, one token block per image).
    `vision` is the model's VisionConfig. Tiles are stacked in image order, as the model consumes them; put block i
    where image i appears in the prompt. Every image is decoded before anything is returned."""
    images = list(images)
    if len(images) > max_images:
        raise ImageError(f"{len(images)} images given; at most {max_images} per request")
    tiles, blocks = [], []
    for i, src in enumerate(images):
        try:
            t, aspect = tile_image(decode_image(src), vision.image_size, vision.max_tiles)
        except ImageError as e:
            raise ImageError(f"image {i + 1} of {len(images)}: {e}") from None
        tiles.append(t)
        blocks.append(image_tokens(aspect, vision.tokens_per_tile, ids))
    S = vision.image_size
    pixel_values = normalize(torch.cat(tiles)) if tiles else torch.empty(0, 3, S, S)
    return pixel_values, blocks
