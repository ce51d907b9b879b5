"""What every method is: a validated config dataclass plus an ``nn.Module`` over a frozen backbone."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.base import DeepPrompts, TokenizedText, UnsupportedBackboneError


class MethodConfigError(ValueError):
    """A method config field is invalid; the message names the field and the allowed values."""


@dataclass
class MethodConfig:
    """Base of every method config. Subclasses add fields and check them in ``validate``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by methods
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodConfigError(
                f"{cls.__name__} has no option(s) {unknown}; its options are {sorted(known)}."
            )
        return cls(**values)


def check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' where the class name goes")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise MethodConfigError(message)


def subset_rows(trained: Sequence[str], asked: Sequence[str], what: str) -> list[int] | None:
    """Rows of ``trained`` that score ``asked``: None when they are the same list, the indices when ``asked`` is a
    subset (ImageNet-A/R's 200 of ImageNet's 1000 classes, as CoOp reports a linear probe on them)."""
    if list(asked) == list(trained):
        return None
    index = {name: i for i, name in enumerate(trained)}
    unknown = [name for name in asked if name not in index]
    if unknown or len(set(asked)) != len(asked):
        shown = ", ".join(trained[:5]) + (", ..." if len(trained) > 5 else "")
        raise ValueError(
            f"{what} is tied to the {len(trained)} classes it was trained on ({shown}); it can score a subset of them "
            f"but not {unknown[:5] or 'repeated names'}. Use a prompt method for cross-dataset evaluation."
        )
    return [index[name] for name in asked]


class PromptMethod(nn.Module):
    """A prompt-tuning method on a frozen backbone.

    Subclasses set ``name``, ``config_class``, ``required_sites``, and which towers they change; they implement
    ``text_features`` and/or ``image_features``. The engine uses ``modifies_text`` / ``modifies_image`` to compute
    an untouched tower once instead of every step.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    required_sites: ClassVar[frozenset[str]] = frozenset()
    modifies_text: ClassVar[bool] = False
    modifies_image: ClassVar[bool] = False
    # Methods fitted in closed form / by their own solver instead of SGD (linear probe) set this.
    fits_features: ClassVar[bool] = False

    @classmethod
    def tied_to_classes(cls, config: MethodConfig) -> bool:
        """True if what ``config`` trains belongs to the training classes (a classifier head, class-specific
        contexts): such a model cannot score other class names (no novel-class or cross-dataset evaluation)."""
        return False

    def __init__(self, backbone, config: MethodConfig, classnames: list[str], template: str = "a photo of a {}.") -> None:
        super().__init__()
        missing = self.required_sites - backbone.sites
        if missing:
            raise UnsupportedBackboneError(
                f"method {self.name!r} needs the site(s) {sorted(missing)} which the {backbone.family!r} backbone "
                f"does not offer (it offers {sorted(backbone.sites)}). See `vlprompt methods` for supported pairs."
            )
        if not classnames:
            raise ValueError("a method needs at least one class name")
        check_template(template)
        self.backbone = backbone
        self.config = config
        self.classnames: list[str] = list(classnames)
        self.template = template

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen towers keep eval behaviour (no attention dropout) while the prompts train, as in the released code.
        self.backbone.model.eval()
        return self

    # ----------------------------------------------------------------- class names
    def set_classes(self, classnames: list[str], template: str | None = None) -> None:
        """Point the method at another label set (cross-dataset / base-to-novel evaluation)."""
        if not classnames:
            raise ValueError("a method needs at least one class name")
        if template is not None:
            check_template(template)
        previous = (self.classnames, self.template)
        self.classnames = list(classnames)
        if template is not None:
            self.template = template
        try:
            self._on_classes_changed()
        except Exception:
            self.classnames, self.template = previous  # a refused change leaves the method as it was
            raise

    def _on_classes_changed(self) -> None:
        pass


    # ----------------------------------------------------------------- features and logits
    def text_features(self) -> torch.Tensor:
        """Class text features ``(C, d)`` (unnormalised). Default: the dataset's hand-written template."""
        return self.backbone.encode_texts([self.template.format(c) for c in self.classnames])

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, d)`` (unnormalised). Default: the frozen image tower."""
        return self.backbone.encode_image(pixel_values)

    def logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        image_feats = F.normalize(image_feats.float(), dim=-1)
        text_feats = F.normalize(text_feats.float(), dim=-1)
        return self.backbone.logit_scale.float() * image_feats @ text_feats.t()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_feats: torch.Tensor | None = None,
        text_feats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, C)``. Cached features of an untouched tower may be passed instead of recomputing them."""
        if image_feats is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or precomputed image_feats")
            image_feats = self.image_features(pixel_values)
        if text_feats is None:
            text_feats = self.text_features()
        return self.logits(image_feats, text_feats)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    # ----------------------------------------------------------------- trainable state
    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The method's own trainable parameters (the backbone is never included)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.prompt_parameters().values())

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.prompt_parameters().items()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.prompt_parameters()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match method {self.name!r}: missing {missing}, unexpected {unexpected}. "
                "Was it trained with another method or other options?"
            )
        for n, p in own.items():
            if tuple(state[n].shape) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint tensor {n!r} has shape {tuple(state[n].shape)} but this model needs "
                    f"{tuple(p.shape)}: the options (token count, depth, classes) or the backbone differ."
                )
            with torch.no_grad():
                p.copy_(state[n].to(p.device, p.dtype))


class ClassTextPrompts(nn.Module):
    """Tokenised class sentences whose positions ``1..n`` are learned prompts (CoOp-family placeholders).

    The references build a placeholder sentence (``"X X X X {class}."`` for CoOp, ``"a photo of a {class}."``
    for MaPLe / IVLP / UPT) and replace its token positions ``1..n`` by prompts. Here those ``n`` tokens are removed
    and the adapter inserts the prompts after ``[SOS]``: the same sequence. Token ids are non-persistent buffers so
    they follow the method across devices and stay out of checkpoints.
    """

    def __init__(self, backbone, classnames: list[str], placeholder: str = "{}.", n_replaced: int = 0) -> None:
        super().__init__()
        check_template(placeholder)
        prefix_tokens = int(backbone.tokenize([placeholder.split("{}")[0].strip()]).eot_index[0]) - 1
        if n_replaced > prefix_tokens and prefix_tokens > 0:
            raise MethodConfigError(
                f"cannot replace {n_replaced} tokens of the placeholder {placeholder!r}: it has {prefix_tokens} "
                "before the class name. Use more placeholder words or fewer prompt tokens."
            )
        n_removed = min(n_replaced, prefix_tokens)
        tokenized = backbone.tokenize([placeholder.format(c) for c in classnames])
        ids = torch.cat([tokenized.input_ids[:, :1], tokenized.input_ids[:, 1 + n_removed :]], dim=1)
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("eot_index", tokenized.eot_index - n_removed, persistent=False)

    @property
    def tokenized(self) -> TokenizedText:
        return TokenizedText(self.input_ids, self.eot_index)

    # Above checkpoint_classes classes, a training forward runs the text tower in chunks of chunk_classes classes
    # whose activations are recomputed in backward (activation checkpointing): peak memory ~ one chunk instead of
    # every class (CoOp on an ImageNet-sized label set: ~50 kB per token per layer at ViT-B/16's text width).
    # Same features and gradients; the text tower runs once more in backward.
    checkpoint_classes: int = 128
    chunk_classes: int = 32

    def features(self, backbone, prompts: DeepPrompts | None) -> torch.Tensor:
        n_classes = self.input_ids.shape[0]
        needs_grad = torch.is_grad_enabled() and prompts is not None and any(
            t is not None and t.requires_grad for t in prompts.tokens)  # fmt: skip
        if not needs_grad or n_classes <= self.checkpoint_classes:
            return backbone.encode_text_ids(self.tokenized, prompts)
        from torch.utils.checkpoint import checkpoint

        chunks = []
        for lo in range(0, n_classes, self.chunk_classes):
            hi = min(lo + self.chunk_classes, n_classes)
            chunk_prompts = DeepPrompts([
                t[lo:hi] if t is not None and t.dim() == 3 else t for t in prompts.tokens])  # fmt: skip
            chunk = TokenizedText(self.input_ids[lo:hi], self.eot_index[lo:hi])
            chunks.append(checkpoint(backbone.encode_text_ids, chunk, chunk_prompts, use_reentrant=False))
        return torch.cat(chunks)


def placeholder_prefix_embedding(backbone, placeholder: str, n: int) -> torch.Tensor | None:
    """Embeddings of the first ``n`` placeholder words (the references' prompt init), or None if it has fewer."""
    prefix = placeholder.split("{}")[0].strip()
    if not prefix or n == 0:
        return None
    words = phrase_embedding(backbone, prefix)
    return words[:n].clone() if words.shape[0] >= n else None


def seed_from_placeholder(rows: torch.Tensor, backbone, placeholder: str, enabled: bool = True) -> None:
    """Overwrite ``rows`` ``(n, d_t)`` in place with the placeholder's first ``n`` word embeddings (reference init).

    Left random when disabled or when the placeholder has fewer than ``n`` words before the class name.
    """
    words = placeholder_prefix_embedding(backbone, placeholder, rows.shape[0]) if enabled else None
    if words is not None:
        rows.copy_(words)


def phrase_embedding(backbone, phrase: str) -> torch.Tensor:
    """Word embeddings ``(n, d_t)`` of a phrase's tokens (without [SOS]/[EOS]): CoOp's "init from a phrase"."""
    tokenized = backbone.tokenize([phrase])
    n = int(tokenized.eot_index[0]) - 1
    if n == 0:
        raise MethodConfigError(f"the init phrase {phrase!r} has no tokens")
    with torch.no_grad():
        return backbone.embed_tokens(tokenized.input_ids[0, 1 : 1 + n]).clone()
