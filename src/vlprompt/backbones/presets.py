"""Randomly initialised CLIP configs of real architectures, and the real CLIP tokenizer built offline.

No package ships real CLIP weights, so tests, benchmarks and parameter counts use these: the architecture (and so
every parameter count and cost) is exactly the public one; only the weights are random.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

PRESETS: dict[str, dict] = {
    # The public openai/clip-vit-base-patch16 architecture (149.6M parameters).
    "vit-b-16": dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16,
        ),
        projection_dim=512,
    ),
    # openai/clip-vit-base-patch32.
    "vit-b-32": dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=32,
        ),
        projection_dim=512,
    ),
    # Tiny: same code paths, for tests and smoke runs.
    "tiny": dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=24,
    ),
}

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894: the merges OpenAI's tokenizer uses


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (used by CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def find_clip_bpe() -> Path:
    """The BPE merges file shipped in the ``clip-anytorch`` wheel (its package is located, never imported)."""
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / CLIP_BPE_FILE
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        "The CLIP BPE vocabulary was not found. Install it with `pip install --no-deps clip-anytorch` "
        "(scripts/setup.sh does), or pass a model folder that has its own tokenizer."
    )


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write OpenAI CLIP's tokenizer (vocab.json + merges.txt) so ``CLIPTokenizer.from_pretrained`` loads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(find_clip_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


@lru_cache(maxsize=1)
def clip_tokenizer():
    """OpenAI's CLIP tokenizer, built offline (cached per process)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp)
        return CLIPTokenizer.from_pretrained(tmp)


def random_clip_model(preset: str = "tiny", seed: int = 0):
    """A ``CLIPModel`` of a preset architecture with seeded random weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    if preset not in PRESETS:
        raise ValueError(f"unknown CLIP preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    config = CLIPConfig(
        text_config=dict(cfg["text_config"], vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(cfg["vision_config"]),
        projection_dim=cfg["projection_dim"],
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def save_random_clip(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Save a random CLIP of a real architecture with its tokenizer and image processor, as a hub folder would be."""
    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    model = random_clip_model(preset, seed)
    model.save_pretrained(out)
    clip_tokenizer().save_pretrained(out)
    size = model.config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return out


def random_clip_backbone(preset: str, seed: int = 0):
    from vlprompt.backbones.clip import CLIPBackbone

    return CLIPBackbone(random_clip_model(preset, seed), clip_tokenizer(), None, name_or_path=f"random:{preset}")


def _register() -> None:
    from functools import partial

    from vlprompt.backbones.base import register_random_preset

    for preset in PRESETS:
        register_random_preset(preset, partial(random_clip_backbone, preset))


_register()
