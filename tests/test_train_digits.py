"""scripts/train_digits.py end to end in seconds: it trains, and its checkpoint runs in herd and in transformers."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import herd
from herd.chat import format_llama4
from herd.images import ImageTokenIds, prepare_images
from herd.tokenizer import tokenizer_from_folder

ROOT = Path(__file__).resolve().parents[1]


def run_script(argv):
    """scripts/train_digits.py's main(argv) in this process (saves a second torch start-up)."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "scripts" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_quick_run_checkpoint_loads_in_herd_and_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    returned = run_script(["--quick", "--out", str(out)])
    assert "held-out accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    assert metrics["last_loss"] < metrics["first_loss"] - 0.5, metrics     # it learned something in seconds

    model = herd.load(out)
    tok = tokenizer_from_folder(out)
    assert tok.is_llama4 and model.config.vision.max_tiles == 1
    sid = tok.token_id
    ids = ImageTokenIds(image_start=sid("<|image_start|>"), image_end=sid("<|image_end|>"), image=sid("<|image|>"),
                        tile_x=sid("<|tile_x_separator|>"), tile_y=sid("<|tile_y_separator|>"), patch=sid("<|patch|>"))
    assert ids.patch == model.config.image_token_id
    # a held-out digit PNG through the whole pipeline, as `herd run --image` will send it
    png = sorted((out / "examples").glob("*.png"))[0]
    pixels, blocks = prepare_images([png], model.config.vision, ids)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]}]
    prompt = torch.tensor([format_llama4(tok, messages, image_blocks=blocks)])
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ours = model(prompt, images=pixels)
        theirs = hf(input_ids=prompt, pixel_values=pixels).logits
    assert (ours - theirs).abs().max() <= 1e-4
    # transformers reads the tokenizer files too, with the same ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Which digit is this? seven"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.convert_tokens_to_ids("<|patch|>") == ids.patch
