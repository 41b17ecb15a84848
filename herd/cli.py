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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="herd", description="Llama-4-architecture models on one codebase.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts and weight bytes of a preset or checkpoint")
    p.add_argument("model", help="preset name (scout, maverick, debug) or checkpoint folder / config.json")
    p.set_defaults(func=cmd_info)

    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    try:
        args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"herd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
