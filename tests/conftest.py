"""Shared test set-up: repo on sys.path, private HF module cache, clean fast-path environment."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
for path in (str(REPO), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

# transformers copies remote code into HF_MODULES_CACHE (read when it is first imported): keep
# the suite's copies away from the user's cache and from earlier runs (removed at exit).
_HF_MODULES = tempfile.mkdtemp(prefix="chatglm-tests-hf-modules-")
atexit.register(shutil.rmtree, _HF_MODULES, ignore_errors=True)
os.environ["HF_MODULES_CACHE"] = _HF_MODULES
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402

FAST_PATH_ENV = (
    "CHATGLM_ATTENTION",
    "CHATGLM_RMSNORM",
    "CHATGLM_KV_CACHE",
    "EXE_MODE",
    "CHATGLM_GRAPH_BACKEND",
    "CHATGLM_QUANT_KERNEL",
    "CHATGLM_PREFILL_CHUNK",
    "CHATGLM_LINEAR",
    "CHATGLM_CPU_WEIGHTS",
    "CHATGLM_HUGE_PAGES",
    "CHATGLM_INT4_DEQUANT",
    "CHATGLM_DOT_PREFETCH",
    "CHATGLM_DOT_TILES",
)


@pytest.fixture(autouse=True)
def _clean_fast_path_env(monkeypatch):
    """A developer's shell settings must not change what a test exercises."""
    for name in FAST_PATH_ENV:
        monkeypatch.delenv(name, raising=False)


# A tiny SentencePiece model shaped like chatglm3's tokenizer.model (unk=0, bos=1, eos=2, no pad
# piece, byte fallback, whitespace kept), trained once per session in about a second.
def _corpus(seed: int = 0) -> list[str]:
    # No "sop"/"eop" substrings, so no SentencePiece piece shadows a command token.
    words = (
        "the quick brown fox jumps over lazy dog hello world weather today model token "
        "language learning machine answer question tool call result city"
    ).split()
    chinese = ["你好，世界", "今天天气怎么样", "北京是中国的首都", "我喜欢机器学习", "请介绍一下你自己"]
    rng = random.Random(seed)
    lines = []
    for _ in range(300):
        lines.append(
            " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice([".", "?", " ,"])
        )
        lines.append(rng.choice(chinese) + "。" + rng.choice(chinese))
    return lines


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(out / "tiny"),
        # byte_fallback alone reserves 256 pieces; the rest are learned merges.
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return out / "tiny.model"


@pytest.fixture(scope="module")
def npu_module():
    """A separately imported modeling_chatglm that saw the torch_npu stand-in (tests/npu_reference.py)."""
    from npu_reference import import_model_module, install_fake_torch_npu

    monkeypatch = pytest.MonkeyPatch()
    install_fake_torch_npu(monkeypatch)
    yield import_model_module()
    monkeypatch.undo()


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset before and after a test (graph-mode tests count their compiles).
    Modules use it with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
