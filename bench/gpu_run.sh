#!/usr/bin/env bash
# The one prepared run for a GPU machine lent through the workplace's `device` tool (nothing can be
# downloaded there): installs, from the wheels `make gpu-wheels` put into .gpu-wheels/ (carried along), what
# the image lacks, then runs the GPU tests and bench/gpu_throughput.py (transformers, then vLLM where the machine
# has it). Everything it writes goes to $OUT.
#   run: bash bench/gpu_run.sh        carry: [".gpu-wheels"]        timeout: ~480 s
set -euo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
python=python3
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >"$out/machine.txt" 2>&1
# the image's torch stays; omniq's own dependencies come from the carried wheels, without touching torch
"$python" -m pip install --quiet --no-index --find-links .gpu-wheels --no-deps .gpu-wheels/*.whl >"$out/pip.txt" 2>&1
"$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . >>"$out/pip.txt" 2>&1
"$python" -c 'import transformers; print("transformers now", transformers.__version__)' >>"$out/machine.txt" 2>&1
timeout 150 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/pipeline/engines >"$out/pytest-gpu.txt" 2>&1 \
    || echo "pytest -m gpu exited $?" >>"$out/pytest-gpu.txt"
timeout 300 "$python" bench/gpu_throughput.py --batches 1,4,8,16 --out "$out/gpu_throughput.json" \
    >"$out/gpu_throughput.txt" 2>&1 || echo "gpu_throughput exited $?" >>"$out/gpu_throughput.txt"
# The vLLM engine on the same rows, where this machine's python has vLLM (the CUDA wheel, 336 MB with its own
# torch 2.14.0, is too large to carry: an image with vllm==0.33.0 runs this part); ratios against the run above
if "$python" -c 'import vllm' >/dev/null 2>&1; then
    timeout 400 "$python" bench/gpu_throughput.py --engine vllm --batches 1,4,8,16,32 \
        --compare "$out/gpu_throughput.json" --out "$out/gpu_throughput_vllm.json" \
        >"$out/gpu_throughput_vllm.txt" 2>&1 || echo "gpu_throughput --engine vllm exited $?" >>"$out/gpu_throughput_vllm.txt"
else
    echo "vLLM is not installed on this machine: the vLLM engine's GPU figures need an image with vllm==0.33.0" \
        >"$out/gpu_throughput_vllm.txt"
fi
tail -n 20 "$out/machine.txt" "$out/pytest-gpu.txt" "$out/gpu_throughput.txt" "$out/gpu_throughput_vllm.txt"
