"""Pretraining a small ``transformers`` ViLT on the toy world, as ViLT pretrains: image-text matching (ITM) and
masked language modelling (MLM) on image-caption pairs.

``vlprompt pretrain-toy-vilt --output DIR`` reproduces the embedded ``embedded-vilt`` model:

- **Data**: the toy CLIP's pretraining corpus (the world minus its held-out colour x shape pairs and looks),
  rendered once into a cache; captions tokenized by a closed-vocabulary BERT WordPiece tokenizer (the world's
  words, the toy sets' questions and statements, and single letters so any word still spells out).
- **Initialisation**: ViLT starts from an ImageNet ViT; the toy ViLT starts its patch embedding and transformer
  blocks from the embedded toy CLIP's image tower (same width, depth, heads and patches). Word embeddings, token
  types, the pooler and both heads start random.
- **Objectives**, one forward pass per batch: a fraction ``itm_negatives`` of the pairs get another pair's caption
  (ITM label 0); ``mlm_probability`` of every caption's word tokens are masked (BERT's 80/10/10) in all pairs,
  so the masking does not tell a matched pair from a swapped one; MLM loss counts only matched pairs.
- **Saved as** an ordinary ``ViltForImageAndTextRetrieval`` folder: the encoder plus ``rank_output``, the ITM
  head's match-minus-no-match logit (the same ranking and, through a sigmoid, the same match probability);
  the tokenizer; ``pretrain_config.json``, ``pretrain_log.json`` and ``zero_shot.json`` (the zero-shot retrieval
  recall on the toy retrieval set's test split that a rebuild must reproduce).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.engine.trainer import is_integer, is_number, seed_everything
from vlprompt.pretraining.clip_pretrain import pretraining_optimizer, warmup_cosine_lr

VILT_MEAN = VILT_STD = 0.5  # ViLT normalises every channel with 0.5 / 0.5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ZERO_SHOT_FILE = "zero_shot.json"


@dataclass
class ViltPretrainConfig:
    n_pairs: int = 150_000
    image_size: int = 48  # the toy sets' image size
    patch_size: int = 12
    width: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_text_length: int = 32  # toy captions, questions and statements take at most 29 tokens (ViLT-B/32 has 40)
    batch_size: int = 128
    steps: int = 8000
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 400
    itm_negatives: float = 0.5
    mlm_probability: float = 0.15
    init_from_clip: bool = True  # the embedded toy CLIP's image tower, as ViLT starts from a ViT
    vocab_captions: int = 20_000
    seed: int = 0
    threads: int = 2
    log_every: int = 100
    eval_retrieval_images: int = 100  # test images of the toy retrieval set scored at the end (5 captions each)
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_pairs", "image_size", "patch_size", "width", "layers", "heads", "intermediate",
                     "max_text_length", "batch_size", "steps", "threads", "log_every", "eval_retrieval_images"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        for name in ("warmup_steps", "vocab_captions", "seed"):
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                problems.append(f"{name} must be a non-negative integer (got {value!r})")
        for name in ("lr", "weight_decay", "itm_negatives", "mlm_probability"):
            value = getattr(self, name)
            if not is_number(value) or value < 0 or (name != "weight_decay" and name != "lr" and value >= 1):
                problems.append(f"{name} must be a number in its range (got {value!r})")
        if problems:
            raise ValueError("; ".join(problems))
        if self.image_size % self.patch_size or self.width % self.heads:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size} and "
                             f"width {self.width} a multiple of heads {self.heads}")
        if self.batch_size > self.n_pairs:
            raise ValueError(f"batch_size {self.batch_size} is larger than the corpus (n_pairs {self.n_pairs})")


# ------------------------------------------------------------------------------------------------ tokenizer
def vocabulary_words(n_captions: int) -> list[str]:
    """Every word of the corpus captions, the suite's class texts and the toy sets' questions and statements."""
    from vlprompt.pretraining.clip_pretrain import world_vocabulary_texts
    from vlprompt.pretraining.tokenizer import words_of
    from vlprompt.toyworld.fusion_sets import fusion_texts

    words = words_of(world_vocabulary_texts(n_captions) + fusion_texts())
    return sorted(set(words))


def write_wordpiece_tokenizer(out_dir: str | Path, words: list[str], max_length: int):
    """A BERT WordPiece tokenizer whose vocabulary is the given words (plus letters and digits, alone and as
    continuations, so an unseen word is spelled out instead of read as unknown)."""
    from transformers import BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = list(SPECIAL_TOKENS) + sorted(set(words) | set(pieces)) + [f"##{p}" for p in pieces]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizer.from_pretrained(str(out), do_lower_case=True, model_max_length=max_length)


# ------------------------------------------------------------------------------------------------ the model
def build_model(config: ViltPretrainConfig, vocab_size: int):
    """A ``ViltForMaskedLM`` of the configured size and a two-way ITM head on its pooled output."""
    from transformers import ViltConfig, ViltForMaskedLM

    vilt_config = ViltConfig(
        vocab_size=vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate, image_size=config.image_size,
        patch_size=config.patch_size, max_position_embeddings=config.max_text_length,
        # the toy CLIP's activation and LayerNorm epsilon, so its image tower's blocks compute the same functions
        hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    model = ViltForMaskedLM(vilt_config)
    itm_head = nn.Linear(config.width, 2)
    return model, itm_head


def init_from_clip_vision(vilt, clip_folder: str | Path) -> None:
    """Copy a CLIP image tower of the same width, depth, heads and patch size into ViLT's patch embedding and
    blocks (CLIP's LayerNorm before the first block has no ViLT counterpart and is left out)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_folder)).vision_model
    emb, target = clip.embeddings, vilt.embeddings
    if (len(clip.encoder.layers) != len(vilt.encoder.layer)
            or emb.patch_embedding.weight.shape != target.patch_embeddings.projection.weight.shape):  # fmt: skip
        raise ValueError("the toy CLIP's image tower and this ViLT differ in depth, width or patches: set "
                         "init_from_clip=false or match layers, width and patch_size to the toy CLIP")
    with torch.no_grad():
        target.patch_embeddings.projection.weight.copy_(emb.patch_embedding.weight)
        target.patch_embeddings.projection.bias.zero_()
        target.cls_token.copy_(emb.class_embedding.view(1, 1, -1))
        target.position_embeddings.copy_(emb.position_embedding.weight.unsqueeze(0))
        for src, dst in zip(clip.encoder.layers, vilt.encoder.layer):
            pairs = [(src.self_attn.q_proj, dst.attention.attention.query), (src.self_attn.k_proj, dst.attention.attention.key),
                     (src.self_attn.v_proj, dst.attention.attention.value), (src.self_attn.out_proj, dst.attention.output.dense),
                     (src.layer_norm1, dst.layernorm_before), (src.layer_norm2, dst.layernorm_after),
                     (src.mlp.fc1, dst.intermediate.dense), (src.mlp.fc2, dst.output.dense)]  # fmt: skip
            for a, b in pairs:
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
        vilt.layernorm.weight.copy_(clip.post_layernorm.weight)
        vilt.layernorm.bias.copy_(clip.post_layernorm.bias)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, probability: float, mask_id: int,
                vocab_size: int, first_word_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of word tokens (not [CLS]/[SEP]/padding): (masked ids, labels with -100 where unmasked)."""
    words = (attention_mask.bool()) & (input_ids >= first_word_id)
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & words
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    random_words = torch.randint(first_word_id, vocab_size, input_ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_words[swap]
    return masked, labels


def normalise(images_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
    return (x - VILT_MEAN) / VILT_STD


def rank_output_from_itm(itm_head: nn.Linear) -> nn.Linear:
    """``Linear(C, 1)`` giving the ITM head's match-minus-no-match logit: the same ranking, and its sigmoid is
    the ITM softmax's match probability."""
    rank = nn.Linear(itm_head.in_features, 1)
    with torch.no_grad():
        rank.weight.copy_(itm_head.weight[1:2] - itm_head.weight[0:1])
        rank.bias.copy_(itm_head.bias[1:2] - itm_head.bias[0:1])
    return rank


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def zero_shot_retrieval(backbone, rank_output: nn.Linear, images: list, captions: list[str],
                        caption_image: torch.Tensor, batch_size: int = 500) -> dict[str, float]:  # fmt: skip
    """Recall at 1/5/10 both ways of the matching score over every image x caption pair."""
    from vlprompt.data.retrieval import recall_at_k

    tokens = backbone.tokenize(captions)
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    scores = torch.empty(len(images), len(captions))
    for i, pixels in enumerate(images):
        for lo in range(0, len(captions), batch_size):
            ids = tokens.input_ids[lo:lo + batch_size]
            batch_pixels = pixels.unsqueeze(0).expand(len(ids), -1, -1, -1)
            _, pooled = backbone.encode(ids, mask[lo:lo + batch_size], batch_pixels)
            scores[i, lo:lo + len(ids)] = rank_output(pooled).squeeze(-1)
    return recall_at_k(scores, caption_image)


def retrieval_test_set(n_images: int, image_size: int, seed: int = 0) -> tuple[list, list[str], torch.Tensor]:
    """(image tensors, captions, the image of each caption) of the toy retrieval set's first test images, drawn
    exactly as the folder of ``toy:retrieval`` holds them."""
    from vlprompt.toyworld.fusion_sets import retrieval_item
    from vlprompt.toyworld.render import render_array

    images, captions, owners = [], [], []
    for i in range(n_images):
        scene, texts = retrieval_item(seed, "test", i)
        images.append(normalise(render_array(scene, image_size, "clean")[None])[0])
        captions += texts
        owners += [i] * len(texts)
    return images, captions, torch.tensor(owners)


def write_recipe_file(folder: Path) -> None:
    """The field's recipes (made for ViLT-B/32 on VQA v2) do not fit a model this small: it carries the toy recipe,
    which `vlprompt train` / `bench` use by default (vlprompt.recipes)."""
    from vlprompt.recipes import RECIPE_FILE

    (folder / RECIPE_FILE).write_text(json.dumps({"recipe": "toy"}) + "\n")


# ------------------------------------------------------------------------------------------------ training
def pretrain_vilt(config: ViltPretrainConfig, output: str | Path, cache_dir: str | Path,
                  log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Train and save the model folder; returns its path. Deterministic for a given config on CPU."""
    from transformers import ViltForImageAndTextRetrieval

    from vlprompt.assets import embedded_model_path
    from vlprompt.backbones.vilt import ViltBackbone
    from vlprompt.toyworld import corpus as toy_corpus

    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cache = toy_corpus.write_pretraining_cache(
        Path(cache_dir) / f"corpus-n{config.n_pairs}-s{config.image_size}-seed{config.seed}",
        n=config.n_pairs, seed=config.seed, size=config.image_size, workers=config.threads,
    )  # fmt: skip
    images, captions = toy_corpus.load_pretraining_cache(cache)
    log(f"corpus: {len(images)} pairs ready in {time.perf_counter() - start:.0f}s")

    tokenizer = write_wordpiece_tokenizer(output / "tokenizer_src", vocabulary_words(config.vocab_captions),
                                          config.max_text_length)  # fmt: skip
    model, itm_head = build_model(config, len(tokenizer))
    if config.init_from_clip:
        init_from_clip_vision(model.vilt, embedded_model_path("embedded"))
    device = torch.device(config.device)
    model.to(device)
    itm_head.to(device)
    backbone = ViltBackbone(model.vilt, tokenizer, name_or_path=str(output))
    model.requires_grad_(True)
    model.train()
    tokens = backbone.tokenize(captions)
    attention = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    first_word_id = len(SPECIAL_TOKENS)
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in itm_head.parameters())
    log(f"model: {n_params:,} parameters; vocabulary {len(tokenizer)}; longest caption "
        f"{int(tokens.lengths.max())} tokens")  # fmt: skip

    params = [*model.named_parameters(), *(("itm." + n, p) for n, p in itm_head.named_parameters())]
    optimizer = pretraining_optimizer(params, config.lr, config.weight_decay)

    generator = torch.Generator().manual_seed(config.seed)
    history = []
    train_start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, config.lr, config.warmup_steps, config.steps)
        idx = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        idx, _ = idx.sort()  # memmap reads in order
        swapped = torch.rand(config.batch_size, generator=generator) < config.itm_negatives
        # another pair's caption: a random offset keeps it from being the pair's own
        other = (idx + torch.randint(1, len(images), (config.batch_size,), generator=generator)) % len(images)
        text_idx = torch.where(swapped, other, idx)
        ids, mask = tokens.input_ids[text_idx], attention[text_idx]
        ids, labels = mask_tokens(ids, mask, config.mlm_probability, tokenizer.mask_token_id, len(tokenizer),
                                  first_word_id, generator)  # fmt: skip
        labels[swapped] = -100  # a swapped caption is not this image's words to recover
        pixels = normalise(images[idx.numpy()]).to(device)
        hidden, pooled = backbone.encode(ids.to(device), mask.to(device), pixels)
        text_states = backbone.final_sequence(hidden)[:, : ids.shape[1]]
        mlm_logits = model.mlm_score(text_states)
        mlm_loss = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), labels.to(device).reshape(-1),
                                   ignore_index=-100)  # fmt: skip
        itm_logits = itm_head(pooled)
        itm_target = (~swapped).long().to(device)
        itm_loss = F.cross_entropy(itm_logits, itm_target)
        loss = itm_loss + mlm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        optimizer.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            itm_acc = (itm_logits.argmax(-1) == itm_target).float().mean().item()
            elapsed = time.perf_counter() - train_start
            history.append({"step": step, "itm_loss": itm_loss.item(), "mlm_loss": mlm_loss.item(),
                            "itm_acc": itm_acc, "elapsed_s": elapsed})  # fmt: skip
            log(f"step {step}/{config.steps} itm {itm_loss.item():.3f} (acc {itm_acc:.2f}) mlm {mlm_loss.item():.3f} "
                f"({elapsed:.0f}s)")  # fmt: skip

    model.eval().to("cpu")
    itm_head.to("cpu")
    rank_output = rank_output_from_itm(itm_head)
    eval_images, eval_captions, owners = retrieval_test_set(config.eval_retrieval_images, config.image_size)
    recall = zero_shot_retrieval(backbone, rank_output, eval_images, eval_captions, owners)
    log("zero-shot retrieval on the toy retrieval test split: " + ", ".join(f"{k} {v:.1f}" for k, v in recall.items()))

    retrieval = ViltForImageAndTextRetrieval(model.config)
    retrieval.vilt.load_state_dict(model.vilt.state_dict())
    retrieval.rank_output.load_state_dict(rank_output.state_dict())
    retrieval.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (output / "pretrain_log.json").write_text(json.dumps(history, indent=1) + "\n")
    zero_shot = {"split": "test", "images": config.eval_retrieval_images, **recall}
    (output / ZERO_SHOT_FILE).write_text(json.dumps(zero_shot, indent=1) + "\n")
    write_recipe_file(output)
    for leftover in (output / "tokenizer_src").glob("*"):
        leftover.unlink()
    (output / "tokenizer_src").rmdir()
    log(f"saved to {output} after {time.perf_counter() - start:.0f}s")
    return output
