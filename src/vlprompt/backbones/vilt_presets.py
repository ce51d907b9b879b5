"""``random:`` ViLT architectures: the public ViLT-B/32 (``dandelin/vilt-b32-mlm``'s config) and a micro one for
tests, with seeded random weights and the offline BERT tokenizer (bert-base-uncased's vocabulary layout)."""
from __future__ import annotations

from pathlib import Path

from vlprompt.backbones.base import register_random_preset
from vlprompt.backbones.grounding_dino_presets import bert_tokenizer, bert_vocab
from vlprompt.backbones.vilt import ViltBackbone

# ViltConfig's defaults are ViLT-B/32's (12 blocks of width 768, 384-pixel images in 32-pixel patches, 40 text
# positions); the micro preset keeps the layout at a size tests run in milliseconds.
VILT_PRESETS = {
    "vilt-b32": {},
    "vilt-micro": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "image_size": 64, "patch_size": 16},
}


def random_vilt(preset: str = "vilt-micro", seed: int = 0, **overrides):
    """A ``ViltModel`` of a preset architecture with seeded random weights (eval mode)."""
    import torch
    from transformers import ViltConfig, ViltModel

    if preset not in VILT_PRESETS:
        raise ValueError(f"unknown ViLT preset {preset!r}; choose one of {sorted(VILT_PRESETS)}")
    # The public architecture keeps bert-base-uncased's 30,522 embeddings (the offline tokenizer uses a prefix of
    # them); the micro one has only as many as that tokenizer knows.
    vocab = {"vocab_size": len(bert_vocab())} if preset == "vilt-micro" else {}
    config = ViltConfig(**{**vocab, **VILT_PRESETS[preset], **overrides})
    torch.manual_seed(seed)
    return ViltModel(config).eval()


def random_vilt_backbone(preset: str, seed: int = 0, **overrides) -> ViltBackbone:
    return ViltBackbone(random_vilt(preset, seed, **overrides), bert_tokenizer(), name_or_path=f"random:{preset}")


def save_random_vilt(out_dir: str | Path, preset: str = "vilt-micro", seed: int = 0) -> Path:
    """Write a random ViLT with its tokenizer, as a hub folder would be."""
    out = Path(out_dir)
    random_vilt(preset, seed).save_pretrained(out)
    bert_tokenizer().save_pretrained(out)
    return out


for _name in VILT_PRESETS:
    register_random_preset(_name, lambda _name=_name: random_vilt_backbone(_name))
