"""The `herd` command line. Each subcommand parses its flags and calls into the library; no model code here."""
from __future__ import annotations

import argparse
import os
import sys

# Before torch loads (it is imported lazily below): OpenMP threads that spin-wait are descheduled on a shared,
# loaded CPU; measured 23 ms instead of 0.8 ms for one SmolLM2 FFN matmul with 2 spinning threads (bench/speed.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli_common import (add_threads_flag, add_weight_flags, count, load_model, model_path,  # noqa: E402
                         new_checkpoint_folder, number)


def _looks_like_path(word: str) -> bool:
    """A single word (no spaces) that reads as a path to a model rather than a prompt."""
    return (not any(c.isspace() for c in word)
            and (word.startswith(("./", "../", "/", "~")) or word.endswith((".gguf", ".safetensors", ".json"))))


def _config_of(model: str):
    """The ModelConfig of a preset name, 'default', a GGUF file, a checkpoint folder or a config.json."""
    from .config import PRESETS, load_config, preset
    from .gguf import is_gguf, read_config

    if model in PRESETS:
        return preset(model)
    p = model_path(model)
    if is_gguf(p):
        return read_config(p)
    return load_config(p / "config.json" if p.is_dir() else p)


def cmd_info(args):
    from .sizes import count_params, human, weight_bytes

    cfg = _config_of(args.model)
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


def _print_kv_cache(engine):
    """The engine's KV cache in bytes per token of context, from plan.kv_cache_bytes (the numbers `herd plan` uses;
    tests/test_long_context.py checks they equal the buffers KVCache really allocates)."""
    from .plan import kv_cache_bytes

    cfg, ctx, cache = engine.cfg, engine.max_seq_len, engine.cache
    n = kv_cache_bytes(cfg, ctx, dtype_bytes=cache.dtype.itemsize, pos_bytes=8, kv_int8=cache.kv_int8)
    n_chunked = sum(s.chunked for s in cfg.layers)
    layout = (f"{n_chunked} chunked layers hold {min(ctx, cfg.attn_chunk_size):,} tokens, "
              if n_chunked else "") + f"{cfg.n_layers - n_chunked} global layers hold all"
    dtype = str(cache.dtype).removeprefix("torch.")
    print(f"[kv cache {n / 2**20:,.1f} MiB ({dtype}) for {ctx:,} tokens of context = {n / ctx:,.0f} B per token "
          f"({layout})]", file=sys.stderr)


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
    from .config import PRESETS

    # `herd run PROMPT` and `herd run MODEL [PROMPT]`: the first word is a model when it names one.
    words = list(args.words)
    model_arg = None
    if words and words[0].strip() and (Path(words[0]).exists() or words[0] == "default"):    # Path("") is "."
        model_arg = words.pop(0)
    elif words and words[0] in PRESETS:
        raise SystemExit(f"herd: error: {words[0]!r} is a shape preset without weights; give a checkpoint path")
    elif words and _looks_like_path(words[0]):
        model_path(words[0])                # a model the user meant to name, but it is not there: say so
    prompt = " ".join(words) if words else None
    if prompt is not None and not prompt.strip() and not args.image:
        raise SystemExit("herd: error: the prompt is empty: give one, or none for an interactive chat")
    _, model, tok = load_model(model_arg, args.verbose, args.dequantize, args.threads, args.mmap_experts)
    session = ChatSession(args, model, tok)
    if prompt is not None:
        session.ask(prompt)
    else:
        chat_loop(session)


class ChatSession:
    """One conversation with a model for `herd run`: its history, images and engine. Each turn sends the whole
    conversation as the prompt; the engine's prefix cache serves the previous turns' prompt in whole 32-token blocks,
    so little more than the last answer and the new message is prefilled (a conversation with images, or int8 keys, is prefilled whole: every
    image block and its pixels go again with each prompt)."""

    def __init__(self, args, model, tok):
        from .engine import Engine

        self.args, self.model, self.tok = args, model, tok
        self.engine = Engine(model, max_batch=1, max_seq_len=args.max_seq_len, kv_int8=args.kv_int8,
                             cache_dtype=_cache_dtype(args))
        if args.verbose:
            _print_kv_cache(self.engine)
        self.history = [{"role": "system", "content": args.system}] if args.system else []
        self.image_blocks, self.pixels, self.pending = [], [], list(args.image)   # images go with the first message

    def ask(self, text: str):
        """Send one user message and print the streamed answer."""
        import torch
        from .textgen import Timing, stream_completion

        content = text
        if self.pending:
            content = self._attach_images(text)
        self.history.append({"role": "user", "content": content})
        ids = self._prompt_that_fits()
        timing = Timing()
        images = torch.cat(self.pixels) if self.pixels else None
        reply = _print_stream(stream_completion(self.engine, self.tok, ids, _sampling(self.args, self.tok),
                                                timing=timing, images=images))
        self.history.append({"role": "assistant", "content": reply})
        if self.args.verbose:
            print(f"[{timing.summary()}]", file=sys.stderr)

    def _prompt_that_fits(self) -> list[int]:
        """The conversation's prompt ids, leaving room for an answer (--max-tokens, at most half the context):
        while it does not fit, the oldest turn (a user message and its answer) is dropped with a one-line notice. The
        last message alone too long is an error (the engine's ContextLengthError names the sizes)."""
        from .chat import format_chat

        room = min(self.args.max_tokens, self.engine.max_seq_len // 2)
        first = 1 if self.args.system else 0
        while True:
            ids = format_chat(self.tok, self.history, image_blocks=self.image_blocks or None)
            if len(ids) + room <= self.engine.max_seq_len or len(self.history) - first <= 1:
                return ids
            dropped = self.history[first:first + 2]
            del self.history[first:first + 2]
            if any(isinstance(m["content"], list) for m in dropped):     # its images leave with it
                self.image_blocks.clear()
                self.pixels.clear()
            print(f"[context full ({len(ids):,} + {room:,} tokens > {self.engine.max_seq_len:,}): dropped the "
                  "oldest turn]", file=sys.stderr)

    def _attach_images(self, text: str) -> list[dict]:
        if self.model.config.vision is None:
            raise ValueError("--image given, but this model is text-only (its config has no vision_config)")
        from .images import ImageTokenIds, prepare_images
        values, blocks = prepare_images(self.pending, self.model.config.vision, ImageTokenIds.from_tokenizer(self.tok))
        self.image_blocks.extend(blocks)
        self.pixels.append(values)
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        self.pending = []
        return content

    def reset(self):
        del self.history[1 if self.args.system else 0:]
        self.image_blocks.clear()
        self.pixels.clear()


def chat_loop(session: ChatSession):
    """The interactive chat of `herd run` without a prompt: /reset, /exit, Ctrl-D; Ctrl-C stops one answer."""
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
            session.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.strip():
            try:
                session.ask(line)
            except KeyboardInterrupt:      # stop this answer, keep the chat
                session.history.pop()
                print("\n[interrupted]", file=sys.stderr)
            except ValueError as e:        # e.g. one message longer than the context: say so, keep the chat
                if session.history and session.history[-1]["role"] == "user":
                    session.history.pop()
                print(f"herd: error: {e}", file=sys.stderr)


def cmd_generate(args):
    from .engine import Engine
    from .textgen import Timing, stream_completion

    _, model, tok = load_model(args.model, args.verbose, args.dequantize, args.threads, args.mmap_experts)
    ids = tok.encode(args.prompt, bos=tok.add_bos)
    params = _sampling(args, tok, ignore_eos=args.ignore_eos)
    if args.ignore_eos:
        params.stop_token_ids = ()
    engine = Engine(model, max_batch=1, max_seq_len=args.max_seq_len, kv_int8=args.kv_int8,
                    cache_dtype=_cache_dtype(args))
    if args.verbose:
        _print_kv_cache(engine)
    timing = Timing()
    sys.stdout.write(args.prompt)
    _print_stream(stream_completion(engine, tok, ids, params, timing=timing))
    if args.verbose:
        print(f"[{timing.summary()}]", file=sys.stderr)


def cmd_quantize(args):
    import herd
    from .checkpoint import save_hf
    from .quantize import make_spec, quantize_targets, quantized_state_dict
    from .sizes import human
    from .tokenizer import copy_tokenizer

    # bad flags fail before the (slow) load
    spec = make_spec(args.scheme, args.group_size, args.only, symmetric=not args.asymmetric)
    src = model_path(args.src)
    new_checkpoint_folder(args.dst, src)
    if spec.only == "experts" and _config_of(str(src)).moe is None:        # known from the config: before the load
        raise ValueError(f"{args.src}: nothing to quantize with --only experts: the model has no routed experts "
                         "(a dense model: use --only all)")
    model = herd.load(src, progress=True)
    n = len(quantize_targets(model, spec.only))
    if n == 0:
        raise ValueError(f"{args.src}: nothing to quantize with --only {spec.only}: the model has no routed experts"
                         + (" (a dense model: use --only all)" if spec.only == "experts" else ""))
    sd = quantized_state_dict(model, spec)
    save_hf(model, args.dst, extra_config={"quantization_config": spec.to_config()}, state=sd)
    tok_files = copy_tokenizer(src, args.dst)

    def nbytes(state):      # tied tensors (embeddings = output head) once
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    before, after = nbytes(model.state_dict()), nbytes(sd)
    group = f", groups of {spec.group_size}" if spec.group_size else ""
    zero = "" if spec.symmetric else ", asymmetric (a zero point per group)"
    print(f"quantized {n} modules ({spec.only}) to {spec.scheme}{group}{zero}: {human(before, 'B')} -> "
          f"{human(after, 'B')}, written to {args.dst} with the tokenizer ({', '.join(tok_files) or 'none found'})")


def cmd_plan(args):
    from .plan import format_plan, make_plan

    cfg = _config_of(args.model)
    print(format_plan(args.model, cfg, make_plan(cfg, args.device, args.quant, args.context, args.batch)))


def cmd_serve(args):
    from .serve.app import check_address, serve
    from .serve.limits import Limits, limit_fields
    from .serve.worker import ServedModel, short_name

    from .serve.guard import load_rails
    check_address(args.host, args.port)                         # before the loads, which can take minutes
    rails = load_rails(args.guard_input, args.guard_output)     # a guard that fails to load stops the start here
    served = []
    for spec in args.models or ["default"]:
        # NAME=PATH sets the id; otherwise it is the file's or folder's short name
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path_used, model, tok = load_model(None if path == "default" else path, verbose=True,
                                           dequantize=args.dequantize, threads=args.threads,
                                           mmap_experts=args.mmap_experts)
        name = name or short_name(path_used)
        if any(m.name == name for m in served):
            raise ValueError(f"two models are both named {name!r}: give one an id with NAME=PATH")
        served.append(ServedModel(name, model, tok, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                                  max_queue=args.max_queue, cache_dtype=_cache_dtype(args),
                                  step_tokens=args.step_tokens, prefix_cache_mib=args.prefix_cache_mib))
    page = "" if args.no_webui else f"; chat page: http://{args.host}:{args.port}/"
    print(f"[serving {', '.join(m.name for m in served)} on http://{args.host}:{args.port}/v1{page}]", file=sys.stderr)
    limits = Limits(**{name: getattr(args, name) for name, _, _ in limit_fields()})
    serve(served, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level, limits=limits,
          cors_origins=args.cors_origin, protect_metrics=args.protect_metrics, webui=not args.no_webui, rails=rails)


def cmd_bench_serve(args):
    from .serve.bench import format_report, run_bench

    result = run_bench(args.url, concurrency=args.concurrency, requests=args.requests, max_tokens=args.max_tokens,
                       model=args.model, api_key=args.api_key, prompt=args.prompt, ignore_eos=args.ignore_eos,
                       timeout=args.timeout)
    print(format_report(result, args.usd_per_hour))
    if result["failed"]:
        sys.exit(1)


def cmd_train(args):
    import json
    from .train.train import TrainingError, train
    try:
        summary = train(args)
    except TrainingError as e:
        _fail(e)
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}))


def cmd_upcycle(args):
    import json
    import torch
    import herd
    from .checkpoint import save_hf
    from .tokenizer import save_tokenizer
    from .tokenizer import load_tokenizer
    from .train.upcycle import closeness, upcycle

    src = model_path(args.dense)
    new_checkpoint_folder(args.out, src)
    dense = herd.load(src, progress=True).float()
    if dense.config.moe is not None:
        raise ValueError(f"{src}: already a mixture-of-experts model; upcycling starts from a dense one")
    moe = upcycle(dense, args.experts, top_k=args.top_k, moe_every=args.moe_every,
                  router_logit_std=args.router_logit_std, seed=args.seed)
    save_hf(moe, args.out)
    tok = load_tokenizer(src)
    save_tokenizer(tok, args.out)
    ids = tok.encode(args.probe_text, bos=True)[: args.probe_tokens]
    report = closeness(dense, moe, torch.tensor([ids]))
    print(f"upcycled {src} -> {args.out}: {sum(s.is_moe for s in moe.config.layers)} MoE layers x "
          f"({args.experts} routed experts + 1 shared), expert width {moe.config.moe.expert_dim}")
    print("step-0 closeness to the dense model: " + json.dumps(report))


def cmd_synth(args):
    import json
    from pathlib import Path

    import torch
    import herd
    from .engine import SamplingParams
    from .train.synth import read_prompts, synthesize
    from .tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts)
    if Path(args.out).exists() and Path(args.out).samefile(args.prompts):
        raise ValueError(f"--out {args.out} is the prompt file: the answers would overwrite the prompts")
    path = model_path(args.teacher)
    model = herd.load(path, dtype=torch.bfloat16 if args.bf16 else None, progress=True)
    tok = load_tokenizer(path, eos_ids=model.config.eos_token_ids)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    print(json.dumps(synthesize(model, tok, prompts, args.out, params, batch_size=args.batch_size,
                                system=args.system, max_seq_len=args.max_seq_len)))


def _add_sampling_flags(p, temperature):
    # Sampling
    p.add_argument("--max-tokens", type=count(1), default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=number(0), default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=count(0), default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    # Runtime
    p.add_argument("--max-seq-len", type=count(1), default=4096,
                   help="context window to allocate (prompt + output); 128k = 131072")
    p.add_argument("--kv-int8", action="store_true",
                   help="int8 keys and values (one scale per token and head) in the global layers' KV cache")
    _kv_dtype_arg(p)
    add_threads_flag(p)
    p.add_argument("--verbose", action="store_true", help="print load time and prefill / decode tokens per second")


KV_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "f16": "float16"}


def _kv_dtype_arg(p):
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default=None,
                   help="the KV cache's dtype (default: the activations'; f16 halves the cache and its reads, as "
                        "llama.cpp's default cache; bench/perplexity.py measures what it costs)")


def _cache_dtype(args):
    import torch
    return getattr(torch, KV_DTYPES[args.kv_dtype]) if args.kv_dtype else None



def _fail(error):
    print(f"herd: error: {error}", file=sys.stderr)
    sys.exit(2)


# ---- the parser -----------------------------------------------------------------------------------------------------
def build_parser(argv=None) -> argparse.ArgumentParser:
    """The `herd` parser. The training commands' flags are added only when one of them is the command, so that no
    other command imports anything of herd.train."""
    from . import __version__
    parser = argparse.ArgumentParser(prog="herd", description="Llama-4-architecture models on one codebase.")
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parsers(sub)
    _add_model_parsers(sub)
    _add_serve_parsers(sub)
    _add_train_parsers(sub, argv if argv is not None else sys.argv[1:])
    from .eval.cli import add_eval_parser      # `herd eval ...`: flags and handlers in herd/eval/cli.py
    add_eval_parser(sub)
    from .guard.command import add_guard_command    # `herd guard` (herd/guard/command.py)
    add_guard_command(sub)
    from .agent.cli import add_agent_parser     # `herd agent`: flags and handler in herd/agent/cli.py
    add_agent_parser(sub)
    return parser


def _add_run_parsers(sub):
    p = sub.add_parser("run", help="chat with a model (the default model when none is given)")
    p.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="optional model (GGUF file or HF folder), then a prompt; no prompt = interactive chat")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the first message (repeat for several; Llama 4 vision models)")
    add_weight_flags(p)
    _add_sampling_flags(p, temperature=0.0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("generate", help="raw text completion (no chat format)")
    p.add_argument("model", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    add_weight_flags(p)
    _add_sampling_flags(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)


def _add_model_parsers(sub):
    from .plan import DEVICES
    p = sub.add_parser("info", help="parameter counts and weight bytes of a preset or checkpoint")
    p.add_argument("model", help="preset name (scout, maverick, debug), 'default', a GGUF file, or a checkpoint "
                   "folder / config.json")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="write a weight-quantized copy of a checkpoint (safetensors + config.json)")
    p.add_argument("src", help="HF checkpoint folder or GGUF file (float weights)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--scheme", required=True, choices=["int8", "int4", "fp8"],
                   help="int8 per output row, int4 group-wise (Meta's recipe), fp8 e4m3 per output row")
    p.add_argument("--group-size", type=count(1), default=None,
                   help="int4 group size along the input dim (default 128)")
    p.add_argument("--asymmetric", action="store_true",
                   help="int4 only: a zero point per group as well as a scale (w = q * scale + zero, the 16 levels "
                        "spanning each group's min..max) instead of Meta's symmetric max|w| / 8; same run-time cost")
    p.add_argument("--only", default="experts", choices=["experts", "all"],
                   help="experts: routed experts only; all: also attention, shared expert, dense FFN and untied "
                        "output (router, norms, embeddings and vision stay as they are)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plan", help="memory plan: weights, KV cache, activations, overhead; longest context that fits")
    p.add_argument("model", help="preset name (scout, maverick, debug) or checkpoint folder / config.json")
    p.add_argument("--device", required=True, choices=list(DEVICES),
                   help="8xh100 / 8xh200: one node, tensor parallel (as vLLM / SGLang --tensor-parallel-size 8)")
    p.add_argument("--quant", default="bf16", choices=["bf16", "fp8", "int4"],
                   help="Meta's recipes: fp8_mixed (routed experts) or int4_mixed (routed + shared experts)")
    p.add_argument("--context", type=count(1), default=8192,
                   help="tokens per sequence (128k = 131072, 10M = 10485760)")
    p.add_argument("--batch", type=count(1), default=1, help="sequences held at once")
    p.set_defaults(func=cmd_plan)


def _add_serve_parsers(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (the default model when none is given)")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="GGUF file or HF folder, optionally NAME=PATH to set its id; 'default' = the default model")
    # Server
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=count(1, 65535), default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    p.add_argument("--no-webui", action="store_true", help="do not answer GET / with the chat page")
    p.add_argument("--protect-metrics", action="store_true",
                   help="/metrics and the API docs (/docs, /openapi.json) need --api-key too (default: open)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="a browser origin allowed to call the API, e.g. http://localhost:3000 ('*': any); repeat")
    # Limits (a request past one gets a 400, or 413 for the body, that names the flag)
    from .serve.limits import flag, limit_fields
    for name, default, help in limit_fields():
        p.add_argument(flag(name), type=count(0) if isinstance(default, int) else number(0), default=default,
                       help=f"{help} (default {default})")
    # Engine
    p.add_argument("--max-batch", type=count(1), default=16, help="requests decoded together per model")
    p.add_argument("--max-queue", type=count(0), default=64, help="requests waiting for a slot before HTTP 429")
    p.add_argument("--max-seq-len", type=count(1), default=4096,
                   help="context per request (prompt + output); 128k = 131072")
    p.add_argument("--step-tokens", type=count(1), default=None, metavar="N",
                   help="prompt tokens prefilled per engine step while others decode, counting one per decoding "
                        "request (default: as many as take one decode step's time, measured as it runs)")
    p.add_argument("--prefix-cache-mib", type=number(0), default=256, metavar="MIB",
                   help="memory for keys and values of prompt prefixes reused across requests (a shared system "
                        "prompt is prefilled once); 0 turns it off (default 256)")
    add_threads_flag(p)
    add_weight_flags(p)
    _kv_dtype_arg(p)
    # Guards (herd/serve/guard.py): a guard folder (Llama Guard 4, Prompt Guard 2) or 'default'
    p.add_argument("--guard-input", default=None, metavar="GUARD",
                   help="check user and tool messages before they reach the model; flagged requests are refused")
    p.add_argument("--guard-output", default=None, metavar="GUARD",
                   help="check answers as they stream; a flagged answer is cut (finish_reason content_filter)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server: throughput, TTFT, ITL, cost")
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=count(1), default=8, help="clients streaming at once")
    p.add_argument("--requests", type=count(1), default=32, help="requests in total")
    p.add_argument("--max-tokens", type=count(1), default=128, help="max_tokens of each request")
    p.add_argument("--usd-per-hour", type=number(0), default=None, help="machine price, for cost per 1M output tokens")
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument("--api-key", default=None, help="bearer token for the server")
    p.add_argument("--prompt", default=None, help="one prompt for every request (default: a built-in set)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask for exactly --max-tokens tokens per request (the vLLM / herd extension)")
    p.add_argument("--timeout", type=number(0, above=True), default=600.0,
                   help="seconds before one request counts as failed")
    p.set_defaults(func=cmd_bench_serve)


def _add_train_parsers(sub, argv):
    command = next((a for a in argv if not a.startswith("-")), None)
    p = sub.add_parser("train", help="train a model (MoE router losses on), resumable, DDP/FSDP2 under torchrun")
    if command == "train":
        from .train.flags import add_train_flags
        add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train a student on a teacher's softened logits (+ cross-entropy)")
    if command == "distill":
        from .train.flags import add_train_flags
        add_train_flags(p, distill=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("upcycle", help="grow a Llama-4-style MoE from a dense checkpoint's FFNs")
    p.add_argument("dense", help="dense checkpoint: HF folder or GGUF file ('default' for the default model)")
    p.add_argument("out", help="output folder (HF layout)")
    p.add_argument("--experts", type=count(1), required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=count(1), default=1, help="routed experts per token")
    p.add_argument("--moe-every", type=count(1), default=1, help="MoE on every n-th layer (2 = Maverick-style)")
    p.add_argument("--router-logit-std", type=number(0), default=0.005, help="std of the step-0 router logits")
    p.add_argument("--seed", type=int, default=0, help="router init seed")
    p.add_argument("--probe-text", default="The history of science is the study of how people came to understand "
                   "the natural world, from early astronomy and medicine to modern physics and biology.",
                   help="text on which step-0 closeness to the dense model is measured")
    p.add_argument("--probe-tokens", type=count(1), default=256, help="at most this many probe tokens")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("synth", help="a teacher model writes training text (JSONL) from a prompt file")
    p.add_argument("teacher", help="GGUF file or HF folder ('default' for the default model)")
    p.add_argument("--prompts", required=True, help="one prompt per line (.txt) or JSONL with 'prompt'")
    p.add_argument("--out", required=True, help="output JSONL: prompt, response, text (the chat transcript)")
    p.add_argument("--system", default=None, help="system message for every prompt")
    p.add_argument("--batch-size", type=count(1), default=16, help="prompts decoded together by the engine")
    p.add_argument("--max-tokens", type=count(1), default=256, help="most tokens per answer")
    p.add_argument("--temperature", type=number(0), default=0.8, help="sampling temperature")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (reproducible output)")
    p.add_argument("--max-seq-len", type=count(1), default=1024, help="context to allocate per prompt + answer")
    p.add_argument("--bf16", action="store_true", help="run the teacher in bf16")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_synth)


# ---- dispatch -------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = build_parser(argv)
    # `herd run MODEL --image a.png "prompt"`: words after an option are still the command's words
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and not any(e.startswith("-") for e in extra):
        args.words += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .chat import ChatError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .engine import ContextLengthError
    from .gguf import GGUFError
    from .tokenizer import TokenizerError
    try:
        args.func(args)
    except (ConfigError, CheckpointError, GGUFError, TokenizerError, ChatError, ContextLengthError,
            FileNotFoundError, ValueError) as e:
        _fail(e)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
