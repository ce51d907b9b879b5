"""Tip-Adapter (Zhang et al., ECCV 2022; released code github.com/gaopengcuhk/Tip-Adapter), the training-free
variant: a key-value cache of the few-shot training set added to zero-shot scoring,

    logits = alpha * exp(-beta * (1 - f K^T)) V  +  zero-shot logits(f),

with keys ``K`` (N, d) the L2-normalised training image features, values ``V`` (N, C) their one-hot labels, ``f``
the L2-normalised test image feature, and the zero-shot logits the backbone's own scoring of ``f`` against the
frozen template class features (CLIP: ``logit_scale * f W^T``, 100 x for the released weights).

Deviations and choices, stated:
- Keys: the features the task hands over (``fit_features``), one un-augmented view per training image. The
  released code averages each image's feature over several augmented views (10 random crops/flips by default).
- alpha and beta are searched on the validation split over ``betas`` x ``alphas`` (default beta in 1, 2, ..., 10
  and alpha in 0.1, 0.5, 1, 2, 3, 5; the released search spans beta ~0.1-10 and alpha ~0.1-5 over a finer grid),
  keeping the first best in grid order (beta outer, alpha inner, as released). With no validation images the
  configured ``alpha`` / ``beta`` are used (the released ImageNet values 1.0 / 5.5).
- Tip-Adapter was defined for CLIP's softmax scoring. On SigLIP (sigmoid scoring) the same formula is applied to
  its logits (scale and bias included): the cache term is added in the same units as the model's own logits.

Nothing is trained: ``num_trainable()`` is 0 (``vlprompt params`` reports 0). The cache and the chosen alpha/beta
are buffers that this method adds to its saved prompt state (``prompt_state_dict``), so ``save_pretrained`` /
``from_pretrained`` round-trip them. The cache's values are the training classes: like the linear probe it is tied
to them (it can score a subset of them, not new class names).

Tip-Adapter-F (``tip_adapter_f``) starts from the same fit (cache and alpha/beta searched on validation), then
trains the keys by gradient steps through the engine with cross-entropy on the same logits (the released code's
``adapter``, a linear layer initialised from the keys), and finally searches alpha/beta again on validation with the
trained keys. Trainable: the keys, N x d numbers (N = training images). Deviations: the released code keeps the
epoch with the best *test* accuracy; here the last epoch's keys are kept (nothing is chosen on test). It trains with
per-dataset initial alpha / beta from its configs (ImageNet 1.17 / 1); here training uses the pair the first search
chose on validation. AdamW's eps
is torch's default (1e-8), not the released 1e-4; the schedule is the engine's per-epoch cosine, not per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch import nn

from vlprompt.backbones.base import SITE_JOINT_SPACE
from vlprompt.methods.base import ClassificationMethod, MethodConfig, require, subset_rows
from vlprompt.methods.registry import register_method
from vlprompt.options import opt
from vlprompt.recipes import Recipe

# The saved state beyond trainable parameters: the cache and the (alpha, beta) in use.
CACHE_STATE = ("cache_keys", "cache_values", "alpha", "beta")


@dataclass
class TipAdapterConfig(MethodConfig):
    method_name = "tip_adapter"
    # Used when there are no validation images (the released ImageNet values); otherwise searched over the grids.
    alpha: float = opt(1.0, min=0, help="cache weight used when there is no validation split")
    beta: float = opt(5.5, gt=0, help="affinity sharpness used when there is no validation split")
    alphas: list[float] = opt([0.1, 0.5, 1.0, 2.0, 3.0, 5.0], gt=0, help="alpha grid searched on validation")
    betas: list[float] = opt([float(b) for b in range(1, 11)], gt=0, help="beta grid searched on validation")

    def validate(self) -> None:
        require(len(self.alphas) > 0, "tip_adapter.alphas needs at least one value")
        require(len(self.betas) > 0, "tip_adapter.betas needs at least one value")


class TipAdapter(ClassificationMethod):
    name = "tip_adapter"
    config_class = TipAdapterConfig
    required_sites = frozenset({SITE_JOINT_SPACE})  # image and class features in one space, scored by the family
    fits_features = True

    @classmethod
    def tied_to_classes(cls, config: TipAdapterConfig) -> bool:
        return True

    def __init__(self, backbone, config: TipAdapterConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        self.fitted_classnames = list(self.classnames)
        device = backbone.device
        # Empty until fitted: an unfitted Tip-Adapter is zero-shot. fp32 whatever the backbone's dtype.
        self.register_buffer("cache_keys", torch.zeros(0, backbone.embed_dim, device=device))
        self.register_buffer("cache_values", torch.zeros(0, len(self.classnames), device=device))
        self.register_buffer("alpha", torch.tensor(float(config.alpha), device=device))
        self.register_buffer("beta", torch.tensor(float(config.beta), device=device))
        self.class_rows: list[int] | None = None  # a subset of the fitted classes being scored
        self._zs_key: tuple | None = None
        self._zs_feats: torch.Tensor | None = None

    def _on_classes_changed(self) -> None:
        self.class_rows = subset_rows(self.fitted_classnames, self.classnames, "Tip-Adapter's cache")
        self._zs_key = self._zs_feats = None

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def _template_features(self, classnames) -> torch.Tensor:
        return self.backbone.encode_texts([self.template.format(c) for c in classnames]).detach()

    def zero_shot_text_features(self) -> torch.Tensor:
        """The frozen template features of the current classes, computed once per class set (and device)."""
        key = (tuple(self.classnames), self.template, str(self.backbone.device))
        if self._zs_key != key or self._zs_feats is None:
            self._zs_feats = self._template_features(self.classnames)
            self._zs_key = key
        return self._zs_feats

    def cache_logits(self, image_feats: torch.Tensor, alpha=None, beta=None) -> torch.Tensor:
        """``alpha * exp(-beta (1 - f K^T)) V`` over the fitted classes ``(B, C_fitted)``."""
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        # float32 whatever the module was cast to: the cache is compared in the precision it was fitted in
        f = F.normalize(image_feats.float(), dim=-1).to(self.cache_keys.device)
        affinity = f @ self.cache_keys.float().t()
        return alpha * (torch.exp(-beta * (1.0 - affinity)) @ self.cache_values.float())

    def text_features(self) -> torch.Tensor:
        return self.zero_shot_text_features()

    def logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of the current classes plus the cache term of those classes."""
        zero_shot = super().logits(image_feats, text_feats)
        cache = self.cache_logits(image_feats).to(zero_shot.device)
        return zero_shot + (cache if self.class_rows is None else cache[:, self.class_rows])

    # ----------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit_features(
        self,
        train_feats: torch.Tensor,
        train_labels: torch.Tensor,
        val_feats: torch.Tensor,
        val_labels: torch.Tensor,
    ) -> dict[str, float]:
        """Fill the cache with the training features and one-hot labels; search (alpha, beta) on validation
        accuracy (``val_acc``, a fraction). Without validation images: the configured alpha / beta, no val_acc."""
        device = self.cache_keys.device
        n_classes = len(self.fitted_classnames)
        keys = F.normalize(train_feats.float(), dim=-1).to(device)
        values = F.one_hot(train_labels.long().to(device), n_classes).float()
        self._set_keys(keys)
        self.cache_values = values
        return self.search_alpha_beta(val_feats, val_labels)

    @torch.no_grad()
    def search_alpha_beta(self, val_feats: torch.Tensor, val_labels: torch.Tensor) -> dict[str, float]:
        """Set (alpha, beta) to the grid point with the best validation accuracy (``val_acc``, a fraction) under
        the current keys; with no validation images, to the configured alpha / beta."""
        device = self.cache_keys.device
        alpha, beta = float(self.config.alpha), float(self.config.beta)
        info: dict[str, float] = {}
        if len(val_labels) > 0:
            text = self._template_features(self.fitted_classnames)
            if self.class_rows is None:  # scoring the fitted classes: reuse these features for the zero-shot part
                self._zs_key = (tuple(self.classnames), self.template, str(self.backbone.device))
                self._zs_feats = text
            zero_shot = self.backbone.score(val_feats.to(text.device), text).float().to(device)
            y = val_labels.to(device)
            best = -1.0
            for b in self.config.betas:
                cache = self.cache_logits(val_feats, alpha=1.0, beta=float(b))
                for a in self.config.alphas:
                    acc = ((zero_shot + float(a) * cache).argmax(-1) == y).float().mean().item()
                    if acc > best:
                        best, alpha, beta = acc, float(a), float(b)
            info["val_acc"] = best
        self.alpha = torch.tensor(alpha, device=device)
        self.beta = torch.tensor(beta, device=device)
        return {"alpha": alpha, "beta": beta, **info}

    def _set_keys(self, keys: torch.Tensor) -> None:
        self.cache_keys = keys  # a buffer: the training-free cache is never trained

    # ----------------------------------------------------------------- saved state: the cache, not trained
    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().prompt_state_dict()
        state.update({n: getattr(self, n).detach().clone() for n in CACHE_STATE})
        return state

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in CACHE_STATE if n not in state]
        if missing:
            raise ValueError(f"checkpoint does not match method {self.name!r}: missing {missing}. Was it trained "
                             "with another method?")
        keys, values = state["cache_keys"], state["cache_values"]
        d, c = self.backbone.embed_dim, len(self.fitted_classnames)
        if keys.dim() != 2 or keys.shape[1] != d or values.dim() != 2 or tuple(values.shape) != (keys.shape[0], c):
            raise ValueError(f"checkpoint cache has keys {tuple(keys.shape)} and values {tuple(values.shape)} but "
                             f"this model needs (N, {d}) and (N, {c}): the backbone or the classes differ.")
        device = self.cache_keys.device
        self._set_keys(keys.to(device, torch.float32).clone())
        for n in CACHE_STATE[1:]:
            setattr(self, n, state[n].to(device, torch.float32).clone())
        own = self.prompt_parameters()  # Tip-Adapter-F's keys are a parameter, checked and copied there
        super().load_prompt_state_dict({n: t for n, t in state.items() if n not in CACHE_STATE or n in own})


register_method(
    "tip_adapter", TipAdapter, summary="training-free few-shot cache added to zero-shot (alpha, beta on val)",
    aliases=("tip-adapter",),
    # Training-free: the cache is filled from the training features and alpha/beta searched on validation, so no
    # training recipe (learning rate, epochs, batch size) applies.
    released=None,
)


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    method_name = "tip_adapter_f"


class TipAdapterF(TipAdapter):
    """Tip-Adapter with its cache keys trained from the fit (module docstring)."""

    name = "tip_adapter_f"
    config_class = TipAdapterFConfig
    trains_after_fit = True

    def __init__(self, backbone, config: TipAdapterFConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        keys = self._buffers.pop("cache_keys")
        self.cache_keys = nn.Parameter(keys)  # (0, d) until fitted: nothing to train before the fit
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def trainable_once_fitted(self, num_images: int) -> int:
        return num_images * self.backbone.embed_dim  # one key of width d per training image

    def _set_keys(self, keys: torch.Tensor) -> None:
        if tuple(keys.shape) == tuple(self.cache_keys.shape):
            # In place, so that an optimiser built over the keys (a resumed run) keeps training them.
            with torch.no_grad():
                self.cache_keys.copy_(keys)
        else:
            self.cache_keys = nn.Parameter(keys)

    def fit_features(self, train_feats, train_labels, val_feats, val_labels) -> dict[str, float]:
        info = super().fit_features(train_feats, train_labels, val_feats, val_labels)
        # Kept for the search with the trained keys at the end of training (the validation set is small).
        self._val = (val_feats.detach().float(), val_labels.detach())
        return info

    def on_train_end(self) -> None:
        if self._val is not None:
            self.search_alpha_beta(*self._val)


register_method(
    "tip_adapter_f", TipAdapterF, summary="Tip-Adapter with its cache keys fine-tuned (alpha, beta on val)",
    aliases=("tip-adapter-f",),
    released=Recipe(train={"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "epochs": 20, "batch_size": 256,
                           "warmup_epochs": 0},
                    source="Tip-Adapter (ECCV 2022) main.py and configs/imagenet.yaml: AdamW lr 0.001 (eps 1e-4), "
                           "cosine without warm-up, 20 epochs, batch 256, random crops and flips"),
)
