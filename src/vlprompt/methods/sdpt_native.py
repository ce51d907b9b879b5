"""SDPT in its native form: unified prototypes in the aligning space of a fusion detector's bi-directional attention.

A Grounding DINO fusion layer projects vision tokens ``v`` and text tokens ``l`` into one space of width ``E``:
``q = v W_v^T + b_v`` (vision queries), ``k = l W_l^T + b_l`` (text keys). Per chosen fusion layer SDPT learns one
prototype matrix ``P (K, E)`` there, and maps it back to each modality with training-free least-squares pre-images:

    v_P = (P - b_v) (W_v^T)^+        l_P = (P - b_l) (W_l^T)^+        (^+ = Moore-Penrose pseudo-inverse)

``v_P`` is appended to the vision tokens and ``l_P`` to the text tokens at that layer's attention input, so both
modalities' queries, keys and values see the same prototypes; the masks are extended and the prototype rows dropped
from both outputs (the adapter's fusion site does this with forward hooks on the model's own attention module).
Only ``P`` trains, with the detector's own loss.

The projections are frozen, so the pseudo-inverses are constants: each is computed once, on first use, and reused;
it is recomputed only if that projection's weight or bias changes (version counter or storage), which
``LinearPreimage.computations`` counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones.base import SITE_DETECTOR, SITE_FUSION, FusionTokens
from vlprompt.methods.base import MethodConfig
from vlprompt.methods.detection import DETECTION_TEMPLATE, DetectionMethod, check_layers_option, resolve_layers
from vlprompt.options import opt
from vlprompt.methods.registry import register_method


@dataclass
class SDPTNativeConfig(MethodConfig):
    method_name = "sdpt_native"
    n_prototypes: int = opt(16, min=0)  # K per chosen fusion layer (released: 700)
    layers: Literal["all"] | list[int] = "all"  # fusion layers that get prototypes (released: all)
    # released: uniform(-init_scale, init_scale) with scale 1; or normal N(0, init_scale)
    init: Literal["uniform", "normal"] = "uniform"
    init_scale: float = opt(1.0, gt=0)
    # Released behaviour: image queries never attend to the text-side prototype tokens.
    mask_text_prototypes: bool = False

    def validate(self) -> None:
        check_layers_option(self.layers, "sdpt_native")


class LinearPreimage(nn.Module):
    """Least-squares pre-image under a frozen ``nn.Linear``: ``x = (y - b) (W^T)^+`` minimises ``|x W^T + b - y|``.

    The pseudo-inverse is cached (a non-persistent buffer) and recomputed only when the weight or bias changes.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._sources = (linear.weight, linear.bias)  # a tuple: not registered, so never trained or saved
        self.register_buffer("pinv", torch.empty(0), persistent=False)
        self._versions: tuple | None = None
        self.computations = 0

    def _refresh(self) -> None:
        weight, bias = self._sources
        versions = tuple((t._version, t.data_ptr()) for t in self._sources if t is not None)
        if versions == self._versions:
            return
        # float64 once: exact up to rounding where W^T has full column rank (E <= width)
        # float64 on the CPU: exact enough, and available on every device (MPS has no float64)
        self.pinv = torch.linalg.pinv(weight.detach().cpu().double().t()).to(weight.device, weight.dtype)  # (E, width)
        self._versions = versions
        self.computations += 1

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._refresh()
        bias = self._sources[1]
        if bias is not None:
            y = y - bias.detach().to(y.dtype)
        return y @ self.pinv.to(y.dtype)


class SDPTNative(DetectionMethod):
    name = "sdpt_native"
    config_class = SDPTNativeConfig
    required_sites = frozenset({SITE_DETECTOR, SITE_FUSION})
    uses_fusion = True

    def __init__(self, backbone, config: SDPTNativeConfig, classnames, template: str = DETECTION_TEMPLATE) -> None:
        super().__init__(backbone, config, classnames, template)
        self.layers = resolve_layers(config.layers, backbone, self.name)
        sites = [backbone.fusion_site(j) for j in self.layers]
        shape = (len(self.layers), config.n_prototypes, sites[0].embed_dim)
        if config.init == "uniform":
            prototypes = torch.empty(*shape).uniform_(-config.init_scale, config.init_scale)
        else:
            prototypes = torch.randn(*shape) * config.init_scale
        self.prototypes = nn.Parameter(prototypes)
        self.to_vision = nn.ModuleList(LinearPreimage(site.vision_query) for site in sites)
        self.to_text = nn.ModuleList(LinearPreimage(site.text_key) for site in sites)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}

    def pinv_computations(self) -> int:
        return sum(m.computations for m in [*self.to_vision, *self.to_text])

    def prototype_tokens(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-images ``(v_P (K, d_v), l_P (K, d_t))`` of the prototypes of the ``slot``-th chosen layer."""
        p = self.prototypes[slot]
        return self.to_vision[slot](p), self.to_text[slot](p)

    def fusion_tokens(self, layer: int) -> FusionTokens | None:
        slot = self._slot.get(layer)
        if slot is None or self.config.n_prototypes == 0:
            return None
        vision, text = self.prototype_tokens(slot)
        return FusionTokens(vision=vision, text=text, mask_text=self.config.mask_text_prototypes)


register_method("sdpt_native", SDPTNative,
                summary="unified prototypes in fusion attention, pseudo-inverse into both modalities",
                aliases=("sdpt-native",))
register_method(
    "sdpt_native_released", SDPTNative, {"n_prototypes": 700, "layers": "all", "mask_text_prototypes": True},
    summary="sdpt_native with the released settings (K=700, all fusion layers, text prototypes masked)",
)
