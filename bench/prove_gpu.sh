#!/usr/bin/env bash
# The GPU path proved in one run, on a machine with a CUDA device: the suite's CUDA tests, then the benchmarks
# (bench/gpu.py: batch 1 against the memory roofline, 64 sequences against transformers' generate, the planner's
# predicted step against the measured one). Python packages the machine lacks are installed first, e.g. from
# wheels: pip install --no-index --no-deps --target DIR wheels/*.whl && export PYTHONPATH=DIR.
#   bash bench/prove_gpu.sh [SHAPE]      SHAPE: llama3-8b (default) or smollm2-135m (minutes, not tens of them)
set -uo pipefail
cd "$(dirname "$0")/.."
shape="${1:-llama3-8b}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
python3 -m pytest -q -p no:warnings -rs tests/test_cuda.py "tests/test_sampler.py::test_cuda_agrees_with_cpu" || status=1
python3 -m bench.gpu --device cuda:0 --shape "$shape" || status=1
exit $status
