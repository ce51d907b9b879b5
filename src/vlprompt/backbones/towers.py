"""What transformers' two-tower models share (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``): ``text_model`` and
``vision_model`` with ``encoder.layers`` of pre-norm blocks, tower configs, and a learned ``logit_scale``.

Family adapters subclass :class:`TransformersTwoTowers` for these and implement only what differs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from vlprompt.backbones.base import BlockAdapter, DualEncoderBackbone


class TransformersTwoTowers(DualEncoderBackbone):
    """Dimensions, temperature and attention blocks read from a transformers two-tower model."""

    @property
    def text_width(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def text_layers(self) -> int:
        return len(self.model.text_model.encoder.layers)

    @property
    def vision_layers(self) -> int:
        return len(self.model.vision_model.encoder.layers)

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
