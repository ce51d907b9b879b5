"""What a method may ask of a backbone: the prompt *sites* a model family offers.

Methods describe what they insert with the small dataclasses below and hand them to the adapter; the adapter
alone knows the model's modules, masks and pooling positions. See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

# Sites an adapter can offer. `vlprompt methods` derives the method x backbone matrix from these.
SITE_TEXT_SEQUENCE = "text_sequence"  # insert/replace tokens at any text layer's input
SITE_IMAGE_SEQUENCE = "image_sequence"  # insert/replace tokens at any image layer's input
SITE_JOINT_SPACE = "joint_space"  # projections into a shared embedding + final LayerNorms
SITE_BLOCK = "attention_block"  # additive change to an attention block's output
SITE_TRANSIENT_IMAGE = "image_transient"  # tokens appended to one image layer's input, dropped from its output
SITE_FUSION = "fusion_attention"  # bi-directional fusion attention (Grounding DINO family)
SITE_DETECTION_TEXT = "detection_text"  # learned word embeddings at a detector's text-encoder input, per phrase
SITE_DETECTOR = "detector_weights"  # a detector's own weights (heads, all, LoRA) and its detection losses


class UnsupportedBackboneError(ValueError):
    """A method needs a site this backbone does not offer."""


@dataclass
class DeepPrompts:
    """Prompt tokens for one tower, shallow (layer 0) and deep (layers 1..J-1).

    ``tokens[j]`` is inserted at the input of layer ``j``; shapes ``(N, width)`` shared by the batch or
    ``(B, N, width)`` per sequence. ``tokens[0]`` is inserted into the embedded sequence; for ``j >= 1`` the N prompt
    positions carried over from layer ``j - 1`` are *replaced* (deep prompting). A shorter list, or ``None`` entries,
    keep the previous layer's outputs at those positions (shallow prompting = a list of length 1).
    All layers must use the same N.
    """

    tokens: Sequence[torch.Tensor | None] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        for t in self.tokens:
            if t is not None:
                if t.dim() not in (2, 3):
                    raise ValueError(f"prompt tokens must be (N, width) or (batch, N, width), got {tuple(t.shape)}")
                return t.shape[-2]
        return 0

    def at(self, layer: int) -> torch.Tensor | None:
        return self.tokens[layer] if layer < len(self.tokens) else None

    def validate(self, width: int, num_layers: int, tower: str) -> None:
        if len(self.tokens) > num_layers:
            raise ValueError(
                f"{tower} prompts given for {len(self.tokens)} layers but the {tower} tower has {num_layers}: "
                f"lower the prompt depth to at most {num_layers}."
            )
        if self.tokens and self.tokens[0] is None:
            raise ValueError(f"{tower} prompts need layer-0 tokens to insert; deep layers can only replace them.")
        n = self.num_tokens
        for j, t in enumerate(self.tokens):
            if t is None:
                continue
            if t.shape[-1] != width or t.shape[-2] != n or t.dim() not in (2, 3):
                raise ValueError(
                    f"{tower} prompt at layer {j} has shape {tuple(t.shape)}; expected (N={n}, {width}) "
                    f"or (batch, {n}, {width})."
                )


class BlockAdapter(Protocol):
    """Additive change to an attention block's output (APT): ``O' = f(layer, X, O)``.

    ``x`` is the block's input after its LayerNorm ``(B, T, C)``; ``attn_out`` the attention output after the output
    projection, before the residual. Return the replacement for ``attn_out``, or None to keep it.
    """

    def __call__(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor | None: ...


class TransientPrompts(Protocol):
    """Tokens appended to a layer's input, run through that layer, then dropped (DPT's visual prompts).

    ``tokens(layer, hidden)`` sees the layer's input (without transient tokens) and returns ``(B, n, width)`` or
    None; ``outputs(layer, out)`` receives those tokens' outputs of the layer (e.g. for an auxiliary head).
    """

    def tokens(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None: ...

    def outputs(self, layer: int, out: torch.Tensor) -> None: ...


@dataclass
class FusionTokens:
    """Tokens appended to one fusion layer's bi-directional attention input (SDPT native, deep fusion prompts).

    ``vision`` ``(K_v, d_v)`` or ``(B, K_v, d_v)`` joins the image tokens, ``text`` ``(K_t, d_t)`` or
    ``(B, K_t, d_t)`` the text tokens, for that attention only: both modalities' queries, keys and values see them,
    the attention masks are extended, and their output rows are dropped. ``mask_text`` hides the text-side tokens
    from the image queries (SDPT's released behaviour).
    """

    vision: torch.Tensor | None = None
    text: torch.Tensor | None = None
    mask_text: bool = False


@dataclass
class TokenizedText:
    """Token ids of a batch of texts plus where each text's end-of-text token is."""

    input_ids: torch.Tensor  # (C, T)
    eot_index: torch.Tensor  # (C,)
