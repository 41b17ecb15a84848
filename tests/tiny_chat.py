"""Tiny chat models for engine-side and server tests, written as HF folders so `herd serve FOLDER` loads them like
any checkpoint:

- write_tiny_chat_model: the `debug` preset (Llama 4 shaped, vocab 512) with random weights, a byte-level BPE
  tokenizer trained here on a few sentences, and a ChatML template that, like the default model's, knows nothing of
  tools.
- write_tiny_vision_model: the `debug` trunk with a tiny vision encoder and Llama 4's own tokenizer format (256 byte
  tokens + the 2,048 specials, image framing tokens included), so chats are in Llama 4's native layout."""
import base64
import json
from pathlib import Path

from herd.checkpoint import save_hf
from herd.config import VisionConfig, preset
from herd.model import Transformer
from herd.tokenizer import llama4_special_tokens

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]     # ids 0, 1, 2: 2 is the debug preset's EOS
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the weather like in Oslo today? It is cold and sunny.",
    "Llamas live in herds in the mountains of South America.",
    '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
    '{"id": 12, "tags": ["a", "b"], "ok": true, "value": null, "score": -3.5}',
    "You are a helpful assistant. Answer the question in one short sentence.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: [ ] { } ( ) : , ; \" ' \\ / _ - +",
    "Servers answer requests; engines decode tokens in batches, and clients stream the replies.",
    "Paris is the capital of France, Berlin of Germany, Rome of Italy and Madrid of Spain.",
    "Structured output must parse: every object closes, every string ends, every list is finished.",
    "Temperature, top_p, seed, stop, max_tokens, logprobs, tools and tool_choice are request fields.",
]


def write_tiny_chat_model(folder, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= 512 and tok.token_to_id("<|im_end|>") == 2
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "add_bos_token": False}))
    # std 0.3: peaked logits, so greedy answers do not hinge on float rounding between batch shapes
    save_hf(Transformer(preset("debug")).init_weights(std=0.3, seed=seed), folder)
    return folder


def write_byte_tokenizer_model(folder) -> Path:
    """Llama 4's tokenizer.model format (tiktoken 'base64-token rank' lines) over the 256 single bytes; with the
    2,048 specials herd adds, a vocabulary of 2,304 in Llama 4's chat layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n"
                                                    for b in range(256)))
    return folder


def write_tiny_llama4(folder, seed: int = 0) -> Path:
    """The `debug` trunk (random weights) with write_byte_tokenizer_model's tokenizer and its special ids."""
    folder = write_byte_tokenizer_model(folder)
    cfg = preset("debug")
    cfg.vocab_size = 256 + 2048
    cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id = 256, [257, 263, 264], 274
    cfg.__post_init__()
    save_hf(Transformer(cfg).init_weights(seed=seed), folder)
    return folder


def write_tiny_vision_model(folder, seed: int = 0) -> Path:
    folder = write_byte_tokenizer_model(folder)
    special = {name: 256 + i for i, name in enumerate(llama4_special_tokens())}
    cfg = preset("debug")
    cfg.vocab_size = 256 + len(special)
    cfg.bos_token_id, cfg.pad_token_id = special["<|begin_of_text|>"], special["<|finetune_right_pad|>"]
    cfg.eos_token_ids = [special[t] for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]
    # 28-pixel tiles of 7-pixel patches: 4 <|patch|> tokens per tile after the pixel shuffle
    cfg.vision = VisionConfig(image_size=28, patch_size=7, dim=32, n_layers=2, n_heads=2, ffn_dim=128,
                              projector_dim=48, max_tiles=6)
    cfg.image_token_id = special["<|patch|>"]
    cfg.__post_init__()
    save_hf(Transformer(cfg).init_weights(std=0.3, seed=seed), folder)
    return folder
