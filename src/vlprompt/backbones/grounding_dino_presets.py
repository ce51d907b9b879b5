"""Randomly initialised Grounding DINO architectures and an offline BERT tokenizer (``random:<preset>``).

No package ships Grounding DINO weights and the hub cannot be reached here, so parameter counts, tests and smoke
runs use the real architecture with random weights.

``grounding-dino-tiny`` is the public ``IDEA-Research/grounding-dino-tiny`` architecture (about 172M parameters):
transformers' ``GroundingDinoConfig`` defaults (d_model 256, 6 encoder + 6 decoder layers, FFN 2048, 8 heads,
900 queries, 4 feature levels, 4 sampling points, max_text_len 256, two-stage, bert-base-uncased text encoder via
the default ``BertConfig``) with the Swin-T backbone that transformers' conversion script
(``models/grounding_dino/convert_grounding_dino_to_hf.py``, ``get_grounding_dino_config("...tiny")``) sets: embed_dim
96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7, image size 224, out_indices [2, 3, 4]; images resized to
shortest edge 800 / longest 1333 with ImageNet statistics, as its processor does.

``grounding-dino-micro`` / ``mm-grounding-dino-micro``: the same code paths at toy size (d_model 32, 2 + 2 layers,
16 queries, 3 feature levels, 64 px images), for tests and the toy detection demo. Their fusion layer scales start
at 1 (not 1e-4), as a trained model's are large enough for the fusion attention to matter.

The tokenizer is a small WordPiece vocabulary laid out so that the ids Grounding DINO's phrase masks are hard-wired
to are bert-base-uncased's: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, '.' 1012, '?' 1029, 'a'..'z'
1037..1062; then '##' pieces for every letter and digit (so any word tokenises) and whole words of the toy world.
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from vlprompt.backbones.grounding_dino import DetectionImageConfig, GroundingDinoBackbone

_MICRO = dict(
    backbone_config=dict(
        model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
        out_indices=[2, 3, 4],
    ),
    text_config=dict(
        model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    ),
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    encoder_attention_heads=2, decoder_attention_heads=2, num_queries=16, num_feature_levels=3,
    encoder_n_points=2, decoder_n_points=2, max_text_len=128, dropout=0.0, fusion_droppath=0.0,
)
GDINO_PRESETS: dict[str, dict] = {
    # IDEA-Research/grounding-dino-tiny (see the module docstring for where each value comes from).
    "grounding-dino-tiny": dict(
        model_type="grounding-dino",
        config=dict(
            backbone_config=dict(
                model_type="swin", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                image_size=224, out_indices=[2, 3, 4],
            ),
            text_config=dict(model_type="bert"),  # BertConfig defaults = bert-base-uncased
        ),
        image=DetectionImageConfig(800, 1333),
    ),
    "grounding-dino-micro": dict(model_type="grounding-dino", config=_MICRO, image=DetectionImageConfig(64, 128)),
    "mm-grounding-dino-micro": dict(
        model_type="mm-grounding-dino", config=_MICRO, image=DetectionImageConfig(64, 128)
    ),
}

_WORDS = (
    "a an the of and or with in on at to photo picture image object thing shape small large big tiny little "
    "one two three four five left right top bottom middle center above below next near far background "
    "filled outline striped dotted solid empty person car dog cat bird bus truck bicycle boat chair table bottle cup"
)


def bert_vocab() -> list[str]:
    """The presets' WordPiece vocabulary (see the module docstring for its id layout)."""
    from vlprompt.toyworld.world import COLOURS, SHAPES

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    vocab += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    seen = set(vocab)
    for word in [*SHAPES, *COLOURS, *_WORDS.split()]:
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    assert vocab[101] == "[CLS]" and vocab[1012] == "." and vocab[1029] == "?" and vocab[1037] == "a"
    return vocab


@lru_cache(maxsize=1)
def bert_tokenizer():
    """A ``BertTokenizer`` (lower-casing WordPiece) over :func:`bert_vocab`, built offline (cached per process)."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
        return BertTokenizer.from_pretrained(tmp)


def random_grounding_dino(preset: str = "grounding-dino-micro", seed: int = 0, **overrides):
    """A detector of a preset architecture with seeded random weights (eval mode); ``overrides`` change config
    fields (e.g. ``encoder_ffn_dim``, which sets the fusion attention's width ``E = encoder_ffn_dim // 2``)."""
    import torch
    import transformers

    from vlprompt.backbones.grounding_dino import DETECTOR_CLASSES

    if preset not in GDINO_PRESETS:
        raise ValueError(f"unknown Grounding DINO preset {preset!r}; choose one of {sorted(GDINO_PRESETS)}")
    spec = GDINO_PRESETS[preset]
    config_class = getattr(transformers, DETECTOR_CLASSES[spec["model_type"]].replace("ForObjectDetection", "Config"))
    values = dict(spec["config"])
    text = dict(values["text_config"])
    if preset.endswith("micro"):
        text["vocab_size"] = len(bert_vocab())
    values["text_config"] = text
    values.update(overrides)
    config = config_class(**values)
    model_class = getattr(transformers, DETECTOR_CLASSES[spec["model_type"]])
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if preset.endswith("micro"):
        # Fusion layer scales start at 1e-4 (a pretrained model has learned larger ones); at 1 the fusion attention,
        # where SDPT and deep fusion prompts act, visibly shapes a random micro model's outputs.
        with torch.no_grad():
            for layer in model.model.encoder.layers:
                layer.fusion_layer.vision_param.fill_(1.0)
                layer.fusion_layer.text_param.fill_(1.0)
    return model


def random_grounding_dino_backbone(preset: str, seed: int = 0, **overrides) -> GroundingDinoBackbone:
    model = random_grounding_dino(preset, seed, **overrides)
    return GroundingDinoBackbone(model, bert_tokenizer(), GDINO_PRESETS[preset]["image"], name_or_path=f"random:{preset}")


def save_random_grounding_dino(out_dir: str | Path, preset: str = "grounding-dino-micro", seed: int = 0) -> Path:
    """Write a random detector with its tokenizer and ``preprocessor_config.json``, as a hub folder would be."""
    import json

    out = Path(out_dir)
    random_grounding_dino(preset, seed).save_pretrained(out)
    bert_tokenizer().save_pretrained(out)
    image = GDINO_PRESETS[preset]["image"]
    (out / "preprocessor_config.json").write_text(json.dumps(image.processor_dict(), indent=2) + "\n")
    return out


def _register() -> None:
    from functools import partial

    from vlprompt.backbones.base import register_random_preset

    for preset in GDINO_PRESETS:
        register_random_preset(preset, partial(random_grounding_dino_backbone, preset))


_register()
