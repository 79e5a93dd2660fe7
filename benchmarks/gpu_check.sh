#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (the `device` tool), run from the repository root:
#   bash benchmarks/gpu_check.sh
# It uses the machine's own Python with torch (CUDA), typer, rich and safetensors, without installing.
set -uo pipefail
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, typer, rich, safetensors; print('torch', torch.__version__, 'typer', typer.__version__, 'cuda', torch.cuda.is_available())"
echo "== GPU and engine tests"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py tests/test_predict.py
echo "== host-to-device"
$PY benchmarks/gpu_transfer.py
echo "== throughput, --device cuda (2 GB per checkpoint: 8 GB runs)"
(cd benchmarks && $PY throughput.py --device cuda --work /tmp/farcast-bench --gb-per-checkpoint 2)
echo "== throughput, --device cpu on the same machine, for the ratio"
(cd benchmarks && $PY throughput.py --device cpu --work /tmp/farcast-bench --gb-per-checkpoint 2)
