"""``random:`` BridgeTower architectures and an offline RoBERTa-style tokenizer.

- ``bridgetower-base``: the public ``BridgeTower/bridgetower-base`` architecture, which transformers'
  ``BridgeTowerConfig`` defaults describe ("a BridgeTower/bridgetower-base style configuration"): a RoBERTa-base text
  encoder (12 layers, width 768, 50,265 embeddings, 514 positions), a CLIP ViT-B/16 image encoder at 288 pixels
  (12 layers, width 768), 6 cross-modal co-attention layers of width 768 with 12 heads, "add" bridge layers.
- ``bridgetower-micro``: the same code paths at toy size (cross-modal width 32, 2 co-attention layers on 3-layer
  encoders, 64-pixel images in 16-pixel patches), for tests. Its vision width is 64 because transformers' vision
  blocks have ``width // 64`` heads.

The tokenizer is a byte-level BPE (RoBERTa's scheme: any text tokenises, nothing is unknown) with the specials
``<s> <pad> </s> <unk> <mask>`` at ids 0..4 (``<pad>`` = 1 is BridgeTower's text ``pad_token_id``, which its
position ids depend on), the 256 byte symbols, and whole-word merges of a small toy vocabulary. The base
architecture keeps RoBERTa's 50,265 embeddings (this tokenizer uses a prefix of them); the micro one has exactly as
many as the tokenizer knows.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vlprompt.backbones.base import register_random_preset
from vlprompt.backbones.bridgetower import BridgeTowerBackbone

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

BRIDGETOWER_PRESETS: dict[str, dict] = {
    "bridgetower-base": {},
    "bridgetower-micro": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "text_config": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 64},
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 3, "patch_size": 16, "image_size": 64},
    },
}

_WORDS = (
    "a an the of and or with in on at to is are there how many what which where colour color shape size "
    "left right top bottom above below next near far middle center image picture photo one two three four five "
    "yes no small large big tiny filled outline striped dotted solid empty background object objects than more "
    "fewer same different both images contain contains shows show each every"
)


def _toy_words() -> list[str]:
    from vlprompt.toyworld.world import COLOURS, SHAPES

    seen: dict[str, None] = {}
    for word in [*SHAPES, *COLOURS, *_WORDS.split()]:
        seen.setdefault(word, None)
    return list(seen)


def byte_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The presets' vocabulary and merges (see the module docstring for the layout); deterministic."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    # Each word, bare (at a text's start) and after the byte-level space marker "Ġ", becomes one token: its pieces
    # under the merges so far are joined left to right by new merges, ranked after every earlier one, so no later
    # word's merges can split it again.
    for word in _toy_words():
        for form in (word, "Ġ" + word):
            pieces = _apply_merges(list(form), ranks)
            current = pieces[0]
            for piece in pieces[1:]:
                ranks.setdefault((current, piece), len(ranks))
                current += piece
                vocab.setdefault(current, len(vocab))
    return vocab, sorted(ranks, key=ranks.__getitem__)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not ranked:
            break
        _, i = min(ranked)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


@lru_cache(maxsize=1)
def roberta_tokenizer():
    """A ``RobertaTokenizer`` over :func:`byte_bpe_vocab`, built offline (cached per process)."""
    from transformers import RobertaTokenizer

    vocab, merges = byte_bpe_vocab()
    return RobertaTokenizer(vocab=vocab, merges=merges)


def random_bridgetower(preset: str = "bridgetower-micro", seed: int = 0, with_itm_head: bool = False, **overrides):
    """A ``BridgeTowerModel`` of a preset architecture with seeded random weights (eval mode); with ``with_itm_head``
    a ``BridgeTowerForImageAndTextRetrieval`` (the base model plus its image-text matching head)."""
    import torch
    from transformers import BridgeTowerConfig, BridgeTowerForImageAndTextRetrieval, BridgeTowerModel

    if preset not in BRIDGETOWER_PRESETS:
        raise ValueError(f"unknown BridgeTower preset {preset!r}; choose one of {sorted(BRIDGETOWER_PRESETS)}")
    values = {**BRIDGETOWER_PRESETS[preset], **overrides}
    if preset == "bridgetower-micro":
        values["text_config"] = {**values["text_config"], "vocab_size": len(roberta_tokenizer())}
    config = BridgeTowerConfig(**values)
    torch.manual_seed(seed)
    model_class = BridgeTowerForImageAndTextRetrieval if with_itm_head else BridgeTowerModel
    return model_class(config).eval()


def random_bridgetower_backbone(preset: str, seed: int = 0, **overrides) -> BridgeTowerBackbone:
    return BridgeTowerBackbone(random_bridgetower(preset, seed, **overrides), roberta_tokenizer(),
                               name_or_path=f"random:{preset}")  # fmt: skip


def save_random_bridgetower(out_dir: str | Path, preset: str = "bridgetower-micro", seed: int = 0,
                            with_itm_head: bool = False) -> Path:  # fmt: skip
    """Write a random BridgeTower (optionally with its matching head) and its tokenizer, as a hub folder would be."""
    out = Path(out_dir)
    random_bridgetower(preset, seed, with_itm_head=with_itm_head).save_pretrained(out)
    roberta_tokenizer().save_pretrained(out)
    return out


for _name in BRIDGETOWER_PRESETS:
    register_random_preset(_name, lambda _name=_name: random_bridgetower_backbone(_name))
