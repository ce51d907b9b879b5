"""Randomly initialised SigLIP architectures and an offline SigLIP-style tokenizer (``random:<preset>``).

No package ships SigLIP weights or its SentencePiece model and the hub cannot be reached here, so parameter counts,
tests and smoke runs use the real architecture with random weights.

``siglip-base-patch16-224`` is the public ``google/siglip-base-patch16-224`` architecture (about 203M parameters):
both towers 768 wide, 12 layers, 12 heads, MLP 3072; a 32,000-token vocabulary and a 64-token text context;
224 px images in 16 px patches; attention-pooling image head. ``siglip-tiny`` / ``siglip2-tiny`` (NaFlex
``Siglip2Model``) run the same code paths at toy size for tests; their text head projects 32 -> 48 so the text and
image widths differ, as the adapter must handle.

The tokenizer stands in for SigLIP's SentencePiece one, with the same conventions: a unigram model over
"▁"-prefixed pieces (whole common words, then single letters and digits, so any word tokenises), lower-cased text
with punctuation removed (SigLIP's ``canonicalize_text``), ``</s>`` appended to every text, ``<pad>`` 0 /
``</s>`` 1 / ``<unk>`` 2 as in SigLIP's vocabulary, and padding with ``</s>`` (SigLIP's tokenizer's pad token).
"""
from __future__ import annotations

import string
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from vlprompt.backbones.siglip import Siglip2Backbone, SiglipBackbone, square_image_processor

_TEXT = dict(vocab_size=32000, pad_token_id=1, eos_token_id=1, bos_token_id=None)
_TINY_TEXT = dict(
    _TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64, projection_size=48,
)
_TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, patch_size=8)

SIGLIP_PRESETS: dict[str, dict[str, Any]] = {
    # google/siglip-base-patch16-224.
    "siglip-base-patch16-224": dict(
        model_type="siglip",
        text_config=dict(
            _TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16,
        ),
    ),
    "siglip-tiny": dict(model_type="siglip", text_config=_TINY_TEXT, vision_config=dict(_TINY_VISION, image_size=32)),
    # NaFlex: a 4x4 grid of 8 px patches, used as 32 px squares.
    "siglip2-tiny": dict(
        model_type="siglip2", text_config=_TINY_TEXT, vision_config=dict(_TINY_VISION, num_patches=16)
    ),
}

_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in SigLIP's SentencePiece vocabulary
_WORDS = (
    "a an the of and or with in on at to is this that photo picture image photograph rendering drawing sketch "
    "painting close up low resolution bright dark cropped blurry good bad clean dirty small large big tiny little "
    "one two three four left right top bottom middle center background object thing shape type kind "
    "person man woman child people animal pet cat dog bird fish horse cow sheep car bus truck bicycle boat plane "
    "train chair table bottle cup flower tree house road sea lake river forest field crop highway industrial "
    "residential pasture annual permanent vegetation herbaceous satellite aerial view"
)
# Log-probabilities: a whole word beats spelling it out, so known words are one token and others are letters.
_WORD_SCORE, _LETTER_SCORE, _WORD_START_SCORE = -1.0, -5.5, -5.0


def siglip_vocab() -> list[tuple[str, float]]:
    """The presets' unigram vocabulary: (piece, log-probability), specials first."""
    from vlprompt.toyworld.world import COLOURS, SHAPES

    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _SPECIALS]
    symbols = string.ascii_lowercase + string.digits
    pieces.append(("▁", _WORD_START_SCORE - 1.0))
    pieces += [("▁" + c, _WORD_START_SCORE) for c in symbols]
    pieces += [(c, _LETTER_SCORE) for c in symbols]
    seen = {p for p, _ in pieces}
    for word in [*_WORDS.split(), *SHAPES, *COLOURS]:
        for part in word.lower().split():
            if "▁" + part not in seen:
                pieces.append(("▁" + part, _WORD_SCORE))
                seen.add("▁" + part)
    return pieces


@lru_cache(maxsize=4)
def siglip_tokenizer(context_length: int = 64) -> Any:
    """A SigLIP-style ``PreTrainedTokenizerFast`` over :func:`siglip_vocab`, built offline (cached)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    eos = _SPECIALS.index("</s>")
    backend = Tokenizer(Unigram(siglip_vocab(), unk_id=_SPECIALS.index("<unk>"), byte_fallback=False))
    punctuation = "[" + "".join("\\" + c for c in string.punctuation) + "]"
    backend.normalizer = normalizers.Sequence([
        normalizers.Lowercase(),
        normalizers.Replace(Regex(punctuation), ""),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
        model_max_length=context_length,
    )  # fmt: skip


def random_siglip_model(preset: str = "siglip-tiny", seed: int = 0) -> Any:
    """A ``SiglipModel`` (``Siglip2Model`` for siglip2 presets) of a preset architecture, seeded random weights."""
    import torch
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    if preset not in SIGLIP_PRESETS:
        raise ValueError(f"unknown SigLIP preset {preset!r}; choose one of {sorted(SIGLIP_PRESETS)}")
    spec = SIGLIP_PRESETS[preset]
    config_class, model_class = (Siglip2Config, Siglip2Model) if spec["model_type"] == "siglip2" else (
        SiglipConfig, SiglipModel)  # fmt: skip
    config = config_class(text_config=dict(spec["text_config"]), vision_config=dict(spec["vision_config"]))
    torch.manual_seed(seed)
    return model_class(config).eval()


def _adapter(preset: str) -> type[SiglipBackbone]:
    return Siglip2Backbone if SIGLIP_PRESETS[preset]["model_type"] == "siglip2" else SiglipBackbone


def random_siglip_backbone(preset: str, seed: int = 0) -> SiglipBackbone:
    """The adapter over :func:`random_siglip_model`, with the offline tokenizer and a SigLIP image processor."""
    model = random_siglip_model(preset, seed)
    tokenizer = siglip_tokenizer(model.config.text_config.max_position_embeddings)
    backbone = _adapter(preset)(model, tokenizer, None, name_or_path=f"random:{preset}")
    backbone.image_processor = square_image_processor(backbone.image_size)  # SigLIP's statistics, not OpenAI's
    return backbone


def save_random_siglip(out_dir: str | Path, preset: str = "siglip-tiny", seed: int = 0) -> Path:
    """Write a random SigLIP with its tokenizer and image processor, as a hub folder would be."""
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    model = random_siglip_model(preset, seed)
    # Saving compares the config with a default SigLIP config, whose text token ids are CLIP's (49406/49407) and
    # outside SigLIP's own 32k vocabulary; transformers then warns about that default, not about this model.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
    siglip_tokenizer(model.config.text_config.max_position_embeddings).save_pretrained(out)
    if SIGLIP_PRESETS[preset]["model_type"] == "siglip2":
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        vision = model.config.vision_config
        processor = Siglip2ImageProcessorPil(patch_size=vision.patch_size, max_num_patches=vision.num_patches)
    else:
        processor = square_image_processor(model.config.vision_config.image_size)
    processor.save_pretrained(out)
    return out


def _register() -> None:
    from vlprompt.backbones.base import register_random_preset

    for preset in SIGLIP_PRESETS:
        register_random_preset(preset, partial(random_siglip_backbone, preset))


_register()
