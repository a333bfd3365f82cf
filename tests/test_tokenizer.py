"""ChatGLMTokenizer against a tiny SentencePiece model trained on the fly.

The model mirrors chatglm3's tokenizer.model where it matters: unk=0, bos=1, eos=2, no pad piece,
byte fallback, a dummy-prefix "▁", and newlines and runs of spaces kept as they are. Every expected
id below comes from that SentencePiece model or from the documented command-token order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from packaging import version
from transformers import AutoTokenizer
from transformers.utils import PaddingStrategy

REPO_ROOT = Path(__file__).resolve().parents[1]

# Documented order of the command tokens appended after the SentencePiece vocabulary.
COMMAND_ORDER = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天北京的天气怎么样？",
    "mixed 中文 and English\nsecond line\n\n  indented   spaces",
    "tabs\tand trailing space ",
    "rare chars: ☃ ü 𝄞",
]


@pytest.fixture(scope="session")
def sp(sp_model_path) -> spm.SentencePieceProcessor:
    proc = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    assert not any(proc.piece_to_id(tok) != proc.unk_id() for tok in COMMAND_ORDER)
    return proc


def _write_tokenizer_dir(path: Path, sp_model_path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model_path, path / "tokenizer.model")
    shutil.copyfile(REPO_ROOT / "tokenization_chatglm.py", path / "tokenization_chatglm.py")
    cfg = {
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "tokenizer_class": "ChatGLMTokenizer",
        **config,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, sp_model_path) -> Path:
    return _write_tokenizer_dir(tmp_path_factory.mktemp("tok") / "chatglm3-tiny", sp_model_path)


@pytest.fixture
def tokenizer(tok_dir):
    # Fresh per test: some tests change attributes such as padding_side.
    return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)


def _cmd(sp, name: str) -> int:
    return sp.get_piece_size() + COMMAND_ORDER.index(name)


def _prefix(sp) -> list[int]:
    return [_cmd(sp, "[gMASK]"), _cmd(sp, "sop")]


# ---- vocabulary -------------------------------------------------------------------------------


def test_command_tokens_follow_sentencepiece_vocab_in_documented_order(tokenizer, sp):
    n = sp.get_piece_size()
    assert tokenizer.vocab_size == n + len(COMMAND_ORDER)
    assert len(tokenizer) == tokenizer.vocab_size
    vocab = tokenizer.get_vocab()
    assert len(vocab) == tokenizer.vocab_size
    for i, name in enumerate(COMMAND_ORDER):
        assert tokenizer.get_command(name) == n + i
        assert tokenizer.convert_tokens_to_ids(name) == n + i
        assert tokenizer.convert_ids_to_tokens(n + i) == name
        assert vocab[name] == n + i
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(n))
    with pytest.raises(ValueError):
        tokenizer.get_command("<|nobody|>")


def test_eos_pad_unk_bos_ids_come_from_sentencepiece(tokenizer, sp):
    assert tokenizer.eos_token_id == sp.eos_id() == 2
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == sp.unk_id() == 0
    assert tokenizer.get_command("<bos>") == sp.bos_id() == 1
    assert tokenizer.get_command("<eos>") == tokenizer.eos_token_id
    assert tokenizer.get_command("<pad>") == tokenizer.get_command("<unk>") == tokenizer.pad_token_id
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == ("</s>", "<unk>", "<unk>")
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_input_names == ["input_ids", "attention_mask", "position_ids"]


def test_ids_past_the_vocab_have_no_text(tokenizer, sp):
    # The checkpoint pads its embedding (65024 > 64798); converters walk those ids too.
    assert tokenizer._convert_id_to_token(tokenizer.vocab_size + 5) == ""
    assert tokenizer.tokenizer.sp_model.get_piece_size() == sp.get_piece_size()


# ---- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_text_ids_equal_raw_sentencepiece_ids(tokenizer, sp, text):
    assert tokenizer.tokenize(text) == sp.encode_as_pieces(text)
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tokenizer.encode(text) == _prefix(sp) + sp.encode(text)


def test_sequence_pair_ends_with_eos(tokenizer, sp):
    out = tokenizer("first", "second", return_special_tokens_mask=True)
    assert out["input_ids"] == _prefix(sp) + sp.encode("first") + sp.encode("second") + [sp.eos_id()]
    assert out["special_tokens_mask"] == [1, 1] + [0] * (len(out["input_ids"]) - 3) + [1]


def test_command_tokens_in_text_are_plain_text_unless_encode_special_tokens(tok_dir, sp):
    text = "<|user|>\nhi[gMASK]there"
    plain = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    assert plain.encode(text, add_special_tokens=False) == sp.encode(text)

    special = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True, encode_special_tokens=True)
    expected = [_cmd(sp, "<|user|>")] + sp.encode("\nhi") + [_cmd(sp, "[gMASK]")] + sp.encode("there")
    assert special.encode(text, add_special_tokens=False) == expected


# ---- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_decode_spells_out_prefix_like_the_original(tokenizer):
    # The original decodes the whole piece list at once: the prefix stays, and the first word
    # keeps the space its dummy-prefix "▁" stands for.
    ids = tokenizer.encode("hello world")
    assert tokenizer.decode(ids) == "[gMASK]sop hello world"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "[gMASK]sop hello world"


@pytest.mark.parametrize("skip", [False, True])
def test_decode_keeps_role_tokens_and_drops_bos_eos_pad(tokenizer, sp, skip):
    assistant = _cmd(sp, "<|assistant|>")
    ids = [sp.unk_id(), sp.bos_id(), assistant, *sp.encode("tool\nresult"), assistant, *sp.encode("answer")]
    ids.append(sp.eos_id())
    text = tokenizer.decode(torch.tensor(ids), skip_special_tokens=skip)
    assert text == "<|assistant|> tool\nresult<|assistant|> answer"


def test_clean_up_tokenization_spaces_is_off_by_default(tokenizer, sp):
    ids = sp.encode("hello , world")
    assert tokenizer.decode(ids) == "hello , world"
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=True) == "hello, world"


# ---- chat prompts -----------------------------------------------------------------------------


def _message(sp, role: str, content: str, metadata: str = "") -> list[int]:
    return [_cmd(sp, f"<|{role}|>")] + sp.encode(metadata + "\n") + sp.encode(content)


def test_build_chat_input_single_query_layout(tokenizer, sp):
    out = tokenizer.build_chat_input("你好")
    expected = _prefix(sp) + _message(sp, "user", "你好") + [_cmd(sp, "<|assistant|>")]
    assert set(out.keys()) == {"input_ids", "attention_mask", "position_ids"}
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["position_ids"].tolist() == [list(range(len(expected)))]


def test_build_chat_input_history_tools_metadata_and_role(tokenizer, sp):
    tools = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": "北京"}}]
    history = [
        {"role": "system", "content": "You are a helpful assistant.", "tools": tools},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "get_weather", "content": "call(city='北京')"},
    ]
    out = tokenizer.build_chat_input("sunny", history=history, role="observation")
    system = "You are a helpful assistant." + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    expected = (
        _prefix(sp)
        + _message(sp, "system", system)
        + _message(sp, "user", "北京天气")
        + _message(sp, "assistant", "call(city='北京')", metadata="get_weather")
        + _message(sp, "observation", "sunny")
        + [_cmd(sp, "<|assistant|>")]
    )
    assert out["input_ids"].tolist() == [expected]
    assert tokenizer.build_single_message("user", "", "北京天气") == _message(sp, "user", "北京天气")
    with pytest.raises(ValueError):
        tokenizer.build_single_message("narrator", "", "once upon a time")


# ---- padding ----------------------------------------------------------------------------------

BATCH = ["a", "longer text with more words"]


def _rows(sp, texts):
    return [_prefix(sp) + sp.encode(t) for t in texts]


def test_batch_is_left_padded_with_position_ids(tokenizer, sp):
    out = tokenizer(BATCH, padding=True, return_tensors="pt")
    rows = _rows(sp, BATCH)
    assert len(rows[0]) < len(rows[1])
    width = len(rows[1])
    assert out["input_ids"].shape == (2, width)
    for i, row in enumerate(rows):
        pad = width - len(row)
        assert out["input_ids"][i].tolist() == [sp.unk_id()] * pad + row
        assert out["attention_mask"][i].tolist() == [0] * pad + [1] * len(row)
        assert out["position_ids"][i].tolist() == [0] * pad + list(range(len(row)))


def _right_by_attribute(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    tok.padding_side = "right"
    return tok(BATCH, padding=True, return_tensors="pt")


def _right_by_from_pretrained(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True, padding_side="right")
    return tok(BATCH, padding=True, return_tensors="pt")


def _right_by_call_keyword(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    if version.parse(transformers.__version__) < version.parse("4.45"):
        # Before 4.45 __call__ has no padding_side=; pad() hands it to our _pad directly.
        encoded = [tok(text)["input_ids"] for text in BATCH]
        out = tok.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        width = out["input_ids"].shape[1]
        rows = [
            tok._pad(
                {"input_ids": ids},
                max_length=width,
                padding_strategy=PaddingStrategy.MAX_LENGTH,
                padding_side="right",
            )
            for ids in encoded
        ]
        out = {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}
    else:
        out = tok(BATCH, padding=True, padding_side="right", return_tensors="pt")
    assert tok.padding_side == "left"
    return out


@pytest.mark.parametrize("ask", [_right_by_attribute, _right_by_from_pretrained, _right_by_call_keyword])
def test_right_padding_when_explicitly_asked(tok_dir, sp, ask):
    out = ask(tok_dir)
    rows = _rows(sp, BATCH)
    width = max(map(len, rows))
    for i, row in enumerate(rows):
        pad = width - len(row)
        assert out["input_ids"][i].tolist() == row + [sp.unk_id()] * pad
        assert out["attention_mask"][i].tolist() == [1] * len(row) + [0] * pad
        assert out["position_ids"][i].tolist() == list(range(len(row))) + [0] * pad


def test_pad_to_max_length_multiple_and_new_keywords(tokenizer, sp):
    ids = _prefix(sp) + sp.encode("a")
    out = tokenizer.pad(
        {"input_ids": [ids]}, padding="max_length", max_length=len(ids) + 1, pad_to_multiple_of=8
    )
    width = -(-(len(ids) + 1) // 8) * 8
    assert out["input_ids"] == [[sp.unk_id()] * (width - len(ids)) + ids]
    assert out["position_ids"] == [[0] * (width - len(ids)) + list(range(len(ids)))]

    # transformers >= 4.45 passes padding_side=, later releases may add more keywords.
    single = tokenizer._pad(
        {"input_ids": list(ids)},
        max_length=len(ids) + 2,
        padding_strategy=PaddingStrategy.MAX_LENGTH,
        padding_side="right",
        a_keyword_from_the_future=True,
    )
    assert single["input_ids"] == ids + [sp.unk_id()] * 2
    assert single["position_ids"] == list(range(len(ids))) + [0, 0]


# ---- save / load ------------------------------------------------------------------------------


def test_save_pretrained_round_trip_gives_identical_ids(tmp_path, tok_dir, sp_model_path):
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True, encode_special_tokens=True)
    tok.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    again = AutoTokenizer.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)

    assert type(again).__name__ == "ChatGLMTokenizer"
    assert again.encode_special_tokens is True
    assert again.padding_side == "left"
    assert again.get_vocab() == tok.get_vocab()
    assert again(TEXTS, padding=True)["input_ids"] == tok(TEXTS, padding=True)["input_ids"]
    assert again.encode("<|user|>\nhi") == tok.encode("<|user|>\nhi")
    assert (
        again.build_chat_input("hi")["input_ids"].tolist() == tok.build_chat_input("hi")["input_ids"].tolist()
    )
    assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_save_vocabulary_copies_the_sentencepiece_file(tokenizer, tmp_path, sp_model_path):
    (path,) = tokenizer.save_vocabulary(str(tmp_path), filename_prefix="x")
    assert Path(path) == tmp_path / "x-tokenizer.model"
    assert Path(path).read_bytes() == sp_model_path.read_bytes()


def test_loads_a_config_that_names_special_and_added_tokens(tmp_path, sp_model_path, sp, tok_dir):
    # Later chatglm3 configs list eos/pad/unk and an added_tokens_decoder; the original's
    # read-only token properties made such configs fail to load on newer transformers.
    n = sp.get_piece_size()
    added = {
        str(_cmd(sp, name)): {"content": name, "special": False, "normalized": True}
        for name in ("[gMASK]", "sop", "<|user|>", "<|assistant|>")
    }
    path = _write_tokenizer_dir(
        tmp_path / "with-config",
        sp_model_path,
        eos_token="</s>",
        pad_token="<unk>",
        unk_token="<unk>",
        padding_side="left",
        added_tokens_decoder=added,
    )
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    ref = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    assert tok.vocab_size == n + len(COMMAND_ORDER)
    assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.unk_id())
    assert tok(TEXTS, padding=True)["input_ids"] == ref(TEXTS, padding=True)["input_ids"]
    assert (
        tok.build_chat_input("hi")["input_ids"].tolist() == ref.build_chat_input("hi")["input_ids"].tolist()
    )


# ---- the real chatglm3-6b tokenizer.model (../shared/tokenizer) --------------------------------

REAL_MODEL = REPO_ROOT.parent / "shared" / "tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not REAL_MODEL.is_file():
        pytest.skip(
            f"the real chatglm3-6b tokenizer.model is not at {REAL_MODEL} (a clone without ../shared)"
        )
    path = _write_tokenizer_dir(tmp_path_factory.mktemp("real") / "chatglm3-6b", REAL_MODEL)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


@pytest.fixture(scope="module")
def real_special(real):
    path = Path(real.vocab_file).parent
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, encode_special_tokens=True)


def test_real_model_has_the_published_command_ids(real):
    assert real.vocab_size == 64798
    assert [real.get_command(name) for name in COMMAND_ORDER] == list(range(64789, 64798))
    assert (real.eos_token_id, real.pad_token_id, real.unk_token_id) == (2, 0, 0)


@pytest.mark.parametrize(
    "text, ids",
    [
        ("你好", [64790, 64792, 36474, 54591]),
        (
            "[Round 1]\n\n问：你好\n\n答：",
            [
                64790,
                64792,
                790,
                30951,
                517,
                30910,
                30939,
                30996,
                13,
                13,
                54761,
                31211,
                39701,
                13,
                13,
                55437,
                31211,
            ],
        ),
        (
            "def main():\n    print('hello world')\t# greeting",
            [64790, 64792, 884, 1301, 9427, 13, 296, 4466, 2029, 15616, 30914, 993, 3387, 12, 31010, 30174],
        ),
    ],
)
def test_real_model_ids_equal_the_published_ones(real, text, ids):
    # Published by li-plus/chatglm.cpp's tests; THUDM's tokenizer reproduces them.
    assert real(text)["input_ids"] == ids


def test_real_model_chat_input_equals_the_published_ids(real):
    assert real.build_chat_input("你好", history=[])["input_ids"].tolist() == [
        [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    ]


@pytest.mark.parametrize("literal", ["</s>", "<unk>", "<s>"])
def test_control_token_spelling_in_user_text_stays_text(real, literal):
    text = f"tell me {literal} something"
    sp = real.tokenizer.sp_model
    ids = real.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert not {0, 1, 2} & set(ids)
    assert real.decode(ids) == text
    chat = real.build_chat_input(text)["input_ids"][0].tolist()
    assert not {0, 1, 2} & set(chat)
    batch = real([text, "hi"], padding=True)
    assert batch["input_ids"][0] == [64790, 64792] + sp.encode(text)


def test_encode_special_tokens_never_cuts_ordinary_words(real_special):
    sp = real_special.tokenizer.sp_model
    text = "I study philosophy and people stop by"
    assert real_special.tokenize(text) == sp.encode_as_pieces(text)
    assert "▁philosophy" in real_special.tokenize(text)


def test_encode_special_tokens_recognises_role_and_mask_tokens(real_special):
    ids = real_special.encode("<|user|>\nhi[gMASK] sop eop<|assistant|>", add_special_tokens=False)
    sp = real_special.tokenizer.sp_model
    assert ids == [64795, *sp.encode("\nhi"), 64790, *sp.encode(" sop eop"), 64796]


@pytest.mark.parametrize("text", TEXTS)
def test_real_model_text_ids_equal_sentencepiece_and_decode_back(real, text):
    sp = real.tokenizer.sp_model
    assert real.encode(text) == [64790, 64792] + sp.encode(text)
    assert real.decode(real.encode(text, add_special_tokens=False)) == text
