#!/usr/bin/env bash
# Create (or reuse) a virtual environment with pinned versions, CPU torch first.
#   scripts/setup_env.sh newest   -> .venv         (transformers 5.24.0, deepspeed, test tools)
#   scripts/setup_env.sh oldest   -> .venv-oldest  (transformers 4.31.0, the reference's version)
# Re-runs are no-ops unless the requirement files changed.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-newest}
python=${PYTHON:-python3}
case "$flavour" in
  newest) venv=.venv; reqs=requirements-test.txt ;;
  oldest) venv=.venv-oldest; reqs=requirements-test-oldest.txt ;;
  *) echo "setup_env.sh: unknown flavour '$flavour'; use newest or oldest" >&2; exit 2 ;;
esac
stamp="$venv/.installed-$(cat "$reqs" requirements-torch.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
echo "setting up $venv ($reqs) ..." >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unpinned torch (or a package depending on it) pulls a multi-GB CUDA build.
"${pip[@]}" -r requirements-torch.txt
"${pip[@]}" -r "$reqs" -c requirements-torch.txt
if [ "$flavour" = newest ]; then
  # deepspeed builds against the torch already installed: no build isolation, no ops prebuilt.
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation -r requirements-test-deepspeed.txt -c requirements-torch.txt
fi
rm -f "$venv"/.installed-*
touch "$stamp"
