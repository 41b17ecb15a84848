"""Vision path and early fusion: parity with transformers' Llama4ForConditionalGeneration, pixel shuffle order,
checkpoint round trips with vision, and clear errors for image input the model cannot take."""
import math

import pytest
import torch
from PIL import Image

import herd
from herd.checkpoint import save_hf
from herd.config import ModelConfig, VisionConfig, preset
from herd.images import ImageTokenIds, prepare_images
from herd.model import Transformer
from herd.vision import pixel_shuffle, vision_rope
from conftest import randomize_

# Token ids of the tiny models below (vocab 128): image framing tokens, <|patch|> = 7.
IDS = ImageTokenIds(image_start=4, image_end=5, tile_x=8, tile_y=9, image=6, patch=7)
# 28-pixel tiles of 7-pixel patches: 16 patches, 4 tokens per tile after the pixel shuffle.
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=28,
                   patch_size=7, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48)


def test_pixel_shuffle_channel_order():
    """Spec 4.4 / 9(e) on an index-valued grid: output token r'*g + c' is the concatenation of
    X[2r'][2c'], X[2r'][2c'+1], X[2r'+1][2c'], X[2r'+1][2c'+1]."""
    side, C = 6, 3
    grid = torch.arange(side * side * C, dtype=torch.float32).view(side, side, C)   # X[r][c] = its own index
    out = pixel_shuffle(grid.view(1, side * side, C), 0.5)
    g = side // 2
    assert out.shape == (1, g * g, 4 * C)
    for r in range(g):
        for c in range(g):
            want = torch.cat([grid[2 * r, 2 * c], grid[2 * r, 2 * c + 1],
                              grid[2 * r + 1, 2 * c], grid[2 * r + 1, 2 * c + 1]])
            assert torch.equal(out[0, r * g + c], want), (r, c)


def test_vision_rope_layout():
    """Spec 4.3: pairs 0..Dh/4-1 turn by (x+1) f_m, pairs Dh/4.. by (y+1) f_m, class token (last row) unrotated."""
    cfg = VisionConfig(image_size=28, patch_size=7, dim=32, n_heads=2, ffn_dim=128, projector_dim=48, n_layers=1)
    rope = vision_rope(cfg)                                  # (17, 8)
    assert rope.shape == (17, 8)
    assert torch.allclose(rope[-1], torch.ones(8, dtype=rope.dtype))
    f = [10000.0 ** (-2 * m / 8) for m in range(4)]
    n = 6                                                    # column 2, row 1
    want = [(2 + 1) * fm for fm in f] + [(1 + 1) * fm for fm in f]
    assert torch.allclose(rope[n].angle(), torch.tensor(want), atol=1e-6)


def tiny_hf_model(tmp_path, transformers, **text_changes):
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, attention_chunk_size=8,
                interleave_moe_layer_step=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text.update(text_changes)
    cfg = transformers.Llama4Config(text_config=text, vision_config=TINY_VISION, image_token_index=IDS.patch,
                                    boi_token_index=IDS.image_start, eoi_token_index=IDS.image_end,
                                    attn_implementation="eager")
    hf = randomize_(transformers.Llama4ForConditionalGeneration(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, herd.load(tmp_path / "hf")


def two_images():
    """A 1-tile image and a 2x3-tile one (6 tiles + the global tile), with real content."""
    g = torch.Generator().manual_seed(1)
    small = Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy())
    wide = Image.fromarray(torch.randint(0, 256, (50, 80, 3), generator=g, dtype=torch.uint8).numpy())
    return small, wide


def test_hf_parity_two_images_in_one_sequence(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf, model = tiny_hf_model(tmp_path, transformers)
    assert model.config.vision.tokens_per_tile == 4
    pixels, blocks = prepare_images(two_images(), model.config.vision, IDS)
    assert pixels.shape == (1 + 7, 3, 28, 28) and [b.count(IDS.patch) for b in blocks] == [4, 28]
    text = lambda n, s: torch.randint(10, 128, (n,), generator=torch.Generator().manual_seed(s)).tolist()
    ids = torch.tensor([[1] + text(5, 0) + blocks[0] + text(6, 1) + blocks[1] + text(7, 2)])   # (1, 62)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        out = model(ids, images=pixels)
        diff = (out - ref).abs().max().item()
        assert diff <= 1e-4, f"max abs diff {diff}"
        assert ref.std() > 0.5
        # the images really reach the trunk, in order: without them, or swapped, the logits after them move
        after = slice(len(blocks[0]) + 6, None)
        assert (model(ids)[:, after] - ref[:, after]).abs().max() > 0.1
        swapped = torch.cat([pixels[1:], pixels[:1]])       # same tile count, wrong order
        assert (model(ids, images=swapped)[:, after] - ref[:, after]).abs().max() > 0.1


def test_hf_parity_batch_rows_consume_images_in_order(tmp_path):
    """Two rows, one image each: the tiles are stacked row 0 first, exactly as transformers' masked_scatter."""
    transformers = pytest.importorskip("transformers")
    hf, model = tiny_hf_model(tmp_path, transformers, interleave_moe_layer_step=1, use_qk_norm=False)
    small, wide = two_images()
    pixels, blocks = prepare_images([wide, small], model.config.vision, IDS)
    pad = len(blocks[0]) - len(blocks[1])
    ids = torch.tensor([[1, 20, 21] + blocks[0] + [22],
                        [1, 23] + [24] * pad + blocks[1] + [25, 26]])
    with torch.no_grad():
        diff = (model(ids, images=pixels) - hf(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff}"


def vision_debug_model(seed=3):
    cfg = preset("debug")
    cfg.vision = VisionConfig(image_size=28, patch_size=7, dim=32, n_layers=2, n_heads=2, ffn_dim=128,
                              projector_dim=48, max_tiles=6)
    cfg.image_token_id = IDS.patch
    cfg.__post_init__()
    return Transformer(cfg).init_weights(std=0.2, seed=seed)


def test_save_loads_in_transformers_and_herd(tmp_path):
    """A herd model with vision saves as Llama4ForConditionalGeneration that transformers and herd load with the
    same logits; the round trip through herd is exact."""
    transformers = pytest.importorskip("transformers")
    model = vision_debug_model()
    save_hf(model, tmp_path / "ck")
    pixels, blocks = prepare_images(two_images(), model.config.vision, IDS)
    ids = torch.tensor([[1, 40] + blocks[1] + [41, 42] + blocks[0] + [43]])
    with torch.no_grad():
        want = model(ids, images=pixels)
        back = herd.load(tmp_path / "ck")
        torch.testing.assert_close(back(ids, images=pixels), want, rtol=0, atol=0)
        hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "ck",
                                                                         attn_implementation="eager").eval()
        assert (hf(input_ids=ids, pixel_values=pixels).logits - want).abs().max() <= 1e-4
    assert back.config.vision == model.config.vision


def test_bf16_model_takes_float32_pixels(tmp_path):
    model = vision_debug_model()
    save_hf(model, tmp_path / "ck")
    bf16 = herd.load(tmp_path / "ck", dtype=torch.bfloat16)
    pixels, blocks = prepare_images(two_images()[:1], model.config.vision, IDS)
    ids = torch.tensor([[1] + blocks[0] + [30]])
    with torch.no_grad():
        a, b = bf16(ids, images=pixels), model(ids, images=pixels)
    assert a.dtype == torch.float32 and (a - b).abs().max() < 0.1 * b.abs().max()


def test_image_input_errors():
    text_only = Transformer(preset("debug")).init_weights(seed=0)
    ids = torch.tensor([[1, 3, 3, 3, 3, 2]])
    with pytest.raises(ValueError, match="text-only"):
        text_only(ids, images=torch.zeros(1, 3, 336, 336))
    model = vision_debug_model()
    one_tile = torch.zeros(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"3 image patch tokens .* 1 image tiles give 4 embeddings"):
        model(torch.tensor([[1, 7, 7, 7, 2]]), images=one_tile)
    with pytest.raises(ValueError, match=r"shape \(n_tiles, 3, 28, 28\)"):
        model(torch.tensor([[1, 7, 7, 7, 7]]), images=torch.zeros(1, 3, 336, 336))
    assert model(torch.tensor([[1, 7, 7, 7, 7]]), images=one_tile).shape == (1, 5, 512)


def test_bad_vision_config():
    with pytest.raises(ValueError, match="multiple of 4"):
        VisionConfig(dim=36, n_heads=6)
    with pytest.raises(ValueError, match="pixel_shuffle_ratio"):
        VisionConfig(image_size=35, patch_size=7)
    assert ModelConfig.from_dict({**vision_debug_model().config.to_dict()}).vision.tokens_per_tile == 4
    assert math.isclose(VisionConfig().tokens_per_tile, 144)


def test_engine_prefill_with_images_equals_forward():
    """Images through the engine (prefill in pieces smaller than an image block) == one full forward; a text-only
    request beside it in the batch is unaffected; greedy continuation == the no-cache reference."""
    from herd.engine import Engine, SamplingParams, generate_reference
    model = vision_debug_model().eval()
    pixels, blocks = prepare_images(two_images(), model.config.vision, IDS)
    prompt = [1, 40] + blocks[1] + [41, 42] + blocks[0] + [43]
    engine = Engine(model, max_batch=2, prefill_chunk=5)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with_images = engine.add(prompt, params, images=pixels)
    text_only = engine.add([1, 50, 51, 52], params)
    while engine.has_work():
        engine.step()
    with torch.no_grad():
        fused = model.embed(torch.tensor([prompt]), pixels)          # (1, T, dim)
        expected = []
        for _ in range(6):       # no-cache greedy: fused prompt rows + plain rows for generated tokens
            ids = torch.tensor([prompt + expected])
            h = torch.cat([fused, model.tok_embeddings(torch.tensor([expected], dtype=torch.long))], dim=1)
            expected.append(int(model(ids, embeddings=h)[0, -1].argmax()))
    assert with_images.output == expected
    assert text_only.output == generate_reference(model, [1, 50, 51, 52], 6)
    with pytest.raises(ValueError, match="patch tokens"):
        engine.add(prompt[:-20], params, images=pixels)
