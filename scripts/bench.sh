#!/usr/bin/env bash
# The benchmark command: set up .venv once, then run benchmark_chatglm.py with your arguments
# (none: the built-in random-weights preset on whatever device is here).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh newest
exec .venv/bin/python benchmark_chatglm.py "$@"
