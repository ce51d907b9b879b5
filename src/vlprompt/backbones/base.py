"""What a method may ask of a backbone: the prompt *sites* a model family offers.

Methods describe what they insert with the small dataclasses below and hand them to the adapter; the adapter
alone knows the model's modules, masks and pooling positions. See docs/design.md.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import torch
from torch import nn

# Sites an adapter can offer. `vlprompt methods` derives the method x backbone matrix from these.
SITE_TEXT_SEQUENCE = "text_sequence"  # insert/replace tokens at any text layer's input
SITE_IMAGE_SEQUENCE = "image_sequence"  # insert/replace tokens at any image layer's input
SITE_JOINT_SPACE = "joint_space"  # projections into a shared embedding + final LayerNorms
SITE_BLOCK = "attention_block"  # additive change to an attention block's output
SITE_TRANSIENT_IMAGE = "image_transient"  # tokens appended to one image layer's input, dropped from its output
SITE_FUSION = "fusion_attention"  # bi-directional fusion attention (Grounding DINO family)
SITE_DETECTION_TEXT = "detection_text"  # learned word embeddings at a detector's text-encoder input, per phrase
# An additive offset per token position on a detector's text-encoder output, before the fusion layers (GLIP's
# language prompt tuning).
SITE_DETECTION_TEXT_FEATURES = "detection_text_features"
SITE_DETECTOR = "detector_weights"  # a detector's own weights (heads, all, LoRA) and its detection losses
# Linear projections (plus a final LayerNorm) from each tower into the joint space: what SDPT's pseudo-inverses need.
SITE_LINEAR_PROJECTIONS = "linear_projections"
# The towers' own attention projections, open to LoRA adapters (through ``peft``): CLIP-LoRA.
SITE_TOWER_WEIGHTS = "tower_weights"

# Kinds of model: each has its own abstract adapter base below, and its own task.
KIND_DUAL_ENCODER = "dual_encoder"  # CLIP, SigLIP: two towers scored in a joint space (classification, retrieval)
KIND_FUSION_DETECTOR = "fusion_detector"  # Grounding DINO family: text-conditioned boxes (detection)
KIND_FUSION_ENCODER = "fusion_encoder"  # ViLT, BridgeTower: text and image tokens in shared layers (VQA, pairs, ...)
# Tokens appended to a fusion encoder's joint sequence at any layer's input and replaced layer by layer (deep prompts).
SITE_JOINT_SEQUENCE = "joint_sequence"
# A fusion encoder's own weights: LoRA adapters (peft) on its attention projections, or all of them (full tuning).
SITE_FUSION_WEIGHTS = "fusion_weights"

# Where image prompts can go in a ViT sequence: after the patches, or before them (after a class token, if any).
IMAGE_PROMPTS_END = "end"
IMAGE_PROMPTS_FRONT = "front"
# Where a class name can sit relative to a learned text context (CoOp's class_position).
CLASS_POSITIONS = ("end", "middle", "front")


class UnsupportedBackboneError(ValueError):
    """A method needs a site this backbone does not offer."""


class BackboneLoadError(ValueError):
    """A model folder / hub id could not be turned into a supported backbone."""


@dataclass(frozen=True)
class FamilyInfo:
    """What one model family offers, declared once: methods and `vlprompt methods` read it, nothing probes.

    ``missing`` says, for sites a method of this kind could want but this family cannot offer, why not (shown when
    a method is refused). ``scoring`` is how class logits become probabilities ("softmax" or "sigmoid").
    """

    kind: str
    sites: frozenset[str]
    missing: Mapping[str, str] = field(default_factory=dict)
    image_prompt_positions: tuple[str, ...] = ()
    class_positions: tuple[str, ...] = ("end",)
    scoring: str = "softmax"
    # The attention projections of one encoder layer by role (q, k, v, o -> the module's name in the layer): what
    # LoRA on the towers targets (``tower_weights``).
    attention_projections: Mapping[str, str] = field(default_factory=dict)


# model_type in a checkpoint's config.json -> adapter class; filled by register_backbone where each adapter is defined.
BACKBONES: dict[str, type["Backbone"]] = {}


# random:<preset> -> a function building that architecture with seeded random weights (tests, parameter counts,
# benchmarks); filled by register_random_preset in each family's presets module.
RANDOM_PRESETS: dict[str, Any] = {}


def register_random_preset(name: str, build: Any) -> None:
    """Offer ``random:<name>``: ``build()`` returns the backbone (a public architecture with random weights)."""
    RANDOM_PRESETS[name] = build


def register_backbone(model_types: Sequence[str], adapter: type["Backbone"]) -> type["Backbone"]:
    """Register an adapter for transformers ``model_type`` values, checking it fulfils its kind's contract."""
    bases = {KIND_DUAL_ENCODER: DualEncoderBackbone, KIND_FUSION_DETECTOR: FusionDetectorBackbone,
             KIND_FUSION_ENCODER: FusionEncoderBackbone}
    info = getattr(adapter, "info", None)
    if not isinstance(info, FamilyInfo):
        raise TypeError(f"{adapter.__name__} must declare `info = FamilyInfo(...)`")
    base = bases.get(info.kind)
    if base is None or not issubclass(adapter, base):
        raise TypeError(f"{adapter.__name__} declares kind {info.kind!r} but does not subclass its base {base}")
    abstract = sorted(getattr(adapter, "__abstractmethods__", ()))
    if abstract:
        raise TypeError(f"{adapter.__name__} does not implement the {info.kind} contract: missing {abstract}")
    if not set(info.image_prompt_positions) <= {IMAGE_PROMPTS_END, IMAGE_PROMPTS_FRONT}:
        raise TypeError(f"{adapter.__name__}: unknown image prompt positions {info.image_prompt_positions}")
    if not set(info.class_positions) <= set(CLASS_POSITIONS) or info.scoring not in ("softmax", "sigmoid"):
        raise TypeError(f"{adapter.__name__}: class positions or scoring outside {CLASS_POSITIONS} / softmax, sigmoid")
    for model_type in model_types:
        BACKBONES[model_type] = adapter
    return adapter


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
    """Token ids of a batch of texts, padded; ``lengths`` counts each text's tokens up to its end-of-text token
    (included), start tokens included."""

    input_ids: torch.Tensor  # (C, T)
    lengths: torch.Tensor  # (C,)

    @property
    def eot_index(self) -> torch.Tensor:
        return self.lengths - 1


class ClassPrompts(nn.Module):
    """Class sentences ready for prompts: built by a backbone (``backbone.class_prompts``), read only by it.

    Holds the tokenised sentences (with the placeholder words a prompt replaces already removed) and each class
    name's token count (for a context placed around the name). Buffers, not parameters: they follow the method
    across devices and stay out of checkpoints.
    """

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, name_lengths: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)
        self.register_buffer("name_lengths", name_lengths, persistent=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, lo: int, hi: int) -> "ClassPrompts":
        return ClassPrompts(self.input_ids[lo:hi], self.lengths[lo:hi], self.name_lengths[lo:hi])

    def repeat(self, times: int) -> "ClassPrompts":
        """Every class ``times`` times, image-major (for per-image prompts)."""
        return ClassPrompts(self.input_ids.repeat(times, 1), self.lengths.repeat(times),
                            self.name_lengths.repeat(times))  # fmt: skip


class Backbone(nn.Module, ABC):
    """What every model family's adapter is: a frozen transformers model plus what it offers (``info``)."""

    family: ClassVar[str] = ""
    info: ClassVar[FamilyInfo]
    model: nn.Module
    name_or_path: str

    @property
    def sites(self) -> frozenset[str]:
        return self.info.sites

    @property
    def kind(self) -> str:
        return self.info.kind

    @classmethod
    @abstractmethod
    def from_pretrained(cls, name_or_path: str, **model_kwargs: Any) -> "Backbone":
        """Load a checkpoint folder or hub id."""

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """``family``, ``name_or_path``, ``config_hash`` and ``arch`` (the fields hashed): what a prompt records."""

    def num_parameters(self) -> int:
        """The model's own parameters (LoRA adapters a method injected are not counted)."""
        return sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n)

    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.model.named_parameters())

    def inject_lora(self, layers: Sequence[nn.Module], projections: Sequence[str], r: int, alpha: float,
                    dropout: float) -> dict[str, nn.Parameter]:  # fmt: skip
        """Inject LoRA adapters (``peft``) into the ``projections`` (roles of ``info.attention_projections``) of each of
        ``layers``; returns the adapters by their name in ``model``. A backbone takes one set of adapters: a second
        method needs a freshly loaded backbone (``remove_lora`` takes them out)."""
        roles = self.info.attention_projections
        unknown = [p for p in projections if p not in roles]
        if unknown or not projections:
            raise ValueError(f"LoRA projections {list(projections)}: choose from {sorted(roles)}")
        if self.has_lora():
            raise ValueError("this backbone already carries LoRA adapters (a LoRA method was built on it): load a "
                             "fresh backbone for each LoRA method")
        from peft import LoraConfig, inject_adapter_in_model

        names = {id(module): name for name, module in self.model.named_modules()}
        targets = [f"{names[id(layer)]}.{roles[p]}" for layer in layers for p in projections]
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        inject_adapter_in_model(config, self.model)  # peft puts the adapters on their layer's device
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def remove_lora(self) -> None:
        """Take out every LoRA adapter a method injected: each adapted layer becomes its original layer again."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = [(name, module) for name, module in self.model.named_modules() if isinstance(module, BaseTunerLayer)]
        for name, module in adapted:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, module.get_base_layer())
        if hasattr(self.model, "peft_config"):  # peft's record of the adapters, read by the next injection
            del self.model.peft_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def why_missing(self, site: str) -> str:
        return self.info.missing.get(site, "")


class DualEncoderBackbone(Backbone):
    """A two-tower model (CLIP, SigLIP) scored in a joint space; methods see only this contract.

    The family implements the abstract members: dimensions, tokenising, word embeddings, running embedded text
    sequences with prompts inserted after its ``text_prefix_tokens`` start tokens, the image tower with its sites,
    and its temperature (and bias). Everything else (class sentences with placeholder words removed, contexts around
    class names, chunked text passes, per-image contexts, scoring and the task loss) is built here from those.
    """

    # Start tokens before the words (CLIP: [SOS]); text prompts are inserted right after them.
    text_prefix_tokens: ClassVar[int] = 0
    # Above checkpoint_classes classes, a training text pass runs in chunks of chunk_classes classes whose activations
    # are recomputed in backward: peak memory ~ one chunk (CoOp on ImageNet's 1,000 classes). Same values.
    checkpoint_classes: ClassVar[int] = 128
    chunk_classes: ClassVar[int] = 32

    tokenizer: Any
    image_processor: Any

    # ------------------------------------------------------------------ what a family implements
    @property
    @abstractmethod
    def text_width(self) -> int: ...

    @property
    @abstractmethod
    def vision_width(self) -> int: ...

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def text_layers(self) -> int: ...

    @property
    @abstractmethod
    def vision_layers(self) -> int: ...

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    @abstractmethod
    def patch_size(self) -> int: ...

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """The (exponentiated) temperature multiplying cosine similarities."""

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """Added to the scaled similarities (SigLIP); None for families without one."""
        return None

    @abstractmethod
    def tokenize(self, texts: Sequence[str], special_tokens: bool = True) -> TokenizedText:
        """Token ids and lengths; without special tokens: the words' tokens alone (for phrase embeddings)."""

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (no positions): the space text contexts live in."""

    @abstractmethod
    def encode_embedded(self, embeds: torch.Tensor, lengths: torch.Tensor, prompts: DeepPrompts | None = None,
                        block: BlockAdapter | None = None) -> torch.Tensor:  # fmt: skip
        """Text features ``(S, d)`` of embedded sequences ``(S, T, d_t)`` of ``lengths`` tokens each (padding after).

        ``prompts.tokens[0]`` is inserted after the ``text_prefix_tokens`` start tokens; deeper entries replace those
        positions at later layers; ``block`` changes each attention block's output."""

    @abstractmethod
    def encode_image(self, pixel_values: torch.Tensor, prompts: DeepPrompts | None = None,
                     position: str = IMAGE_PROMPTS_END, block: BlockAdapter | None = None,
                     transient: TransientPrompts | None = None) -> torch.Tensor:  # fmt: skip
        """Image features ``(B, d)`` with prompts at ``position`` (one of ``info.image_prompt_positions``)."""

    @abstractmethod
    def attention_blocks(self, tower: str) -> list[nn.Module]:
        """The self-attention module of every layer of ``tower`` ("text" or "image")."""

    def joint_space(self) -> dict[str, torch.Tensor]:
        """Projection weights ``(d, width)`` and final LayerNorm affines of both towers (``linear_projections``)."""
        raise UnsupportedBackboneError(f"the {self.family} backbone has no linear projections into its joint space: "
                                       f"{self.why_missing(SITE_LINEAR_PROJECTIONS)}")

    # ------------------------------------------------------------------ built from the above
    def layers(self, tower: str) -> int:
        """Layer count of ``tower``: "text", "image", or "both" (the shallower of the two)."""
        counts = {"text": self.text_layers, "image": self.vision_layers}
        return min(counts.values()) if tower == "both" else counts[tower]

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        """Word embeddings ``(n, d_t)`` of a phrase's tokens (CoOp's "init from a phrase")."""
        ids = self.tokenize([phrase], special_tokens=False)
        n = int(ids.lengths[0])
        if n == 0:
            raise ValueError(f"the phrase {phrase!r} has no tokens")
        with torch.no_grad():
            return self.embed_tokens(ids.input_ids[0, :n].to(self.device)).clone()

    def class_prompts(self, classnames: Sequence[str], placeholder: str = "{}.", n_replaced: int = 0) -> ClassPrompts:
        """Class sentences ``placeholder.format(name)`` whose first ``n_replaced`` words' tokens are replaced by
        prompts (MaPLe / IVLP / UPT's ``"a photo of a {}."``): those tokens are removed here and the prompts are
        inserted in their place by :meth:`encode_class_prompts`: the same sequence."""
        if placeholder.count("{}") != 1:
            raise ValueError(f"placeholder {placeholder!r} needs exactly one '{{}}' for the class name")
        before = placeholder.split("{}")[0].strip()
        prefix_tokens = int(self.tokenize([before], special_tokens=False).lengths[0]) if before else 0
        if n_replaced > prefix_tokens > 0:
            raise ValueError(
                f"cannot replace {n_replaced} tokens of the placeholder {placeholder!r}: it has {prefix_tokens} "
                "before the class name. Use more placeholder words or fewer prompt tokens."
            )
        removed = min(n_replaced, prefix_tokens)
        tokens = self.tokenize([placeholder.format(c) for c in classnames])
        start = self.text_prefix_tokens
        ids = torch.cat([tokens.input_ids[:, :start], tokens.input_ids[:, start + removed :]], dim=1)
        names = self.tokenize(list(classnames), special_tokens=False).lengths
        return ClassPrompts(ids.to(self.device), (tokens.lengths - removed).to(self.device), names.to(self.device))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        ids = tokens.input_ids.to(self.device)
        return self.encode_embedded(self.embed_tokens(ids), tokens.lengths.to(self.device))

    def encode_class_prompts(self, prompts_of: ClassPrompts, prompts: DeepPrompts | None = None,
                             block: BlockAdapter | None = None, class_position: str = "end") -> torch.Tensor:  # fmt: skip
        """Class text features ``(C, d)``: ``prompts`` inserted before the words (``class_position="end"``), or a
        single context (``prompts.tokens[0]``) placed around each class name ("middle": half before, half after;
        "front": after it)."""
        if class_position != "end":
            if class_position not in self.info.class_positions:
                raise UnsupportedBackboneError(f"the {self.family} backbone cannot place class names at "
                                               f"{class_position!r}; it offers {self.info.class_positions}")
            if prompts is None or len(prompts.tokens) != 1:
                raise ValueError("a context around class names is one layer-0 context (no deep prompts)")
            embeds, lengths = self._arranged(prompts_of, prompts.tokens[0], class_position)
            return self.encode_embedded(embeds, lengths, None, block)
        n_classes = len(prompts_of)
        needs_grad = torch.is_grad_enabled() and prompts is not None and any(
            t is not None and t.requires_grad for t in prompts.tokens)  # fmt: skip
        if not needs_grad or n_classes <= self.checkpoint_classes:
            return self._encode_rows(prompts_of, prompts, block)
        from torch.utils.checkpoint import checkpoint

        chunks = []
        for lo in range(0, n_classes, self.chunk_classes):
            hi = min(lo + self.chunk_classes, n_classes)
            chunk_prompts = DeepPrompts([t[lo:hi] if t is not None and t.dim() == 3 else t for t in prompts.tokens])
            chunks.append(checkpoint(self._encode_rows, prompts_of.rows(lo, hi), chunk_prompts, block,
                                     use_reentrant=False))  # fmt: skip
        return torch.cat(chunks)

    def encode_class_prompts_per_image(self, prompts_of: ClassPrompts, contexts: torch.Tensor) -> torch.Tensor:
        """Features ``(B, C, d)`` of every class under each of ``B`` per-image contexts ``(B, n, d_t)`` (CoCoOp).
        Families may compute this faster; the result must equal this generic form."""
        batch, n_classes = contexts.shape[0], len(prompts_of)
        prompts = DeepPrompts([contexts.repeat_interleave(n_classes, dim=0)])
        return self._encode_rows(prompts_of.repeat(batch), prompts, None).view(batch, n_classes, -1)

    def _encode_rows(self, prompts_of: ClassPrompts, prompts: DeepPrompts | None, block: BlockAdapter | None):
        return self.encode_embedded(self.embed_tokens(prompts_of.input_ids), prompts_of.lengths, prompts, block)

    def _arranged(self, prompts_of: ClassPrompts, context: torch.Tensor, class_position: str):
        """``[start][name][ctx][rest]`` (front) or ``[start][ctx/2][name][ctx/2][rest]`` (middle), as embeddings."""
        words = self.embed_tokens(prompts_of.input_ids)
        n_classes, n_ctx = words.shape[0], context.shape[-2]
        ctx = context.to(words.dtype)  # fp32 prompts on half-precision weights
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(n_classes, -1, -1)
        start, half = self.text_prefix_tokens, n_ctx // 2
        rows = []
        for i, length in enumerate(prompts_of.name_lengths.tolist()):
            head, name, rest = words[i, :start], words[i, start : start + length], words[i, start + length :]
            if class_position == "front":
                rows.append(torch.cat([head, name, ctx[i], rest]))
            else:
                rows.append(torch.cat([head, ctx[i, :half], name, ctx[i, half:], rest]))
        return torch.stack(rows), prompts_of.lengths + n_ctx

    # ------------------------------------------------------------------ scoring and the classification loss
    def score(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` from image features ``(B, d)`` and class features ``(C, d)`` (or per image
        ``(B, C, d)``): scaled cosine similarity, plus the family's bias if it has one."""
        image = torch.nn.functional.normalize(image_feats.float(), dim=-1)
        text = torch.nn.functional.normalize(text_feats.float(), dim=-1)
        cosine = torch.einsum("bd,bcd->bc", image, text) if text.dim() == 3 else image @ text.t()
        logits = self.logit_scale.float() * cosine
        bias = self.logit_bias
        return logits if bias is None else logits + bias.float()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The family's classification loss: softmax cross-entropy (CLIP), or one sigmoid per class against the
        one-hot label, summed over classes and averaged over images (SigLIP's pretraining loss)."""
        if self.info.scoring == "softmax":
            return torch.nn.functional.cross_entropy(logits.float(), labels)
        targets = torch.nn.functional.one_hot(labels, logits.shape[-1]).float()
        per_class = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        return per_class.sum(-1).mean()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) if self.info.scoring == "softmax" else logits.sigmoid()


class FusionDetectorBackbone(Backbone):
    """A text-conditioned detector with a fusion encoder (Grounding DINO family); detection methods see only this."""

    image_config: Any

    @property
    @abstractmethod
    def text_width(self) -> int: ...

    @property
    @abstractmethod
    def fusion_layers(self) -> int: ...

    @abstractmethod
    def fusion_site(self, layer: int) -> Any:
        """One fusion layer's bi-directional attention projections and widths (``FusionSite``)."""

    @abstractmethod
    def named_weights(self, part: str = "all") -> dict[str, nn.Parameter]:
        """Detector weights of a part ("heads" or "all"), by their name in ``model``."""

    @abstractmethod
    def add_lora(self, r: int, alpha: float, dropout: float, target_modules: str | None = None) -> dict[str, nn.Parameter]:
        """Attach LoRA adapters (``target_modules`` regex; None: the family's default) and return their weights."""

    @abstractmethod
    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        """Word embeddings ``(n, d_text)`` of a phrase's tokens."""

    @abstractmethod
    def category_prompt(self, names: Sequence[str], template: str = "{}", n_context: int = 0) -> nn.Module:
        """The text prompt of a list of categories, with ``n_context`` learned positions before each phrase."""

    @abstractmethod
    def detect(self, pixel_values: torch.Tensor, prompt: nn.Module, pixel_mask: torch.Tensor | None = None,
               labels: list[dict[str, torch.Tensor]] | None = None, context: torch.Tensor | None = None,
               fusion: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        """The detector's output on a batch for one category prompt (with ``loss`` when labels are given)."""

    @abstractmethod
    def category_scores(self, logits: torch.Tensor, prompt: nn.Module) -> torch.Tensor:
        """Per-category scores ``(B, Q, C)`` from the detector's token logits."""


class FusionEncoderBackbone(Backbone):
    """A fusion encoder (ViLT: one joint sequence of text and patch tokens; BridgeTower: co-attention layers): its
    layers see both modalities, and task heads read its pooled output. Methods see only this contract.

    ``embed`` builds the joint sequence and its padding mask; ``run_layers`` runs the fusion layers over it with deep
    prompts appended (``joint_sequence``) and an attention-block adapter (``attention_block``: called on each
    attach point with the block's LayerNorm'd input and its attention output); ``pool`` is the model's own pooler.
    """

    @property
    @abstractmethod
    def width(self) -> int: ...

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> TokenizedText:
        """Token ids ``(B, T)`` padded to the model's text length, with lengths (the padding mask's row sums)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
              pixel_mask: torch.Tensor | None = None, image_index: int = 0,
              image_type_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The joint sequence ``(B, N, C)`` entering the first fusion layer and its mask ``(B, N)`` (1 = attend).

        ``image_index`` is which image of a pair this is (NLVR2: 0 or 1). As ViLT and METER embed pairs, image ``i``
        takes modality type ``1 + i`` when the model has that many types, else the image type 1;
        ``image_type_offset`` ``(C,)`` is then added to every image token: a head's stand-in for the extra type
        the released recipes add (initialised as a copy of the image type, i.e. a zero offset).
        """

    @abstractmethod
    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, prompts: DeepPrompts | None = None,
                   block: BlockAdapter | None = None) -> torch.Tensor:  # fmt: skip
        """The fusion layers over ``hidden``; ``prompts.tokens[j]`` appended at layer j's input (layer 0) or
        replacing the prompt positions (j >= 1); the returned sequence excludes the prompt positions."""

    @abstractmethod
    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooled output ``(B, pooled_width)`` task heads read (the model's final norm and pooler)."""

    @abstractmethod
    def attach_points(self) -> list[nn.Module]:
        """The modules whose output the ``attention_block`` site changes, in layer order (APT's attach points)."""

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
               pixel_mask: torch.Tensor | None = None, prompts: DeepPrompts | None = None,
               block: BlockAdapter | None = None, image_index: int = 0,
               image_type_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(final sequence ``(B, N, C)``, pooled output ``(B, C)``) of one batch of text-image pairs (``image_index``
        and ``image_type_offset`` as in :meth:`embed`)."""
        hidden, mask = self.embed(input_ids, attention_mask, pixel_values, pixel_mask, image_index, image_type_offset)
        hidden = self.run_layers(hidden, mask, prompts, block)
        return hidden, self.pool(hidden)

    @property
    def pooled_width(self) -> int:
        """Width of :meth:`pool`'s output, what task heads are sized by: ``width``, unless the family's pooled output
        is wider (BridgeTower concatenates its text and image poolers)."""
        return self.width

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the model's images are normalised with (ViLT's 0.5; BridgeTower's CLIP statistics)."""
        return (0.5, 0.5, 0.5)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return (0.5, 0.5, 0.5)

    @property
    def num_image_types(self) -> int:
        """How many images of a pair have their own modality type in this model (1 for a model pretrained on
        single images)."""
        return 1

    def matching_head(self) -> nn.Linear | None:
        """The checkpoint's image-text matching score ``Linear(C, 1)`` on the pooled output (a retrieval head, or
        a pretraining ITM head's match-minus-no-match logit), frozen; None when the checkpoint has none."""
        return None


def without_hub_kernels(model_kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments that keep transformers' own layers: with the ``kernels`` package
    installed (transformers 5 requires it), ``from_pretrained`` would otherwise switch a model's layers to kernels
    downloaded from the Hugging Face Hub the first time it is put in training mode on a GPU, failing offline and
    running code vlprompt never tested. A caller's explicit ``use_kernels`` wins."""
    from transformers.utils import is_kernels_available

    if is_kernels_available():
        return {"use_kernels": False, **model_kwargs}
    return dict(model_kwargs)
