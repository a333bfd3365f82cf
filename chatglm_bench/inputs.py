"""Inputs: the prompts of a real checkpoint, tokenized and left-padded, or random token ids."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .cli import UsageError
from .measure import Batch

DEFAULT_PROMPTS = (
    "晚上睡不着应该怎么办",
    "How do I make a good cup of coffee?",
    "请介绍一下长城的历史。",
    "Explain the difference between prefill and decode in LLM inference.",
)


@dataclass
class Prompts:
    texts: Optional[List[str]]  # None for random ids
    repeat: bool


def read_prompts(prompts: Optional[List[str]], prompts_file: Optional[str], repeat: bool) -> Prompts:
    """--prompt texts, then --prompts-file lines; none given: the built-in prompts, cycled."""
    texts: List[str] = list(prompts or [])
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that were not UTF-8 arrive as lone surrogates
            try:
                shown = text.encode("utf-8", "surrogateescape")  # the bytes as they were typed
            except UnicodeEncodeError:
                shown = text.encode("utf-8", "backslashreplace")
            raise UsageError(
                f"--prompt {shown!r} is not valid UTF-8 text; pass it in UTF-8 (check the terminal's locale)"
            ) from None
    if prompts_file:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt.
            lines = Path(prompts_file).read_text(encoding="utf-8-sig").splitlines()
        except OSError as error:
            raise UsageError(f"cannot read --prompts-file {prompts_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise UsageError(
                f"--prompts-file {prompts_file} is not UTF-8 text (bad byte at offset {error.start}); "
                "save it as UTF-8 (e.g. iconv -t UTF-8)"
            ) from None
        texts += [line for line in lines if line.strip()]
        if not texts:
            raise UsageError(f"--prompts-file {prompts_file} has no prompts (one per line)")
    if not texts:
        return Prompts(list(DEFAULT_PROMPTS), repeat=True)  # built-in prompts always cycle
    return Prompts(texts, repeat=repeat)


def tokenize_batch(tokenizer, prompts: Prompts, batch_size: int, input_max_len: int):
    texts = prompts.texts
    if batch_size > len(texts) and not prompts.repeat:
        raise UsageError(
            f"--batch_size {batch_size} needs {batch_size} prompts but {len(texts)} were given; "
            "add prompts or pass --repeat-prompts"
        )
    rows = [texts[i % len(texts)] for i in range(batch_size)]
    encoded = [tokenizer.build_chat_input(text)["input_ids"][0].tolist() for text in rows]
    longest = max(len(ids) for ids in encoded)
    if longest > input_max_len:
        raise UsageError(
            f"a prompt has {longest} tokens, more than --input_max_len {input_max_len}; raise "
            "--input_max_len or shorten the prompt"
        )
    batch = tokenizer.pad(
        {"input_ids": encoded}, padding="max_length", max_length=input_max_len, return_tensors="pt"
    )
    return Batch(batch["input_ids"], batch["attention_mask"], batch["position_ids"])


def random_batch(batch_size: int, input_max_len: int, vocab: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed + batch_size)
    ids = torch.randint(3, vocab, (batch_size, input_max_len), generator=generator)
    positions = torch.arange(input_max_len).repeat(batch_size, 1)
    return Batch(ids, torch.ones_like(ids), positions)
