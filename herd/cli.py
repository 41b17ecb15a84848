"""The `herd` command line. Each subcommand parses its flags and calls into the library; no model code here."""
from __future__ import annotations

import argparse
import sys


def cmd_info(args):
    from .config import PRESETS, load_config, preset
    from .sizes import count_params, human, weight_bytes
    from pathlib import Path

    if args.model in PRESETS:
        cfg = preset(args.model)
    else:
        p = Path(args.model)
        cfg = load_config(p / "config.json" if p.is_dir() else p)
    c = count_params(cfg)
    moe = cfg.moe
    n_moe = sum(s.is_moe for s in cfg.layers)
    n_nope = sum(not s.uses_rope for s in cfg.layers)
    print(f"model        {args.model}")
    print(f"layers       {cfg.n_layers} (MoE {n_moe}, dense {cfg.n_layers - n_moe}; NoPE global {n_nope}, "
          f"RoPE {'chunked ' + str(cfg.attn_chunk_size) if cfg.attn_chunk_size else 'full'} {cfg.n_layers - n_nope})")
    print(f"width        dim {cfg.dim}, heads {cfg.n_heads} q / {cfg.n_kv_heads} kv x {cfg.head_dim}, vocab {cfg.vocab_size}")
    if moe:
        print(f"experts      {moe.n_experts} routed (top-{moe.top_k}) + {moe.n_shared_experts} shared, width {moe.expert_dim}")
    print(f"total params {human(c.total)}")
    print(f"active       {human(c.active)} per text token")
    if cfg.vision:
        print(f"vision       {human(c.vision)} (encoder + adapter + projector, once per image tile)")
    for scheme in ("bf16", "fp8", "int4"):
        print(f"weights {scheme:5s}{human(weight_bytes(c, scheme), 'B'):>9s}")


def _load(model_arg, verbose=False):
    """(model path, model, tokenizer) for a CLI model argument; None means the default model."""
    import time
    import herd
    from .textgen import default_model_path
    from .tokenizer import load_tokenizer

    path = default_model_path() if model_arg in (None, "default") else model_arg
    t0 = time.perf_counter()
    model = herd.load(path, progress=True)
    tok = load_tokenizer(path, eos_ids=model.config.eos_token_ids)
    if verbose:
        print(f"[loaded {path} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    return path, model, tok


def _sampling(args, tok, **extra):
    from .chat import stop_token_ids
    from .engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop_token_ids=tuple(stop_token_ids(tok)),
                          **extra)


def _print_stream(chunks) -> str:
    out = []
    for piece in chunks:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out)


def cmd_run(args):
    from pathlib import Path
    from .chat import format_chat
    from .config import PRESETS
    from .engine import Engine
    from .textgen import Timing, stream_completion

    # `herd run PROMPT` and `herd run MODEL [PROMPT]`: the first word is a model when it names one.
    words = list(args.words)
    model_arg = None
    if words and (Path(words[0]).exists() or words[0] == "default"):
        model_arg = words.pop(0)
    elif words and words[0] in PRESETS:
        raise SystemExit(f"herd: error: {words[0]!r} is a shape preset without weights; give a checkpoint path")
    prompt = " ".join(words) if words else None
    _, model, tok = _load(model_arg, args.verbose)
    engine = Engine(model, max_batch=1, max_seq_len=args.max_seq_len)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text):
        history.append({"role": "user", "content": text})
        ids = format_chat(tok, history)
        timing = Timing()
        reply = _print_stream(stream_completion(engine, tok, ids, _sampling(args, tok), timing=timing))
        history.append({"role": "assistant", "content": reply})
        if args.verbose:
            print(f"[{timing.summary()}]", file=sys.stderr)

    if prompt is not None:
        answer(prompt)
        return
    print("herd chat: /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            del history[1 if args.system else 0:]
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.strip():
            try:
                answer(line)
            except KeyboardInterrupt:      # stop this answer, keep the chat
                history.pop()
                print("\n[interrupted]", file=sys.stderr)


def cmd_generate(args):
    from .engine import Engine
    from .textgen import Timing, stream_completion

    _, model, tok = _load(args.model, args.verbose)
    ids = tok.encode(args.prompt, bos=tok.add_bos)
    params = _sampling(args, tok, ignore_eos=args.ignore_eos)
    if args.ignore_eos:
        params.stop_token_ids = ()
    engine = Engine(model, max_batch=1, max_seq_len=args.max_seq_len)
    timing = Timing()
    sys.stdout.write(args.prompt)
    _print_stream(stream_completion(engine, tok, ids, params, timing=timing))
    if args.verbose:
        print(f"[{timing.summary()}]", file=sys.stderr)


def _add_sampling_flags(p, temperature):
    # Sampling
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    # Runtime
    p.add_argument("--max-seq-len", type=int, default=4096, help="context window to allocate (prompt + output)")
    p.add_argument("--verbose", action="store_true", help="print load time and prefill / decode tokens per second")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="herd", description="Llama-4-architecture models on one codebase.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts and weight bytes of a preset or checkpoint")
    p.add_argument("model", help="preset name (scout, maverick, debug) or checkpoint folder / config.json")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="chat with a model (the default model when none is given)")
    p.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="optional model (GGUF file or HF folder), then a prompt; no prompt = interactive chat")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_flags(p, temperature=0.0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("generate", help="raw text completion (no chat format)")
    p.add_argument("model", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    _add_sampling_flags(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    from .chat import ChatError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .engine import ContextLengthError
    from .gguf_loader import GGUFError
    from .tokenizer import TokenizerError
    try:
        args.func(args)
    except (ConfigError, CheckpointError, GGUFError, TokenizerError, ChatError, ContextLengthError,
            FileNotFoundError, ValueError) as e:
        print(f"herd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
