"""Shared test set-up: repo on sys.path, private HF module cache, clean fast-path environment."""

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
for path in (str(REPO), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

# transformers copies remote code into HF_MODULES_CACHE (read when it is first imported): keep
# the suite's copies away from the user's cache and from earlier runs.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="chatglm-tests-hf-modules-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FAST_PATH_ENV = (
    "CHATGLM_ATTENTION",
    "CHATGLM_RMSNORM",
    "CHATGLM_KV_CACHE",
    "EXE_MODE",
    "CHATGLM_GRAPH_BACKEND",
)


@pytest.fixture(autouse=True)
def _clean_fast_path_env(monkeypatch):
    """A developer's shell settings must not change what a test exercises."""
    for name in FAST_PATH_ENV:
        monkeypatch.delenv(name, raising=False)
