"""`herd eval niah | lm | humaneval | perplexity`: their flags (add_eval_parser, called by herd.cli) and handlers.
Each loads the model as every command does (herd.cli_common) and calls the evaluation's module; no scoring here."""
from __future__ import annotations

import sys

from ..cli_common import add_threads_flag, add_weight_flags, count, load_model


def add_eval_parser(sub):
    p = sub.add_parser("eval", help="evaluations of a model")
    evals = p.add_subparsers(dest="eval", required=True)
    p = evals.add_parser("niah", help="needle in a haystack: recall accuracy by context length and needle depth")
    p.add_argument("model", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("--lengths", default="1k,4k,16k,64k", help="prompt lengths in tokens (k = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle positions, 0 = start of the haystack")
    p.add_argument("--samples", type=count(1), default=1, help="needles per cell (each a new city and number)")
    p.add_argument("--seed", type=int, default=0, help="picks the needles")
    p.add_argument("--no-chat", action="store_true", help="raw prompt even if the model has a chat format")
    add_weight_flags(p)
    p.add_argument("--out", default="niah.png", help="heatmap PNG to write")
    p.add_argument("--verbose", action="store_true", help="print load time")
    p.set_defaults(func=cmd_eval_niah)
    _add_eval_suite_parsers(evals)


def cmd_eval_niah(args):
    from pathlib import Path
    from .niah import format_grid, parse_depths, parse_length, plot_heatmap, run_niah

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    depths = parse_depths(args.depths)
    path, model, tok = load_model(args.model, args.verbose, args.dequantize, mmap_experts=args.mmap_experts)
    chat = not args.no_chat and (tok.is_llama4 or bool(tok.chat_template))
    print(f"needle in a haystack: {Path(str(path)).name}, context {model.config.max_seq_len:,} tokens, "
          f"{'chat' if chat else 'raw'} prompts, {args.samples} needle(s) per cell", file=sys.stderr)
    res = run_niah(model, tok, lengths, depths, samples=args.samples, seed=args.seed, chat=chat,
                   log=lambda m: print(m, file=sys.stderr))
    print(format_grid(res))
    plot_heatmap(res, args.out, f"needle in a haystack: {Path(str(path)).name}")
    print(f"heatmap written to {args.out}")


# ---- herd eval lm / humaneval / perplexity (herd/eval/) ------------------------------------------------------------
def cmd_eval_lm(args):
    import contextlib
    import json
    import time
    from . import lm

    lm.offline()
    tasks = [t for t in args.tasks.split(",") if t]
    t0 = time.perf_counter()
    if args.url or args.server:
        extra = ["--dequantize"] if args.dequantize else []
        extra += ["--threads", str(args.threads)] if args.threads else []
        extra += [] if args.mmap_experts is None else ["--mmap-experts" if args.mmap_experts else "--no-mmap-experts"]
        server = (lm.herd_server(args.model, max_batch=args.batch_size, max_seq_len=args.max_seq_len, extra=extra)
                  if args.server else contextlib.nullcontext(args.url.removesuffix("/").removesuffix("/v1")))
        with server as base:
            name = args.served_model or lm.served_model_id(base)
            how = f"lm-eval local-completions -> {base} (model {name})"
            print(f"[{how}]", file=sys.stderr)
            results = lm.evaluate_server(f"{base}/v1/completions", name, tasks, limit=args.limit,
                                         batch_size=args.batch_size, max_length=args.max_seq_len,
                                         include=args.include, tokenizer=args.tokenizer,
                                         tokenizer_backend="huggingface" if args.tokenizer else "remote",
                                         tokenized_requests=not args.text_prompts, api_key=args.api_key)
    else:
        path, model, tok = load_model(args.model, args.verbose, args.dequantize, args.threads, args.mmap_experts)
        how = f"in process, {path}"
        results = lm.evaluate_in_process(model, tok, tasks, limit=args.limit, batch_size=args.batch_size,
                                         max_seq_len=args.max_seq_len, include=args.include)
    settings = {"model": args.model, "how": how, "tasks": tasks, "limit": args.limit, "batch_size": args.batch_size,
                "max_seq_len": args.max_seq_len, "dequantize": args.dequantize, "threads": args.threads,
                "seconds": round(time.perf_counter() - t0, 1)}
    print(lm.format_results(results))
    lm.write_json(results, args.out, settings)
    print(f"{json.dumps(settings)}\nresults written to {args.out}")


def cmd_eval_humaneval(args):
    import json
    import time
    from . import humaneval

    path, model, tok = load_model(args.model, args.verbose, args.dequantize, args.threads, args.mmap_experts)
    t0 = time.perf_counter()
    outcomes = humaneval.run_humaneval(model, tok, limit=args.limit, batch_size=args.batch_size,
                                       max_tokens=args.max_tokens)
    settings = {"model": str(path), "limit": args.limit, "max_tokens": args.max_tokens, "greedy": True,
                "stop": humaneval.STOP, "dequantize": args.dequantize, "threads": args.threads,
                "seconds": round(time.perf_counter() - t0, 1)}
    print(humaneval.format_summary(humaneval.summary(outcomes)))
    with open(args.out, "w") as f:
        json.dump(humaneval.as_json(outcomes, settings), f, indent=2)
    print(f"results written to {args.out}")


def cmd_eval_perplexity(args):
    import json
    import time
    from pathlib import Path

    import torch
    from .perplexity import perplexity

    text = Path(args.file).read_text(encoding="utf-8")
    path, model, tok = load_model(args.model, args.verbose, args.dequantize, args.threads, args.mmap_experts)
    ids = tok.encode(text, bos=tok.add_bos, allow_special=False)
    if args.tokens:
        ids = ids[:args.tokens]
    t0 = time.perf_counter()
    res = perplexity(model, torch.tensor(ids), args.window, args.stride, progress=True)
    out = {"model": str(path), "file": args.file, "bytes": len(text.encode()), "text_tokens": len(ids),
           **res.as_dict(), "dequantize": args.dequantize, "seconds": round(time.perf_counter() - t0, 1)}
    print("| model | file | tokens scored | window | stride | perplexity | bits/token |\n|---|---|---|---|---|---|---|")
    print(f"| {Path(str(path)).name} | {args.file} | {res.tokens} | {res.window} | {res.stride} | {res.ppl:.4f} | "
          f"{res.bits_per_token:.4f} |")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"results written to {args.out}")


def _add_eval_suite_parsers(evals):
    """`herd eval lm | humaneval | perplexity`."""
    p = evals.add_parser("lm", help="lm-evaluation-harness tasks (default: herd's local suite), in process or through "
                                    "a server, offline")
    p.add_argument("model", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("--tasks", default="herd_smoke", help="comma-separated lm-eval tasks or groups (herd_smoke, "
                   "herd_smoke_ci: herd/eval/tasks; others from --include folders or lm-eval's cached tasks)")
    p.add_argument("--limit", type=count(1), default=None, help="at most this many items per task")
    p.add_argument("--server", action="store_true", help="start `herd serve MODEL` and measure it through lm-eval's "
                   "local-completions client (token-id prompts, echo + logprobs, the server's tokenizer endpoints)")
    p.add_argument("--url", default=None, help="measure an already running OpenAI-compatible server instead "
                   "(http://host:port); its model id from /v1/models unless --served-model")
    p.add_argument("--served-model", default=None, help="the `model` to send to --url")
    p.add_argument("--tokenizer", default=None, help="a local HF tokenizer folder for a --url server without "
                   "/tokenize and /tokenizer_info")
    p.add_argument("--text-prompts", action="store_true", help="send --url text prompts, not token-id arrays (for "
                   "servers that take no token arrays; they then tokenize it again themselves)")
    p.add_argument("--api-key", default=None, help="bearer token of a --url server")
    p.add_argument("--include", action="append", default=[], help="another folder of lm-eval task YAMLs")
    p.add_argument("--batch-size", type=count(1), default=16, help="sequences scored together (engine rows, or prompts "
                   "per request to the server)")
    p.add_argument("--max-seq-len", type=count(1), default=2048, help="context; longer inputs are left-truncated")
    p.add_argument("--out", default="eval_lm.json", help="JSON results to write")
    _eval_runtime_flags(p)
    p.set_defaults(func=cmd_eval_lm)

    p = evals.add_parser("humaneval", help="HumanEval pass@1 (greedy); the code runs only in herd's sandbox")
    p.add_argument("model", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("--limit", type=count(1), default=None, help="the first N of the 164 problems")
    p.add_argument("--batch-size", type=count(1), default=8, help="problems completed together on the engine")
    p.add_argument("--max-tokens", type=count(1), default=512, help="most tokens per completion")
    p.add_argument("--out", default="eval_humaneval.json", help="JSON results (every completion and outcome)")
    _eval_runtime_flags(p)
    p.set_defaults(func=cmd_eval_humaneval)

    p = evals.add_parser("perplexity", help="perplexity of a UTF-8 text file, in (sliding) windows")
    p.add_argument("model", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--window", type=count(2), default=512, help="tokens per forward")
    p.add_argument("--stride", type=count(1), default=None, help="tokens between window starts (default: --window, "
                   "non-overlapping; smaller: a sliding window, each scored token sees >= window - stride before it)")
    p.add_argument("--tokens", type=count(2), default=None, help="score only the first N tokens of the file")
    p.add_argument("--out", default="eval_perplexity.json", help="JSON result to write")
    _eval_runtime_flags(p)
    p.set_defaults(func=cmd_eval_perplexity)


def _eval_runtime_flags(p):
    add_weight_flags(p)
    add_threads_flag(p)
    p.add_argument("--verbose", action="store_true", help="print load time and the weights' form")
