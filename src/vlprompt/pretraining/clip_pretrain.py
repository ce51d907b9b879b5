"""Contrastive pretraining of a small ``transformers.CLIPModel`` on the toy world's image-caption corpus.

``vlprompt pretrain-toy --output DIR`` reproduces the embedded default model: the corpus (minus the world's
held-out colour x shape pairs and domains) is rendered once into a cache, a closed-vocabulary CLIP tokenizer is
built from the world's words, and the model is trained with CLIP's symmetric InfoNCE loss. The result is an
ordinary CLIP checkpoint folder (config, safetensors, tokenizer, image processor).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlprompt.engine.trainer import is_integer, is_number, seed_everything
from vlprompt.recipes import RECIPE_FILE

# OpenAI CLIP's normalisation statistics: the toy images are natural-ish RGB, and keeping CLIP's constants means
# the image processor config is the standard one.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PretrainConfig:
    n_pairs: int = 300_000
    image_size: int = 48  # the suite's image size: no resize between pretraining and downstream images
    patch_size: int = 12  # 4 x 4 patches: the small ViT learns shapes from these, not from 6 px ones
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 128
    context_length: int = 77  # room for deep prompts (e.g. 50 tokens) on top of a class sentence
    vocab_captions: int = 20_000  # corpus captions sampled for the tokenizer's vocabulary (besides every world word)
    batch_size: int = 256
    # Pairs per hard-negative group (see PretrainingCorpus); batches are made of whole groups. 1 = plain CLIP batches.
    group_size: int = 1
    steps: int = 10_000
    # Length groups the captions of a batch are encoded in (same features, about half the text tower's cost).
    text_buckets: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    seed: int = 0
    threads: int = 2
    log_every: int = 100
    # Where the model trains: "cpu" (the shipped weights' device, bit-reproducible) or a torch device such as "cuda".
    # A GPU run is the same recipe, not the same weights: float summation order differs.
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems = _check_pretrain_values(self)
        if problems:
            raise ValueError("; ".join(problems))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.group_size < 1 or self.batch_size % self.group_size or self.n_pairs % self.group_size:
            raise ValueError(f"group_size {self.group_size} must be >= 1 and divide batch_size {self.batch_size} "
                             f"and n_pairs {self.n_pairs}")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device {self.device!r} is not a torch device (use cpu, cuda or cuda:N)") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch sees no CUDA GPU here; use device=cpu")


_POSITIVE_INTS = ("n_pairs", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                  "text_layers", "text_heads", "embed_dim", "context_length", "batch_size", "group_size", "steps",
                  "text_buckets", "threads", "log_every")
_NON_NEGATIVE_INTS = ("vocab_captions", "warmup_steps", "seed")


def _check_pretrain_values(config: "PretrainConfig") -> list[str]:
    from vlprompt.toyworld.world import VARY_WEIGHTS, attribute_values

    problems = []
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        value = getattr(config, name)
        least = 1 if name in _POSITIVE_INTS else 0
        if not is_integer(value):
            problems.append(f"{name} must be an integer (got {value!r})")
        elif value < least:
            problems.append(f"{name} must be >= {least} (got {value})")
    if not (is_number(config.lr) and config.lr > 0):
        problems.append(f"lr must be a positive number (got {config.lr!r})")
    if not (is_number(config.weight_decay) and config.weight_decay >= 0):
        problems.append(f"weight_decay must be a non-negative number (got {config.weight_decay!r})")
    if problems:
        return problems
    for tower in ("vision", "text"):
        width, heads = getattr(config, f"{tower}_width"), getattr(config, f"{tower}_heads")
        if width % heads:
            problems.append(f"{tower}_width {width} must be a multiple of {tower}_heads {heads}")
    if config.batch_size > config.n_pairs:
        problems.append(f"batch_size {config.batch_size} is larger than the corpus (n_pairs {config.n_pairs})")
    # A hard-negative group varies one attribute; more members than that attribute has values would repeat images
    # as each other's negatives.
    most = min(len(attribute_values(a)) for a in VARY_WEIGHTS)
    if config.group_size > most:
        problems.append(f"group_size {config.group_size} is larger than {most}, the fewest values an attribute of a "
                        "hard-negative group has")
    return problems


def pretraining_optimizer(named_parameters: list[tuple[str, torch.nn.Parameter]], lr: float,
                          weight_decay: float) -> torch.optim.AdamW:  # fmt: skip
    """AdamW as CLIP pretrains (betas 0.9 / 0.98), decaying matrices only (not biases, norms or embeddings)."""
    decay = [p for n, p in named_parameters if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named_parameters if not (p.dim() >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to zero at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(steps - warmup_steps, 1)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def world_vocabulary_texts(n_captions: int = 20_000, seed: int = 12345) -> list[str]:
    """Texts whose words make up the tokenizer's vocabulary: corpus captions plus every suite class and template."""
    from vlprompt.toyworld import corpus as toy_corpus
    from vlprompt.toyworld import suite as toy_suite
    from vlprompt.toyworld import world as toy_world

    corpus = toy_corpus.PretrainingCorpus(n_captions, seed=seed)
    texts = [corpus.caption(i) for i in range(n_captions)]
    for spec in toy_suite.SUITE.values():
        texts += [spec.template.format(c) for c in spec.classnames]
    words = list(toy_world.SHAPES) + list(toy_world.COLOURS) + list(toy_world.FILLS) + list(toy_world.DOMAINS)
    texts += [" ".join(words), " ".join(w + "s" for w in words), "a photo of the image picture an object objects"]
    return texts


def build_model(config: PretrainConfig, vocab_size: int, eos_token_id: int, bos_token_id: int):
    from transformers import CLIPConfig, CLIPModel

    clip_config = CLIPConfig(
        text_config=dict(
            hidden_size=config.text_width, intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            vocab_size=vocab_size, max_position_embeddings=config.context_length,
            eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
            num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
            image_size=config.image_size, patch_size=config.patch_size,
        ),
        projection_dim=config.embed_dim,
    )
    torch.manual_seed(config.seed)
    return CLIPModel(clip_config)


def _normalise(images_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_captions_bucketed(backbone, input_ids: torch.Tensor, eot_index: torch.Tensor, buckets: int) -> torch.Tensor:
    """Text features of a batch of captions, run in ``buckets`` groups of similar length, in the batch's order.

    Captions run from 5 to ~35 tokens; one padded batch pays for the longest in every row. The text tower is
    causal, so what follows a caption's end-of-text token never reaches its pooled feature: cutting each group
    at its own longest caption gives the same features (up to float summation order) for about half the cost.
    """
    order = torch.argsort(eot_index, stable=True)
    # encode_embedded cuts each group at its own last end-of-text token
    parts = [backbone.encode_embedded(backbone.embed_tokens(input_ids[chunk]), eot_index[chunk] + 1)
             for chunk in torch.tensor_split(order, max(buckets, 1)) if len(chunk)]
    return torch.cat(parts)[torch.argsort(order)]


def pretrain(config: PretrainConfig, output: str | Path, cache_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Train and save the model folder; returns its path. Deterministic for a given config on CPU."""
    from transformers import CLIPImageProcessor

    from vlprompt.backbones.clip import CLIPBackbone
    from vlprompt.pretraining.tokenizer import closed_vocab_tokenizer
    from vlprompt.toyworld import corpus as toy_corpus

    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    grouped = f"-g{config.group_size}" if config.group_size > 1 else ""
    cache = toy_corpus.write_pretraining_cache(
        Path(cache_dir) / f"corpus-n{config.n_pairs}-s{config.image_size}-seed{config.seed}{grouped}",
        n=config.n_pairs, seed=config.seed, size=config.image_size, workers=config.threads,
        group_size=config.group_size,
    )
    images, captions = toy_corpus.load_pretraining_cache(cache)
    log(f"corpus: {len(images)} pairs ready in {time.perf_counter() - start:.0f}s")

    tokenizer = closed_vocab_tokenizer(output / "tokenizer_src", world_vocabulary_texts(config.vocab_captions))
    device = torch.device(config.device)
    model = build_model(config, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id).to(device)
    backbone = CLIPBackbone(model, tokenizer, None, name_or_path=str(output))
    model.requires_grad_(True)
    model.train()
    tokens = backbone.tokenize(captions)  # all captions once; the adapter truncates each batch at its last EOT
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; vocabulary {len(tokenizer)}")

    optimizer = pretraining_optimizer(list(model.named_parameters()), config.lr, config.weight_decay)

    generator = torch.Generator().manual_seed(config.seed)
    history = []
    train_start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, config.lr, config.warmup_steps, config.steps)
        g = config.group_size
        groups = torch.randint(0, len(images) // g, (config.batch_size // g,), generator=generator)
        idx = (groups[:, None] * g + torch.arange(g)).flatten().numpy()
        idx.sort()  # memmap reads in order
        pixels = _normalise(images[idx]).to(device)
        ids = tokens.input_ids[idx].to(device)
        eot = tokens.eot_index[idx].to(device)
        img = F.normalize(backbone.encode_image(pixels), dim=-1)
        txt = F.normalize(encode_captions_bucketed(backbone, ids, eot, config.text_buckets), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        target = torch.arange(len(idx), device=device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % config.log_every == 0 or step == config.steps - 1:
            acc = (logits.argmax(-1) == target).float().mean().item()
            elapsed = time.perf_counter() - train_start
            history.append({"step": step, "loss": loss.item(), "batch_acc": acc, "elapsed_s": elapsed})
            log(f"step {step}/{config.steps} loss {loss.item():.3f} in-batch acc {acc:.2f} ({elapsed:.0f}s)")

    model.eval().to("cpu")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    size = config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(MEAN),
        image_std=list(STD),
    ).save_pretrained(output)
    (output / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2))
    (output / "pretrain_log.json").write_text(json.dumps(history, indent=1))
    # The field's recipes (made for web-scale CLIPs) ruin a model this small: it carries the toy recipe, which
    # `vlprompt train` / `bench` / `demo` then use by default (vlprompt.recipes).
    (output / RECIPE_FILE).write_text(json.dumps({"recipe": "toy"}) + "\n")
    for leftover in (output / "tokenizer_src").glob("*"):
        leftover.unlink()
    (output / "tokenizer_src").rmdir()
    log(f"saved to {output} after {time.perf_counter() - start:.0f}s")
    return output
