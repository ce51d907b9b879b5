"""SDPT, two-tower form for CLIP: unified prototypes in the joint space, mapped into both towers by pseudo-inverses.

One prototype set ``P (K, d)`` per depth lives in CLIP's joint embedding space. Training-free inverse projections
give each tower's tokens: ``text = ((P (W_t^T)^+) - beta_t) / gamma_t`` and likewise for the image tower, where
``W`` is the projection weight (torch's ``(d, width)``) and ``(beta, gamma)`` the final LayerNorm's affine. The
tokens are inserted as deep prompts in both towers, so the same prototypes drive both modalities.
The projections are frozen, so the pseudo-inverses are constants: computed once and reused, recomputed only if
those weights change (checked cheaply through the tensors' version counters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones.base import SITE_IMAGE_SEQUENCE, SITE_LINEAR_PROJECTIONS, SITE_TEXT_SEQUENCE, DeepPrompts
from vlprompt.methods.base import ClassificationMethod, MethodConfig, class_prompts
from vlprompt.options import opt
from vlprompt.methods.registry import register_method


@dataclass
class SDPTConfig(MethodConfig):
    method_name = "sdpt"
    n_prototypes: int = opt(4, min=0)  # K
    depth: int | Literal["all"] = opt(9, min=1, tower="both")  # prompted layers in both towers
    # released: uniform(-init_scale, init_scale) with scale 1; or normal N(0, init_scale)
    init: Literal["uniform", "normal"] = "uniform"
    init_scale: float = opt(1.0, gt=0)
    # Text sentence the prototypes' text tokens are inserted into (after [SOS]); None: the dataset's template,
    # so that K = 0 is exactly zero-shot.
    placeholder: str | None = opt(None, placeholder=True)


class InverseProjection(nn.Module):
    """Least-squares pre-image of joint-space vectors under one tower's projection, before its final LayerNorm."""

    def __init__(self, projection: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> None:
        super().__init__()
        self._sources = (projection, ln_weight, ln_bias)
        self.register_buffer("pinv", torch.empty(0), persistent=False)
        self._versions: tuple[int, ...] | None = None
        self.computations = 0  # how many times the pseudo-inverse was computed (tests, benchmarks)

    def _refresh(self) -> None:
        versions = tuple(t._version for t in self._sources) + tuple(t.data_ptr() for t in self._sources)
        if versions == self._versions:
            return
        projection = self._sources[0].detach().float()
        self.pinv = torch.linalg.pinv(projection.t())  # (d, width): y = P @ pinv solves y @ W^T = P
        self._versions = versions
        self.computations += 1

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        self._refresh()
        _, gamma, beta = self._sources
        pre_norm = prototypes @ self.pinv.to(prototypes.dtype)
        return (pre_norm - beta.detach()) / gamma.detach()


class SDPT(ClassificationMethod):
    name = "sdpt"
    config_class = SDPTConfig
    required_sites = frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE, SITE_LINEAR_PROJECTIONS})
    modifies_text = True
    modifies_image = True

    def __init__(self, backbone, config: SDPTConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        shape = (config.depth, config.n_prototypes, backbone.embed_dim)
        if config.init == "uniform":
            prototypes = torch.empty(*shape).uniform_(-config.init_scale, config.init_scale)
        else:
            prototypes = torch.randn(*shape) * config.init_scale
        self.prototypes = nn.Parameter(prototypes)
        joint = backbone.joint_space()
        self.to_text = InverseProjection(joint["text_projection"], joint["text_ln_weight"], joint["text_ln_bias"])
        self.to_image = InverseProjection(joint["image_projection"], joint["image_ln_weight"], joint["image_ln_bias"])
        self._on_classes_changed()

    def _on_classes_changed(self) -> None:
        placeholder = self.config.placeholder or self.template
        self.class_text = class_prompts(self, placeholder)

    def text_tokens(self) -> torch.Tensor:
        return self.to_text(self.prototypes)  # (depth, K, d_t)

    def image_tokens(self) -> torch.Tensor:
        return self.to_image(self.prototypes)  # (depth, K, d_v)

    def text_features(self) -> torch.Tensor:
        prompts = DeepPrompts(list(self.text_tokens())) if self.config.n_prototypes else None
        return self.backbone.encode_class_prompts(self.class_text, prompts)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        prompts = DeepPrompts(list(self.image_tokens())) if self.config.n_prototypes else None
        return self.backbone.encode_image(pixel_values, prompts)


register_method("sdpt", SDPT, summary="unified joint-space prototypes, pseudo-inverse into both towers")
