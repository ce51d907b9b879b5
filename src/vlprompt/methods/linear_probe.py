"""Linear probe: multinomial logistic regression on frozen, L2-normalised image features.

Fitted with L-BFGS (full batch, the features are small); the L2 strength is chosen on the validation split from a
log-spaced sweep, as in CLIP's and CoOp's linear-probe baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import SITE_JOINT_SPACE
from vlprompt.methods.base import ClassificationMethod, MethodConfig, subset_rows
from vlprompt.options import opt
from vlprompt.methods.registry import register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    method_name = "linear_probe"
    # Inverse regularisation strengths C (as in scikit-learn: loss = mean CE + ||W||^2 / (2 C n)) to try.
    c_values: list[float] = opt([10.0**k for k in range(-2, 5)], gt=0)
    max_iter: int = opt(300, min=1)

    def validate(self) -> None:
        if not self.c_values:
            raise ValueError("linear_probe.c_values needs at least one value")


class LinearProbe(ClassificationMethod):
    name = "linear_probe"
    config_class = LinearProbeConfig
    required_sites = frozenset({SITE_JOINT_SPACE})  # image (and text) features in a shared embedding space
    fits_features = True

    @classmethod
    def tied_to_classes(cls, config: LinearProbeConfig) -> bool:
        return True

    def __init__(self, backbone, config: LinearProbeConfig, classnames, template="a photo of a {}.") -> None:
        super().__init__(backbone, config, classnames, template)
        self.fitted_classnames = list(self.classnames)
        self.head = nn.Linear(backbone.embed_dim, len(self.classnames))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.chosen_c: float | None = None
        self.class_rows: list[int] | None = None  # a subset of the fitted classes being scored

    def _on_classes_changed(self) -> None:
        self.class_rows = subset_rows(self.fitted_classnames, self.classnames, "a linear probe")

    def forward(self, pixel_values=None, image_feats=None, text_feats=None) -> torch.Tensor:
        if image_feats is None:
            image_feats = self.image_features(pixel_values)
        # The head's own dtype (float32 unless the whole module was cast with .to(dtype)).
        logits = self.head(F.normalize(image_feats.to(self.head.weight.dtype), dim=-1))
        return logits if self.class_rows is None else logits[:, self.class_rows]

    def fit_features(
        self,
        train_feats: torch.Tensor,
        train_labels: torch.Tensor,
        val_feats: torch.Tensor,
        val_labels: torch.Tensor,
    ) -> dict[str, float]:
        """Fit on frozen features, picking C by validation accuracy; refits on train+val with the chosen C."""
        x_train = F.normalize(train_feats.float(), dim=-1)
        x_val = F.normalize(val_feats.float(), dim=-1)
        best_c, best_acc = self.config.c_values[0], -1.0
        if len(val_labels) > 0:
            for c in self.config.c_values:
                w, b = self._solve(x_train, train_labels, c)
                acc = ((x_val @ w.t() + b).argmax(-1) == val_labels).float().mean().item()
                if acc > best_acc:
                    best_c, best_acc = c, acc
        x_all = torch.cat([x_train, x_val]) if len(val_labels) else x_train
        y_all = torch.cat([train_labels, val_labels]) if len(val_labels) else train_labels
        w, b = self._solve(x_all, y_all, best_c)
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)
        self.chosen_c = best_c
        return {"c": best_c, "val_acc": best_acc}

    def _solve(self, x: torch.Tensor, y: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
        n_classes = self.head.out_features
        w = torch.zeros(n_classes, x.shape[1], device=x.device, dtype=x.dtype, requires_grad=True)
        b = torch.zeros(n_classes, device=x.device, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.config.max_iter, line_search_fn="strong_wolfe")
        penalty = 1.0 / (2.0 * c * max(len(y), 1))

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.t() + b, y) + penalty * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return w.detach(), b.detach()


register_method("linear_probe", LinearProbe, summary="logistic regression on frozen image features",
                aliases=("linear-probe", "lp"))
