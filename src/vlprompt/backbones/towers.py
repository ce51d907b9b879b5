"""What transformers' two-tower models share (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``): ``text_model`` and
``vision_model`` with ``encoder.layers`` of pre-norm blocks, tower configs, and a learned ``logit_scale``.

Family adapters subclass :class:`TransformersTwoTowers` for these and implement only what differs.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlprompt.backbones.base import (SITE_TOWER_WEIGHTS, BackboneLoadError, BlockAdapter, DeepPrompts, DualEncoderBackbone,
                                     TransientPrompts, UnsupportedBackboneError, without_hub_kernels)

# The tower config fields that make an architecture: a prompt trained on one refuses another that differs in them.
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
               "max_position_embeddings", "projection_size", "image_size", "patch_size", "num_patches")


def load_weights(model_class: Any, path: str, family: str, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(path)``, its failure one line naming what a model folder needs."""
    try:
        return model_class.from_pretrained(path, **without_hub_kernels(kwargs))
    except OSError as err:
        raise BackboneLoadError(
            f"could not load {family} weights from {path!r}: {err}. A model folder needs config.json and "
            "model.safetensors (or pytorch_model.bin), as written by save_pretrained."
        ) from err


def load_tokenizer(path: str, model: nn.Module, family: str, **kwargs: Any) -> Any:
    """The folder's tokenizer, refused when missing or empty (transformers builds an empty one when a folder has
    none, and every text would then embed the same)."""
    from transformers import AutoTokenizer

    no_tokenizer = (f"{family} model at {path!r} has no usable tokenizer. Save the tokenizer beside the weights: "
                    f"tokenizer.save_pretrained({path!r}).")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except ImportError as err:  # e.g. SigLIP's own tokenizer is SentencePiece (spiece.model), an optional package
        raise BackboneLoadError(f"the tokenizer of {path!r} needs a package that is not installed: {err} "
                                "(for SigLIP's spiece.model: pip install sentencepiece)") from err  # fmt: skip
    except (OSError, ValueError, TypeError) as err:
        raise BackboneLoadError(f"{no_tokenizer} ({err})") from err
    vocab_size = model.config.text_config.vocab_size
    if len(tokenizer) < 3 or len(tokenizer) > vocab_size:
        raise BackboneLoadError(f"{no_tokenizer} (found {len(tokenizer)} tokens for a {vocab_size}-token "
                                "embedding table)")  # fmt: skip
    return tokenizer


class TransformersTwoTowers(DualEncoderBackbone):
    """Dimensions, temperature and attention blocks read from a transformers two-tower model."""

    @property
    def text_width(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    def encoder_layers(self, tower: str) -> nn.ModuleList:
        """The repeated transformer blocks of ``tower`` ("text" or "image"), which the adapters call one by one."""
        towers = {"text": self.model.text_model, "image": self.model.vision_model}
        return towers[tower].encoder.layers

    @property
    def text_layers(self) -> int:
        return len(self.encoder_layers("text"))

    @property
    def vision_layers(self) -> int:
        return len(self.encoder_layers("image"))

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def architecture_identity(self, top: dict[str, Any]) -> dict[str, Any]:
        """``identity`` from ``top`` (family-specific fields) plus both towers' architecture fields, hashed."""
        cfg = self.model.config.to_dict()
        arch = dict(top)
        for tower in ("text_config", "vision_config"):
            sub = cfg.get(tower, {})
            arch[tower] = {k: sub[k] for k in ARCH_FIELDS if k in sub}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        return {"family": self.family, "name_or_path": self.name_or_path, "config_hash": digest, "arch": arch}

    def run_image_layers(self, hidden: torch.Tensor, prompts: DeepPrompts | None, start: int,
                         block: BlockAdapter | None, transient: TransientPrompts | None) -> torch.Tensor:  # fmt: skip
        """The image tower's layers over ``hidden``: deep prompts replace positions ``start..`` from layer 1 on,
        ``block`` changes each attention output, ``transient`` tokens join one layer and leave with its outputs."""
        layers = self.encoder_layers("image")
        with block_hooks(layers, block):
            for j, layer in enumerate(layers):
                if j > 0 and prompts is not None:
                    hidden = replace_tokens(hidden, prompts.at(j), start=start)
                extra = transient.tokens(j, hidden) if transient is not None else None
                if extra is None:
                    hidden = layer(hidden, None)
                    continue
                length = hidden.shape[1]
                out = layer(torch.cat([hidden, extra.to(hidden.dtype)], dim=1), None)
                transient.outputs(j, out[:, length:])
                hidden = out[:, :length]
        return hidden

    def add_lora(self, r: int, alpha: float, dropout: float, towers: Sequence[str] = ("text", "image"),
                 projections: Sequence[str] = ("q", "k", "v")) -> dict[str, nn.Parameter]:  # fmt: skip
        """Inject LoRA adapters (``peft``) into the attention ``projections`` (roles of ``info.attention_projections``)
        of every encoder layer of ``towers``; returns the new parameters by their name in ``model``. A backbone
        takes one set of adapters: a second method needs a freshly loaded backbone."""
        if SITE_TOWER_WEIGHTS not in self.sites:
            raise UnsupportedBackboneError(f"the {self.family} backbone offers no LoRA site ({SITE_TOWER_WEIGHTS})")
        layers = [layer for tower in towers for layer in self.encoder_layers(tower)]
        return self.inject_lora(layers, projections, r, alpha, dropout)

    def attention_blocks(self, tower: str) -> list[nn.Module]:
        """The self-attention module of every layer of ``tower`` ("text" or "image"), for block-site methods."""
        model = self.model.text_model if tower == "text" else self.model.vision_model
        return [layer.self_attn for layer in model.encoder.layers]


# ------------------------------------------------------------------ running prompts through the model's own layers
@contextmanager
def block_hooks(layers, block: BlockAdapter | None):
    """Route every layer's attention output through ``block`` for the duration of one forward pass.

    Uses torch's forward-hook API on the model's own attention modules (removed on exit), so the layers run
    unmodified transformers code.
    """
    if block is None:
        yield
        return
    handles = []
    for j, layer in enumerate(layers):

        def hook(module, args, kwargs, output, j=j):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            replaced = block(j, x, output[0])
            return output if replaced is None else (replaced, *output[1:])

        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def expand_tokens(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    if tokens.dim() == 2:
        return tokens.unsqueeze(0).expand(batch, -1, -1)
    if tokens.shape[0] != batch:
        raise ValueError(f"per-sequence prompts for {tokens.shape[0]} sequences given to a batch of {batch}")
    return tokens


def replace_tokens(hidden: torch.Tensor, tokens: torch.Tensor | None, start: int) -> torch.Tensor:
    """Replace ``hidden[:, start:start+N]`` by fresh prompt tokens (deep prompting), keeping the rest."""
    if tokens is None:
        return hidden
    tokens = expand_tokens(tokens, hidden.shape[0]).to(hidden.dtype)
    n = tokens.shape[1]
    return torch.cat([hidden[:, :start], tokens, hidden[:, start + n :]], dim=1)
