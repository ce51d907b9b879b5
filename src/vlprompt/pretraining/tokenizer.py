"""A small CLIP-format BPE tokenizer for a closed vocabulary, loadable by ``transformers.CLIPTokenizer``.

The vocabulary is the 256 byte-level characters of CLIP's BPE (plain and with the end-of-word marker ``</w>``),
every merge that spells a known word left to right, and the two special tokens. Known words become one token;
anything else still tokenizes, into pieces. It is CLIP's tokenizer format exactly, so a model trained with it loads
through the same ``from_pretrained`` path as any CLIP checkpoint, at a few hundred KB instead of a 49k-token table.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from vlprompt.backbones.presets import _bytes_to_unicode

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pre-tokenizer, restricted to lower-case ASCII


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct pre-tokenized words of ``texts`` (lower-cased), in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in _WORD.findall(text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def _merges_for(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``word</w>`` from its characters."""
    chars = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = chars[0]
    for nxt in chars[1:]:
        merges.append((current, nxt))
        current = current + nxt
    return merges


def write_closed_vocab_tokenizer(out_dir: str | Path, texts: Iterable[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in words_of(texts):
        if len(word) < 2 or not all(c in known for c in word):
            continue
        for a, b in _merges_for(word):
            merged = a + b
            if merged not in known:
                merges.append((a, b))
                vocab.append(merged)
                known.add(merged)
    vocab += list(SPECIAL_TOKENS)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return out


def closed_vocab_tokenizer(out_dir: str | Path, texts: Iterable[str]):
    from transformers import CLIPTokenizer

    write_closed_vocab_tokenizer(out_dir, texts)
    return CLIPTokenizer.from_pretrained(str(out_dir))
