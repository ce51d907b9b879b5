"""Pretraining a small ``transformers.GroundingDinoForObjectDetection`` on the toy world's multi-object scenes.

``vlprompt pretrain-toy-detector --output DIR`` rebuilds the ``embedded-detector`` model:

- **Data**: toy scenes (several objects, their boxes) drawn from the pretraining shapes only (``holdout_shapes``
  never appear, so their names are never grounded), the world's held-out colour x shape pairs and looks left out,
  rendered once into a cache (uint8 images + one object list per image).
- **Prompts**: every image's prompt is the pretraining shape names in a fresh random order,
  ``[CLS] star . circle . ... [SEP]``; each object's label is its shape's phrase in that order. Grounding DINO's
  text encoder reads every phrase on its own (attention and positions restart at each '.'), the shuffling keeps
  the rest of the model from tying a category to a place in the prompt.
- **Loss**: the detector's own (Hungarian matching, focal loss over the prompt's tokens, L1 + GIoU box losses on
  every decoder layer and on the two-stage proposals), AdamW with a linear warm-up and cosine decay.
- **Saved as** an ordinary ``GroundingDinoForObjectDetection`` folder with the offline BERT tokenizer of the
  Grounding DINO presets, ``preprocessor_config.json`` (the image size the model was trained at),
  ``pretrain_config.json``, ``pretrain_log.json`` and ``zero_shot.json``: COCO mAP of the zero-shot detector on a
  fixed clean test set of the pretraining shapes, scored by the project's detection evaluation.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vlprompt.engine.trainer import is_integer, is_number, seed_everything
from vlprompt.pretraining.clip_pretrain import pretraining_optimizer, warmup_cosine_lr

ZERO_SHOT_FILE = "zero_shot.json"
SCENE_CACHE_VERSION = 1
# Scene kinds of the pretraining images: the detection sets' mix (toydet) plus some single large objects.
DEFAULT_KINDS = {"multi": 0.5, "pair": 0.2, "count": 0.2, "single": 0.1}
# Kinds of the held-in test set: exactly the toy detection sets' mix (``corpus.write_detection_set``).
TEST_KINDS = {"multi": 0.6, "pair": 0.2, "count": 0.2}
TEST_SEED = 7919  # the evaluation scenes' seed, apart from any training seed


@dataclass
class DetectorPretrainConfig:
    n_scenes: int = 100_000
    image_size: int = 64  # the toy detection sets' size: no resize between pretraining and downstream images
    # Swin image backbone (a stage per entry of swin_depths; swin_out_indices picks the stages fed to the encoder,
    # 1 = the first, stride 4 x patch)
    swin_embed_dim: int = 32
    swin_depths: tuple[int, ...] = (1, 1, 2)
    swin_heads: tuple[int, ...] = (1, 2, 4)
    swin_window: int = 4
    swin_patch: int = 4
    swin_out_indices: tuple[int, ...] = (1, 2, 3)
    # BERT text encoder
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    # the detection transformer
    d_model: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 3
    ffn_dim: int = 128
    heads: int = 4
    num_queries: int = 20
    num_feature_levels: int = 3
    n_points: int = 4
    max_text_len: int = 128
    fusion_scale_init: float = 0.1  # starting value of the fusion layers' layer scales (transformers: 1e-4)
    # the world: shapes never shown in pretraining (scenes are drawn from the others), scene kinds, looks
    holdout_shapes: tuple[str, ...] = ("octagon", "heart", "arrow")
    kinds: dict = field(default_factory=lambda: dict(DEFAULT_KINDS))
    domains: dict = field(default_factory=lambda: {"clean": 1.0})
    hflip: bool = True
    # optimisation
    batch_size: int = 16
    steps: int = 9500
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 0.1
    # multiplies the focal class loss of every output (decoder layers, proposals) against the box losses; 1 = the
    # detector's own weighting (class 2, L1 5, GIoU 2)
    class_loss_weight: float = 1.0
    seed: int = 0
    threads: int = 1  # the shipped embedded-detector was built with one thread (weights differ in the last bits with 2)
    log_every: int = 50
    # evaluation: mAP on eval_images clean val scenes every eval_every steps (0: only at the end), and the final
    # zero-shot mAP on test_images clean test scenes
    eval_every: int = 500
    eval_images: int = 100
    test_images: int = 300
    # stop training after this many seconds of training (evaluations not counted), even if the learning-rate
    # schedule (laid out for `steps`) has not finished; 0 = no limit. For experiments: a run cut short this way
    # depends on the machine's speed, so it is not reproducible.
    time_limit_s: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("swin_depths", "swin_heads", "swin_out_indices", "holdout_shapes"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))
        problems = _check_values(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def shapes(self) -> list[str]:
        """The pretraining categories: the world's shapes minus the held-out ones, in the world's order."""
        from vlprompt.toyworld.world import SHAPES

        return [s for s in SHAPES if s not in self.holdout_shapes]


_POSITIVE_INTS = ("n_scenes", "image_size", "swin_embed_dim", "swin_window", "swin_patch", "text_width",
                  "text_layers", "text_heads", "d_model", "encoder_layers", "decoder_layers", "ffn_dim", "heads",
                  "num_queries", "num_feature_levels", "n_points", "max_text_len", "batch_size", "steps", "threads",
                  "log_every", "eval_images", "test_images")
_NON_NEGATIVE_INTS = ("warmup_steps", "seed", "eval_every")


def _check_values(config: DetectorPretrainConfig) -> list[str]:
    from vlprompt.toyworld.world import DOMAINS, HOLDOUT, KINDS, SHAPES

    problems = []
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        value = getattr(config, name)
        least = 1 if name in _POSITIVE_INTS else 0
        if not is_integer(value) or value < least:
            problems.append(f"{name} must be an integer >= {least} (got {value!r})")
    for name in ("lr", "fusion_scale_init", "class_loss_weight"):
        value = getattr(config, name)
        if not (is_number(value) and value > 0):
            problems.append(f"{name} must be a positive number (got {value!r})")
    for name in ("weight_decay", "grad_clip", "time_limit_s"):
        value = getattr(config, name)
        if not (is_number(value) and value >= 0):
            problems.append(f"{name} must be a non-negative number (got {value!r})")
    if not isinstance(config.hflip, bool):
        problems.append(f"hflip must be true or false (got {config.hflip!r})")
    for name in ("swin_depths", "swin_heads", "swin_out_indices"):
        value = getattr(config, name)
        if not isinstance(value, tuple) or not value or not all(is_integer(v) and v >= 1 for v in value):
            problems.append(f"{name} must be a non-empty list of positive integers (got {value!r})")
    unknown = [s for s in config.holdout_shapes if s not in SHAPES]
    if unknown or not isinstance(config.holdout_shapes, tuple):
        problems.append(f"holdout_shapes must name shapes of the world ({', '.join(SHAPES)}); unknown: {unknown}")
    elif len(SHAPES) - len(set(config.holdout_shapes)) < 2:
        problems.append("holdout_shapes must leave at least two shapes to pretrain on")
    for name, allowed in (("kinds", KINDS), ("domains", DOMAINS)):
        value = getattr(config, name)
        if not isinstance(value, dict) or not value:
            problems.append(f"{name} must be a mapping {{name: weight}} (got {value!r})")
            continue
        bad = [k for k in value if k not in allowed]
        if bad:
            problems.append(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
        weights = list(value.values())
        if not all(is_number(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            problems.append(f"{name} weights must be non-negative numbers with a positive sum (got {value!r})")
    if isinstance(config.domains, dict):
        held = [d for d, w in config.domains.items() if d in HOLDOUT.domains and is_number(w) and w > 0]
        if held:
            problems.append(f"domains {held} are held out of pretraining ({', '.join(HOLDOUT.domains)}); give them "
                            "weight 0")
    if config.device != "cpu" and not str(config.device).startswith("cuda"):
        problems.append(f"device must be cpu or cuda[:N] (got {config.device!r})")
    if problems:
        return problems
    if len(config.swin_depths) != len(config.swin_heads):
        problems.append(f"swin_depths {list(config.swin_depths)} and swin_heads {list(config.swin_heads)} must have "
                        "one entry per Swin stage")
    stages = len(config.swin_depths)
    if any(i > stages for i in config.swin_out_indices) or list(config.swin_out_indices) != sorted(
            set(config.swin_out_indices)):  # fmt: skip
        problems.append(f"swin_out_indices {list(config.swin_out_indices)} must be increasing stage numbers 1..{stages}")
    if config.num_feature_levels < len(config.swin_out_indices):
        problems.append(f"num_feature_levels {config.num_feature_levels} must be >= the {len(config.swin_out_indices)} "
                        "Swin stages fed to the encoder (swin_out_indices)")
    for width, heads, what in ((config.d_model, config.heads, "d_model"),
                               (config.text_width, config.text_heads, "text_width")):  # fmt: skip
        if width % heads:
            problems.append(f"{what} {width} must be a multiple of its heads {heads}")
    if config.d_model % 32:
        problems.append(f"d_model {config.d_model} must be a multiple of 32 (the encoder's input projections "
                        "normalise it in 32 groups)")
    for i, heads in enumerate(config.swin_heads):
        if (config.swin_embed_dim * 2**i) % heads:
            problems.append(f"Swin stage {i + 1} width {config.swin_embed_dim * 2**i} must be a multiple of its "
                            f"{heads} heads")
    if config.image_size % config.swin_patch:
        problems.append(f"image_size {config.image_size} must be a multiple of swin_patch {config.swin_patch}")
    if config.num_queries < 5:
        problems.append(f"num_queries must be >= 5, the most objects a toy scene holds (got {config.num_queries})")
    if config.batch_size > config.n_scenes:
        problems.append(f"batch_size {config.batch_size} is larger than the scene cache (n_scenes {config.n_scenes})")
    return problems


# ------------------------------------------------------------------------------------------------ the model
def build_detector(config: DetectorPretrainConfig, vocab_size: int):
    """A randomly initialised ``GroundingDinoForObjectDetection`` of the configured size (seeded)."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    detector_config = GroundingDinoConfig(
        backbone_config=dict(
            model_type="swin", embed_dim=config.swin_embed_dim, depths=list(config.swin_depths),
            num_heads=list(config.swin_heads), window_size=config.swin_window, patch_size=config.swin_patch,
            image_size=config.image_size, out_indices=list(config.swin_out_indices), drop_path_rate=0.0,
        ),
        text_config=dict(
            model_type="bert", hidden_size=config.text_width, num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads, intermediate_size=4 * config.text_width,
            max_position_embeddings=64, vocab_size=vocab_size,
        ),
        d_model=config.d_model, encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
        encoder_ffn_dim=config.ffn_dim, decoder_ffn_dim=config.ffn_dim, encoder_attention_heads=config.heads,
        decoder_attention_heads=config.heads, num_queries=config.num_queries,
        num_feature_levels=config.num_feature_levels, encoder_n_points=config.n_points,
        decoder_n_points=config.n_points, max_text_len=config.max_text_len, two_stage=True, auxiliary_loss=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, fusion_dropout=0.0, fusion_droppath=0.0,
        text_enhancer_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    model = GroundingDinoForObjectDetection(detector_config)
    with torch.no_grad():
        for layer in model.model.encoder.layers:
            layer.fusion_layer.vision_param.fill_(config.fusion_scale_init)
            layer.fusion_layer.text_param.fill_(config.fusion_scale_init)
    return model


def image_config_of(config: DetectorPretrainConfig):
    """How downstream images reach the model: resized to the pretraining size (shortest edge), ImageNet statistics."""
    from vlprompt.backbones.grounding_dino import DetectionImageConfig

    return DetectionImageConfig(config.image_size, 2 * config.image_size)


# ------------------------------------------------------------------------------------------------ the scenes
def _draw_scene(seed: int, index: int, shapes: Sequence[str], kinds: dict, domains: dict):
    from vlprompt.toyworld.world import HOLDOUT, sample_scene

    rng = np.random.default_rng([seed, index, 0x67646E6F])  # "gdno"
    scene = sample_scene(rng, dict(kinds), shape=tuple(shapes), holdout=HOLDOUT)
    keys = list(domains)
    weights = np.asarray([domains[k] for k in keys], dtype=float)
    domain = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
    return scene, domain


def _render_chunk(args: tuple) -> list:
    from vlprompt.toyworld.render import boxes, render_array
    from vlprompt.toyworld.world import SHAPES

    path, seed, size, shapes, kinds, domains, lo, hi = args
    images = np.load(path, mmap_mode="r+")
    objects = []
    for i in range(lo, hi):
        scene, domain = _draw_scene(seed, i, shapes, kinds, domains)
        images[i] = render_array(scene, size, domain)
        objects.append([[SHAPES.index(str(b["category"])), *b["bbox"], b["colour"], b["fill"]]  # type: ignore[misc]
                        for b in boxes(scene, size)])
    images.flush()
    del images
    return objects


def scene_cache(config: DetectorPretrainConfig, cache_dir: str | Path) -> Path:
    """Render the pretraining scenes once into ``folder/{images.npy, objects.json, meta.json}``; reuse a complete
    cache of the same settings. Objects per image: ``[shape index, x, y, w, h, colour, fill]`` (pixels)."""
    from vlprompt.toyworld.world import WORLD_VERSION

    meta = {"version": SCENE_CACHE_VERSION, "world_version": WORLD_VERSION, "n": config.n_scenes,
            "size": config.image_size, "seed": config.seed, "shapes": config.shapes, "kinds": config.kinds,
            "domains": config.domains}  # fmt: skip
    digest = _digest(meta)
    folder = Path(cache_dir).expanduser() / f"detector-scenes-n{config.n_scenes}-s{config.image_size}-{digest}"
    if _meta_matches(folder, meta):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        n, size = config.n_scenes, config.image_size
        images = tmp / "images.npy"
        np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        step = max(1, min(2000, -(-n // max(config.threads, 1))))
        chunks = [(str(images), config.seed, size, config.shapes, config.kinds, config.domains, lo, min(lo + step, n))
                  for lo in range(0, n, step)]  # fmt: skip
        if config.threads > 1 and len(chunks) > 1:
            import multiprocessing as mp

            with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(config.threads) as pool:
                parts = pool.map(_render_chunk, chunks)
        else:
            parts = [_render_chunk(c) for c in chunks]
        (tmp / "objects.json").write_text(json.dumps([o for part in parts for o in part]), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: the cache is complete
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_scene_cache(folder: Path) -> tuple[np.ndarray, list]:
    images = np.load(folder / "images.npy", mmap_mode="r")
    objects = json.loads((folder / "objects.json").read_text(encoding="utf-8"))
    if len(objects) != len(images):
        raise ValueError(f"{folder}: {len(images)} images but {len(objects)} object lists; delete and rebuild it")
    return images, objects


def _digest(meta: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]


def _meta_matches(folder: Path, meta: dict) -> bool:
    try:
        return bool(json.loads((folder / "meta.json").read_text(encoding="utf-8")) == meta)
    except (OSError, ValueError):
        return False


def evaluation_sets(config: DetectorPretrainConfig, cache_dir: str | Path) -> Path:
    """The fixed clean val / test scenes of the pretraining shapes as a COCO folder (``val/``, ``test/``; the
    toy detection sets' layout and scene mix), independent of the training seed."""
    from vlprompt.toyworld.corpus import write_detection_set
    from vlprompt.toyworld.world import HOLDOUT

    shapes = config.shapes
    tag = _digest({"shapes": shapes, "size": config.image_size, "val": config.eval_images, "test": config.test_images,
                   "version": SCENE_CACHE_VERSION})  # fmt: skip
    folder = Path(cache_dir).expanduser() / f"detector-eval-s{config.image_size}-{tag}"
    for offset, (split, n) in enumerate((("val", config.eval_images), ("test", config.test_images))):
        if not (folder / split / "annotations.json").is_file():
            write_detection_set(folder / split, n, seed=TEST_SEED * 1000 + offset, size=config.image_size,
                                holdout=HOLDOUT, kinds=TEST_KINDS, shapes=shapes)  # fmt: skip
    return folder


SHIFTED_LOOKS = ("sketch", "inverted", "tinted")  # the world's held-out rendering domains


def shifted_sets(config: DetectorPretrainConfig, cache_dir: str | Path) -> dict[str, tuple[Path, list[str]]]:
    """Test sets the pretraining never saw, as COCO folders with the categories to prompt for:
    ``look:<domain>`` (the held-in test scenes rendered in a held-out look), ``novel_names`` (scenes of the
    held-out shapes only, prompted with their never-grounded names) and ``fill_phrases`` (scenes of four
    pretraining shapes whose categories are fill + shape, "striped circle": a fine attribute never grounded)."""
    from vlprompt.toyworld.corpus import write_detection_set
    from vlprompt.toyworld.world import HOLDOUT

    n, size = config.test_images, config.image_size
    out: dict[str, tuple[Path, list[str]]] = {}
    root = Path(cache_dir).expanduser()
    for look in SHIFTED_LOOKS:
        tag = _digest({"shapes": config.shapes, "size": size, "test": n, "look": look, "version": SCENE_CACHE_VERSION})
        folder = root / f"detector-shift-{look}-s{size}-{tag}"
        if not (folder / "test" / "annotations.json").is_file():
            # the held-in test split's scenes (same seed), in another look
            write_detection_set(folder / "test", n, seed=TEST_SEED * 1000 + 1, size=size, holdout=HOLDOUT,
                                kinds=TEST_KINDS, domain=look, shapes=config.shapes)  # fmt: skip
        out[f"look:{look}"] = (folder, config.shapes)
    novel = [s for s in config.holdout_shapes]
    if novel:
        tag = _digest({"shapes": novel, "size": size, "test": n, "version": SCENE_CACHE_VERSION})
        folder = root / f"detector-shift-novel-s{size}-{tag}"
        if not (folder / "test" / "annotations.json").is_file():
            write_detection_set(folder / "test", n, seed=TEST_SEED * 1000 + 2, size=size, holdout=HOLDOUT,
                                kinds=TEST_KINDS, shapes=novel)  # fmt: skip
        out["novel_names"] = (folder, novel)
    fine_shapes = [sh for sh in FINE_SHAPES if sh in config.shapes]
    if fine_shapes:
        tag = _digest({"shapes": fine_shapes, "size": size, "test": n, "version": SCENE_CACHE_VERSION})
        folder = root / f"detector-shift-fill-s{size}-{tag}"
        if not (folder / "complete").is_file():
            write_detection_set(folder / "test", n, seed=TEST_SEED * 1000 + 3, size=size, holdout=HOLDOUT,
                                kinds=TEST_KINDS, shapes=fine_shapes)  # fmt: skip
            names = _fill_categories(folder / "test" / "annotations.json")
            (folder / "complete").write_text(json.dumps(names) + "\n")
        out["fill_phrases"] = (folder, json.loads((folder / "complete").read_text()))
    return out


# Shapes of the fine-attribute set: each object's category is its fill and shape ("striped circle"), words the
# pretraining never grounds.
FINE_SHAPES = ("circle", "square", "triangle", "star")


def _fill_categories(path: Path) -> list[str]:
    """Rewrite a toy COCO file's categories as fill + shape phrases (every fill x shape of its objects' shapes);
    returns the category names in id order."""
    from vlprompt.toyworld.world import FILLS

    data = json.loads(path.read_text(encoding="utf-8"))
    shape_of = {c["id"]: c["name"] for c in data["categories"]}
    shapes = [sh for sh in FINE_SHAPES if sh in {shape_of[a["category_id"]] for a in data["annotations"]}]
    names = [f"{fill} {shape}" for shape in shapes for fill in FILLS]
    ids = {name: i + 1 for i, name in enumerate(names)}
    for ann in data["annotations"]:
        ann["category_id"] = ids[f"{ann['attributes']['fill']} {shape_of[ann['category_id']]}"]
    data["categories"] = [{"id": i, "name": name} for name, i in ids.items()]
    path.write_text(json.dumps(data), encoding="utf-8")
    return names


# ------------------------------------------------------------------------------------------------ batches
class PromptBuilder:
    """Token ids of category prompts ``[CLS] name . name . [SEP]`` for any order of the categories."""

    def __init__(self, tokenizer, names: Sequence[str]) -> None:
        self.names = list(names)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.dot_id = tokenizer.convert_tokens_to_ids(".")
        self.pad_id = tokenizer.pad_token_id
        self.words = [list(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in self.names]

    def ids(self, order: Sequence[int]) -> list[int]:
        out = [self.cls_id]
        for c in order:
            out += self.words[c] + [self.dot_id]
        return out + [self.sep_id]

    def batch(self, orders: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.ids(o) for o in orders]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


def normalise(images_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def make_batch(images: np.ndarray, objects: list, index: np.ndarray, flips: Sequence[bool],
               orders: Sequence[Sequence[int]], shape_to_category: dict[int, int], prompts: PromptBuilder,
               image_config) -> dict[str, Any]:  # fmt: skip
    """Model inputs and DETR-style labels of the scenes ``index``: ``class_labels`` = the phrase index of each
    object's shape in that image's prompt order, ``boxes`` = normalised (cx, cy, w, h)."""
    size = images.shape[1]
    pixels = normalise(images[index], image_config.mean, image_config.std)
    labels = []
    for row, (i, flip, order) in enumerate(zip(index.tolist(), flips, orders)):
        place = {c: k for k, c in enumerate(order)}
        cls, boxes = [], []
        for shape, x, y, w, h, *_ in objects[i]:
            x0, y0 = max(x, 0.0) / size, max(y, 0.0) / size
            x1, y1 = min(x + w, size) / size, min(y + h, size) / size
            if x1 <= x0 or y1 <= y0:
                continue
            cx = (x0 + x1) / 2
            cls.append(place[shape_to_category[shape]])
            boxes.append([1 - cx if flip else cx, (y0 + y1) / 2, x1 - x0, y1 - y0])
        labels.append({"class_labels": torch.tensor(cls, dtype=torch.long),
                       "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)})  # fmt: skip
        if flip:
            pixels[row] = pixels[row].flip(-1)
    input_ids, attention_mask = prompts.batch(orders)
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sample_batch(generator: torch.Generator, n_scenes: int, batch_size: int, n_categories: int,
                 hflip: bool) -> tuple[np.ndarray, list[bool], list[list[int]]]:  # fmt: skip
    """Which scenes, which of them flipped, and each one's prompt order (one draw of ``generator``)."""
    index = torch.randint(0, n_scenes, (batch_size,), generator=generator).numpy()
    flips = (torch.rand(batch_size, generator=generator) < 0.5).tolist() if hflip else [False] * batch_size
    orders = [torch.randperm(n_categories, generator=generator).tolist() for _ in range(batch_size)]
    return index, flips, orders


# ------------------------------------------------------------------------------------------------ evaluation
def zero_shot_map(model, tokenizer, image_config, folder: Path, split: str, categories: Sequence[str],
                  batch_size: int = 50) -> dict[str, Any]:  # fmt: skip
    """COCO box AP of the detector with the category names as its prompt on ``folder``'s split, through the
    project's own path (``det_zeroshot`` + ``tasks.detection.evaluate_detection``). Leaves the model in eval mode
    with its parameters frozen (the backbone adapter freezes what it wraps)."""
    from vlprompt.backbones.grounding_dino import GroundingDinoBackbone
    from vlprompt.data.coco import load_detection_dataset
    from vlprompt.methods.detection import DetZeroShot, DetZeroShotConfig
    from vlprompt.tasks.detection import evaluate_detection

    splits = load_detection_dataset(f"coco:{folder}", categories=list(categories))
    backbone = GroundingDinoBackbone(model, tokenizer, image_config, name_or_path="pretraining")
    method = DetZeroShot(backbone, DetZeroShotConfig(), splits.categories)
    result = evaluate_detection(method, splits.split(split), splits.category_ids, splits.categories,
                                batch_size=batch_size)  # fmt: skip
    return {k: result[k] for k in ("mAP", "AP50", "AP75", "n")}


def weighted_loss(parts: dict[str, torch.Tensor], detector_config, class_weight: float) -> torch.Tensor:
    """The detector's total loss (class 2, L1 and GIoU by its config, over every decoder layer and the two-stage
    proposals) with the class terms multiplied by ``class_weight``."""
    weights = {"loss_ce": 2.0 * class_weight, "loss_bbox": detector_config.bbox_loss_coefficient,
               "loss_giou": detector_config.giou_loss_coefficient}  # fmt: skip
    total = None
    for key, value in parts.items():
        base = next((b for b in weights if key == b or key.startswith(b + "_")), None)
        if base is not None:
            total = value * weights[base] if total is None else total + value * weights[base]
    assert total is not None
    return total


def save_detector(model, tokenizer, image_config, output: Path) -> None:
    """An ordinary model folder: weights and config, the tokenizer, and the image preprocessing the model expects
    (``preprocessor_config.json``, which the project's Grounding DINO loader reads)."""
    model.requires_grad_(True)  # the evaluation adapter froze it; a loaded model should not differ from a fresh one
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / "preprocessor_config.json").write_text(json.dumps(image_config.processor_dict(), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ training
def pretrain_detector(config: DetectorPretrainConfig, output: str | Path, cache_dir: str | Path,
                      log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Train and save the detector folder; returns its path. Deterministic for a given config and thread count
    on CPU."""
    from vlprompt.backbones.grounding_dino_presets import bert_tokenizer
    from vlprompt.toyworld.world import SHAPES

    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images, objects = load_scene_cache(scene_cache(config, cache_dir))
    eval_folder = evaluation_sets(config, cache_dir)
    log(f"scenes: {len(images)} ready in {time.perf_counter() - start:.0f}s; eval sets in {eval_folder}")

    tokenizer = bert_tokenizer()
    categories = config.shapes
    prompts = PromptBuilder(tokenizer, categories)
    shape_to_category = {SHAPES.index(s): k for k, s in enumerate(categories)}
    image_config = image_config_of(config)
    device = torch.device(config.device)
    model = build_detector(config, len(tokenizer)).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; {len(categories)} categories; prompt {len(prompts.ids(range(len(categories))))} "
        "tokens")  # fmt: skip
    named = [(n, p) for n, p in model.named_parameters()]
    optimizer = pretraining_optimizer(named, config.lr, config.weight_decay)
    # betas of DETR training (0.9, 0.999) suit its noisy matching loss better than CLIP's 0.98
    for group in optimizer.param_groups:
        group["betas"] = (0.9, 0.999)
        group["eps"] = 1e-8

    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    train_start = time.perf_counter()
    eval_seconds = 0.0
    sums: dict[str, float] = {}
    count = 0
    step = 0
    for step in range(config.steps):
        model.requires_grad_(True)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, config.lr, config.warmup_steps, config.steps)
        index, flips, orders = sample_batch(generator, len(images), config.batch_size, len(categories), config.hflip)
        batch = make_batch(images, objects, index, flips, orders, shape_to_category, prompts, image_config)
        labels = [{k: v.to(device) for k, v in t.items()} for t in batch.pop("labels")]
        out = model(**{k: v.to(device) for k, v in batch.items()}, labels=labels)
        loss = out.loss if config.class_loss_weight == 1 else weighted_loss(out.loss_dict, model.config,
                                                                            config.class_loss_weight)  # fmt: skip
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower lr or raise grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        parts = out.loss_dict
        for key, value in (("loss", loss), ("loss_ce", parts["loss_ce"]), ("loss_bbox", parts["loss_bbox"]),
                           ("loss_giou", parts["loss_giou"]), ("loss_ce_enc", parts.get("loss_ce_enc"))):  # fmt: skip
            if value is not None:
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        count += 1
        last = step == config.steps - 1
        elapsed = time.perf_counter() - train_start - eval_seconds
        out_of_time = config.time_limit_s > 0 and elapsed >= config.time_limit_s
        if (step + 1) % config.log_every == 0 or last or out_of_time:
            record = {"step": step + 1, **{k: v / count for k, v in sums.items()}, "lr": optimizer.param_groups[0]["lr"],
                      "train_s": elapsed}  # fmt: skip
            history.append(record)
            log(f"step {step + 1}/{config.steps} loss {record['loss']:.3f} (ce {record['loss_ce']:.3f} l1 "
                f"{record['loss_bbox']:.3f} giou {record['loss_giou']:.3f}) {elapsed / (step + 1):.2f} s/step "
                f"({elapsed:.0f}s)")  # fmt: skip
            sums, count = {}, 0
        if config.eval_every and (step + 1) % config.eval_every == 0 and not last and not out_of_time:
            t0 = time.perf_counter()
            result = zero_shot_map(model, tokenizer, image_config, eval_folder, "val", categories)
            eval_seconds += time.perf_counter() - t0
            evals.append({"step": step + 1, "train_s": elapsed, **result})
            log(f"  val mAP {result['mAP']:.1f} AP50 {result['AP50']:.1f} ({time.perf_counter() - t0:.0f}s)")
        if out_of_time:
            log(f"time limit {config.time_limit_s:.0f}s reached after {step + 1} steps")
            break
    train_seconds = time.perf_counter() - train_start - eval_seconds

    model.eval().to("cpu")
    val = zero_shot_map(model, tokenizer, image_config, eval_folder, "val", categories)
    evals.append({"step": step + 1, "train_s": train_seconds, **val})
    test = zero_shot_map(model, tokenizer, image_config, eval_folder, "test", categories)
    log(f"zero-shot on {test['n']} clean test scenes of the {len(categories)} pretraining shapes: mAP "
        f"{test['mAP']:.1f} AP50 {test['AP50']:.1f} AP75 {test['AP75']:.1f} (val mAP {val['mAP']:.1f})")
    shifted = {}
    for name, (folder, names) in shifted_sets(config, cache_dir).items():
        shifted[name] = zero_shot_map(model, tokenizer, image_config, folder, "test", names)
        log(f"  shifted {name}: mAP {shifted[name]['mAP']:.1f} AP50 {shifted[name]['AP50']:.1f}")
    save_detector(model, tokenizer, image_config, output)
    (output / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (output / "pretrain_log.json").write_text(json.dumps({"train": history, "val": evals}, indent=1) + "\n")
    zero_shot = {"split": "test", "categories": categories, "steps_done": step + 1, "train_s": train_seconds,
                 **test, "shifted": shifted}  # fmt: skip
    (output / ZERO_SHOT_FILE).write_text(json.dumps(zero_shot, indent=1) + "\n")
    log(f"saved to {output} after {time.perf_counter() - start:.0f}s")
    return output
