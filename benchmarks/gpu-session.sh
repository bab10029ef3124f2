#!/usr/bin/env bash
# The GPU checks of one session lent a device, prepared to run as one command of about 9 minutes on an
# H100/H200 (torch, transformers, triton and pytest preinstalled there; nothing else needed):
#   1. the fast paths against their references (CUDA-graph decode step, compiled SSM update, fla prefill kernel),
#      and several models sampling in turns on the GPU (the CPU tests of `sample_interleaved`, run there on cuda);
#   2. the `llama-1b` bench rows that decide the GPU targets: every model at batch 256, then the teacher and
#      the Llamba student at batch 1024 (the student's constant state is what lets it batch wider), HF, then the
#      Llamba with a bf16 SSM state beside its fp32 one.
# Usage, from the repository root: bash benchmarks/gpu-session.sh [OUT_DIR]   (default benchmarks/gpu-out)
# To include flash-linear-attention, put its wheel in .whl/ (fla_core-*.whl; einops is already there).
# Each part has its own time limit, so one slow part cannot starve the rest; the results land in OUT_DIR.
set -u -o pipefail
OUT_DIR=${1:-${OUT:-benchmarks/gpu-out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT_DIR/gpu.txt"

timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_decode.py tests/test_ssd.py \
    tests/test_models_llama_family.py tests/test_hf_generate.py tests/test_published.py tests/test_engine_sampling.py 2>&1 \
    | tee "$OUT_DIR/gpu-tests.log"
# several models taking turns on one GPU (sample_interleaved picks cuda by itself: bf16, CUDA graphs per engine)
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_engine_interleaved.py 2>&1 \
    | tee "$OUT_DIR/gpu-interleaved-tests.log"

bench() {  # name, limit in seconds, bench arguments...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m thinkfast bench --preset llama-1b --out "$OUT_DIR/$name.md" --json "$OUT_DIR/$name.json" "$@" 2>&1 \
        | tee "$OUT_DIR/$name.log"
}
bench llama-1b-b256 150 --configs 256x128x2048 --models llamba,teacher,hybrid
bench llama-1b-b1024 120 --configs 1024x128x2048 --models llamba,teacher
bench llama-1b-hf 120 --configs 256x128x2048 --models teacher-hf
# the Llamba with a bf16 SSM state beside its fp32 one (last: the part a slow session can lose)
bench llama-1b-state 90 --configs 256x128x1024 --models llamba --ssm-state-dtype float32,bfloat16
ls -l "$OUT_DIR"
