#!/usr/bin/env bash
# The test command (README, .ci/run): set up both environments, then run the suite on the newest
# transformers and its transformers-facing half on the oldest (4.31.0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh newest
scripts/setup_env.sh oldest
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
echo "== transformers 5.24.0: full suite" >&2
.venv/bin/python -m pytest -q "$@"
echo "== transformers 4.31.0: model, tokenizer, generate/chat, scripts" >&2
.venv-oldest/bin/python -m pytest -q tests/test_golden.py tests/test_model_features.py tests/test_chat.py tests/test_decode_graph.py tests/test_quantize.py tests/test_cpu_dot.py \
  tests/test_tokenizer.py tests/test_scripts.py tests/test_benchmark.py tests/test_reliability.py tests/test_linear_backend.py "$@"
