#!/usr/bin/env bash
# On a machine with a CUDA GPU: the gpu-marked tests, then the extraction pass on the GPU against the CPU.
# One command, about 3-5 minutes (under 8): bash bench/gpu_check.sh   (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print(torch.__version__, torch.cuda.get_device_name(0), 'bf16' if torch.cuda.is_bf16_supported() else 'fp16')"
timeout 240 "$PYTHON" -m pytest -q -m gpu tests/test_devices.py
# the same 5,000 generated images at the backbone's native 224 px: GPU (autocast) and CPU images/s
timeout 150 "$PYTHON" bench/bench_scale.py --sizes 5000 --image-size 224 --device cuda --workers 8 --old-limit 200
timeout 120 "$PYTHON" bench/bench_scale.py --sizes 500 --image-size 224 --device cpu --old-limit 200
