#!/usr/bin/env bash
# One short GPU check, for a session or a user with a CUDA GPU (about 5 minutes on one H100):
#   bash bench/gpu_check.sh            # in an environment where `pip install -e ".[test]"` was run
# The CUDA tests (fp16/bf16 extraction, mixed-precision training, decoding), then each benchmark on the GPU.
# Nothing here has run on a GPU yet in this project's own sessions: treat a failure as news, not noise.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("GPU:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
python -m pytest -q -rs tests/test_cuda.py "tests/test_encoders.py::test_cuda_runs_fp16_and_returns_fp32" || status=1
python bench/bench_extract.py --device cuda --images 64 --batch_size 64 || status=1
python bench/bench_train.py --device cuda --quick || status=1
python bench/bench_predict.py --device cuda --quick || status=1
exit $status
