"""ChatGLM3 tokenizer: a drop-in for the checkpoint's own ``tokenization_chatglm.py``.

The vocabulary is the checkpoint's SentencePiece model (``tokenizer.model``) followed by nine
command tokens that do not exist inside SentencePiece and are appended after its last id, in this
order: ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>``.
For chatglm3-6b that makes ``[gMASK]`` = 64790, ``sop`` = 64792, ``<|user|>`` = 64795 and so on.
Every model input starts with the prefix ``[gMASK] sop``; a chat turn is
``<|role|> metadata "\\n" content`` and a prompt ends with ``<|assistant|>``.

Batches are padded on the LEFT by default, and padding also produces ``position_ids`` (0 on pad
slots, then 0..n-1 over the real tokens): ChatGLM generates from the last column, so right padding
silently gives wrong answers. The tokenizer works with transformers 4.31 through 5.x: it sets up
SentencePiece before the base class's constructor (which already queries the vocabulary), and its
``_pad`` accepts the ``padding_side`` keyword (and any later additions) that newer releases pass.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from sentencepiece import SentencePieceProcessor
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import PaddingStrategy

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
COMMAND_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *ROLE_TOKENS)


class SPTokenizer:
    """The SentencePiece model plus the command tokens appended after its vocabulary.

    Kept under the original's name and attribute names (``sp_model``, ``n_words``, ``bos_id``,
    ``eos_id``, ``pad_id``, ``special_tokens``, ``index_special_tokens``) because downstream tools
    (llama.cpp's converter, fine-tuning scripts) reach into ``tokenizer.tokenizer``.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.sp_model = SentencePieceProcessor(model_file=model_path)
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        # SentencePiece has no pad piece here: padding reuses <unk>, as in the original.
        self.pad_id: int = self.sp_model.unk_id()
        base = self.sp_model.get_piece_size()
        self.special_tokens: dict[str, int] = {tok: base + i for i, tok in enumerate(COMMAND_TOKENS)}
        self.index_special_tokens: dict[int, str] = {i: tok for tok, i in self.special_tokens.items()}
        self.n_words: int = base + len(COMMAND_TOKENS)
        # With encode_special_tokens=True, the role tokens and the bracketed mask tokens written as
        # text become their own ids. "sop" and "eop" are left out: they are ordinary letters
        # inside words ("philosophy", "people"), and cutting words there changes the text's ids.
        recognised = [tok for tok in COMMAND_TOKENS if tok.startswith(("<|", "["))]
        self.role_special_token_expression = "|".join(re.escape(tok) for tok in recognised)

    def tokenize(self, s: str, encode_special_tokens: bool = False) -> list[str]:
        if not encode_special_tokens:
            return self.sp_model.EncodeAsPieces(s)
        pieces: list[str] = []
        for chunk in re.split(f"({self.role_special_token_expression})", s):
            if chunk in self.special_tokens:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self.sp_model.EncodeAsPieces(chunk))
        return pieces

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"expected str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, t: list[int]) -> str:
        """Ids to text, command tokens spelled out; each plain run is decoded on its own."""
        text, run = [], []
        for i in t:
            if i in self.index_special_tokens:
                text.append(self.sp_model.decode(run))
                text.append(self.index_special_tokens[i])
                run = []
            else:
                run.append(i)
        text.append(self.sp_model.decode(run))
        return "".join(text)

    def decode_tokens(self, tokens: list[str]) -> str:
        return self.sp_model.DecodePieces(tokens)

    def convert_token_to_id(self, token: str) -> int:
        # Command tokens win over a SentencePiece piece of the same spelling, as in the original.
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.PieceToId(token)

    def convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if 0 <= index < self.sp_model.get_piece_size():
            return self.sp_model.IdToPiece(index)
        # Ids past the vocabulary (the checkpoint pads its embedding to 65024) have no text.
        return ""


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM3 tokenizer over ``tokenizer.model``, with chat helpers and left padding.

    Special tokens in the Hugging Face sense are ``</s>`` (eos, id 2) and ``<unk>`` (unk and pad,
    id 0); the command tokens (``[gMASK]``, ``sop``, the role tokens, ...) are ordinary vocabulary
    entries reached with :meth:`get_command`, and ``decode`` spells them out even with
    ``skip_special_tokens=True``, so a reply can still be split on ``<|assistant|>``.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        encode_special_tokens: bool = False,
        **kwargs: Any,
    ):
        self.name = "GLMTokenizer"
        self.vocab_file = vocab_file
        # Must exist before super().__init__: recent transformers call get_vocab() and
        # _add_tokens() from the base constructor.
        self.tokenizer = SPTokenizer(vocab_file)
        self.special_tokens = {
            "<bos>": self.tokenizer.bos_id,
            "<eos>": self.tokenizer.eos_id,
            "<unk>": self.tokenizer.pad_id,
            "<pad>": self.tokenizer.pad_id,
        }
        self.encode_special_tokens = encode_special_tokens
        sp = self.tokenizer.sp_model
        kwargs.setdefault("eos_token", sp.IdToPiece(self.tokenizer.eos_id))
        kwargs.setdefault("unk_token", sp.IdToPiece(self.tokenizer.pad_id))
        kwargs.setdefault("pad_token", sp.IdToPiece(self.tokenizer.pad_id))
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            encode_special_tokens=encode_special_tokens,
            **kwargs,
        )

    # ---- vocabulary -------------------------------------------------------------------------

    def get_command(self, token: str) -> int:
        """Id of ``<bos>``/``<eos>``/``<unk>``/``<pad>`` or of a command token such as ``<|user|>``."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token not in self.tokenizer.special_tokens:
            raise ValueError(f"{token!r} is not a special token for {self.name}")
        return self.tokenizer.special_tokens[token]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.get_added_vocab())
        return vocab

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Text to pieces. User text never turns into control ids.

        The base class would first cut the text at every special token's spelling, so a literal
        ``</s>`` or ``<unk>`` in a prompt would become eos/unk (and, on transformers 5.x, strip the
        space before the next word). Here only tokens a user added with ``add_tokens`` (ids past
        the vocabulary) are matched in text; everything else goes to SentencePiece, which keeps
        ``</s>`` as its characters. Command tokens follow ``encode_special_tokens``.
        """
        kwargs.pop("split_special_tokens", None)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        added = sorted(
            (tok for tok, index in self.get_added_vocab().items() if index >= self.vocab_size),
            key=len,
            reverse=True,
        )
        if not added:
            return self._tokenize(text)
        pieces: list[str] = []
        for chunk in re.split("(" + "|".join(re.escape(tok) for tok in added) + ")", text):
            if chunk in added:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._tokenize(chunk))
        return pieces

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenizer.tokenize(text, encode_special_tokens=self.encode_special_tokens)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.tokenizer.decode_tokens(tokens)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Ids to text the way the original renders them, on every transformers version.

        bos/eos/pad never produce text, whatever ``skip_special_tokens`` says. Command tokens are
        spelled out in place (SentencePiece passes pieces it does not know through verbatim), and
        everything is decoded as ONE piece sequence, so the space that starts a word after a role
        token survives.
        """
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        silent = {self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id}
        added = self.added_tokens_decoder
        pieces = []
        for index in map(int, ids):
            if index in silent:
                # An empty piece, not nothing: like the original, it ends a run of byte pieces.
                pieces.append("")
            elif index in skipped:
                continue
            elif index >= self.vocab_size and index in added:
                pieces.append(str(added[index]))
            else:
                pieces.append(self._convert_id_to_token(index))
        text = self.convert_tokens_to_string(pieces)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy ``tokenizer.model`` into ``save_directory`` (or to that path, if it is a file name)."""
        if os.path.isdir(save_directory):
            name = (f"{filename_prefix}-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
            target = os.path.join(save_directory, name)
        else:
            target = save_directory
        with open(self.vocab_file, "rb") as src:
            blob = src.read()
        with open(target, "wb") as dst:
            dst.write(blob)
        return (target,)

    # ---- model inputs -----------------------------------------------------------------------

    def get_prefix_tokens(self) -> list[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``[gMASK] sop A`` for one sequence, ``[gMASK] sop A B </s>`` for a pair."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1] * len(self.get_prefix_tokens()) + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + ids of ``metadata + "\\n"`` + ids of ``message`` (no prefix).

        ``role`` is system, user, assistant or observation; anything else raises ValueError.
        """
        header = [self.get_command(f"<|{role}|>")] + self.tokenizer.encode(f"{metadata}\n")
        return header + self.tokenizer.encode(message)

    def build_chat_input(
        self, query: str, history: list[dict] | None = None, role: str = "user"
    ) -> BatchEncoding:
        """Prompt for one chat turn as a batch of one: ``input_ids``, ``attention_mask``, ``position_ids``.

        ``history`` holds ``{"role", "content", "metadata"?}`` dicts; a system message may carry
        ``"tools"``, which are appended to its content as indented JSON.
        """
        ids: list[int] = []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        ids = self.build_inputs_with_special_tokens(ids)
        return self.pad({"input_ids": [ids]}, return_tensors="pt")

    def _pad(
        self,
        encoded_inputs: dict[str, Any] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> dict:
        """Pad one encoded sequence and give it ChatGLM's ``position_ids``.

        Left (the default): ``position_ids = [0] * pad + [0, 1, ..., n-1]``. Right, if asked for
        through ``padding_side`` here or on the tokenizer: ``[0, ..., n-1] + [0] * pad``. Keywords
        that later transformers releases add are accepted and ignored.
        """
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names

        ids = encoded_inputs[self.model_input_names[0]]
        length = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        pad = 0
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None:
            pad = max(max_length - length, 0)

        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(length))
        if pad == 0:
            return encoded_inputs

        fills = {
            self.model_input_names[0]: self.pad_token_id,
            "attention_mask": 0,
            "position_ids": 0,
            "token_type_ids": self.pad_token_type_id,
            "special_tokens_mask": 1,
        }
        for key, fill in fills.items():
            if key in encoded_inputs:
                filler = [fill] * pad
                seq = list(encoded_inputs[key])
                encoded_inputs[key] = filler + seq if side == "left" else seq + filler
        return encoded_inputs
