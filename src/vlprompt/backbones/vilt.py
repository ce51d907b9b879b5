"""ViLT (transformers' ``ViltModel``): one joint sequence of word and patch tokens through 12 pre-LayerNorm blocks.

Sites (``VILT_INFO``):
- ``attention_block``: each block's attention output after its output projection (``ViltSelfOutput``), before the
  residual, changed by a ``BlockAdapter`` that also sees the block's LayerNorm'd input (the ``input_tensor``
  transformers passes to ``ViltSelfOutput``): where APT sits in its native form.
- ``fusion_weights``: the model's own weights, all of them (full fine-tuning) or LoRA adapters (``peft``) on each
  block's attention projections.
- ``joint_sequence``: deep prompts appended after the text and patch tokens at the first block's input (attended
  by every token, unmasked) and replaced at each later block; the returned sequence drops them, so the pooler reads
  the same first token.

The adapter loops over transformers' own ``ViltLayer`` modules and calls the model's own embeddings, final norm and
pooler: nothing of the model is rewritten. Loading keeps the base model of any ViLT checkpoint folder (task heads
come with the tasks that train them), and of a retrieval checkpoint (``ViltForImageAndTextRetrieval``, e.g.
``dandelin/vilt-b32-finetuned-coco``) its image-text score ``rank_output`` too, frozen: :meth:`matching_head`,
what the retrieval task's head starts from (zero-shot retrieval).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from vlprompt.backbones.base import (
    KIND_FUSION_ENCODER,
    SITE_BLOCK,
    SITE_FUSION_WEIGHTS,
    SITE_JOINT_SEQUENCE,
    BackboneLoadError,
    BlockAdapter,
    DeepPrompts,
    FamilyInfo,
    FusionEncoderBackbone,
    TokenizedText,
    register_backbone,
    without_hub_kernels,
)

PATCH_ORDER_SEED = 0  # the seed of the patch order ViLT's embeddings draw (see ViltBackbone.embed)
VILT_INFO = FamilyInfo(kind=KIND_FUSION_ENCODER, sites=frozenset({SITE_BLOCK, SITE_JOINT_SEQUENCE, SITE_FUSION_WEIGHTS}),
                       attention_projections={"q": "attention.attention.query", "k": "attention.attention.key",
                                              "v": "attention.attention.value", "o": "attention.output.dense"})
# Config fields that make a ViLT architecture: a prompt trained on one refuses another that differs in them.
VILT_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                    "max_position_embeddings", "image_size", "patch_size", "modality_type_vocab_size",
                    "max_image_length")  # fmt: skip


class ViltBackbone(FusionEncoderBackbone):
    """A frozen ViLT with the attention-block and joint-sequence sites."""

    info = VILT_INFO

    def __init__(self, model: nn.Module, tokenizer, name_or_path: str = "", matching: nn.Linear | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = str(name_or_path)
        self.model.requires_grad_(False)
        self.model.eval()
        # A retrieval checkpoint's score Linear(C, 1) on the pooled output (frozen; outside ``model``, so it is not
        # counted among the encoder's parameters nor trained by full tuning); None for other checkpoints.
        self.matching = matching.requires_grad_(False) if matching is not None else None
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """Refuse a tokenizer that reads ordinary words as unknown (transformers builds an empty BERT tokenizer
        for a folder whose vocabulary files are missing, without an error)."""
        tok = self.tokenizer
        ids = tok("a photo of the cat", add_special_tokens=False)["input_ids"]
        if not ids or all(i == tok.unk_token_id for i in ids) or len(tok) > self.model.config.vocab_size:
            raise BackboneLoadError(
                f"ViLT at {self.name_or_path!r} has a tokenizer of {len(tok)} tokens that reads ordinary words as "
                f"unknown (or more tokens than the model's {self.model.config.vocab_size} embeddings): save the "
                "checkpoint's own BERT tokenizer beside its weights (tokenizer.save_pretrained(folder))."
            )

    # ------------------------------------------------------------------ loading / identity
    @property
    def family(self) -> str:
        return "vilt"

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **model_kwargs) -> "ViltBackbone":
        from transformers import AutoTokenizer, ViltConfig, ViltForImageAndTextRetrieval, ViltModel

        path = str(name_or_path)
        kwargs = without_hub_kernels(model_kwargs)
        matching = None
        try:
            architectures = ViltConfig.from_pretrained(path).architectures or []
            if "ViltForImageAndTextRetrieval" in architectures:  # keep its image-text score: the retrieval head
                retrieval = ViltForImageAndTextRetrieval.from_pretrained(path, **kwargs)
                model, matching = retrieval.vilt, retrieval.rank_output
            else:
                model = ViltModel.from_pretrained(path, **kwargs)
        except OSError as err:
            raise BackboneLoadError(f"could not load a ViLT model from {path!r}: {err}. A model folder needs "
                                    "config.json and model.safetensors, as written by save_pretrained.") from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as err:
            raise BackboneLoadError(f"ViLT at {path!r} has no usable tokenizer ({err}); save its BERT tokenizer beside "
                                    f"the weights: tokenizer.save_pretrained({path!r}).") from err
        return cls(model, tokenizer, name_or_path=path, matching=matching)

    @property
    def identity(self) -> dict:
        cfg = self.model.config.to_dict()
        arch = {"model_type": "vilt", **{k: cfg.get(k) for k in VILT_ARCH_FIELDS}}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        return {"family": self.family, "name_or_path": self.name_or_path, "config_hash": digest, "arch": arch}

    # ------------------------------------------------------------------ dimensions
    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.model.encoder.layer)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def max_text_length(self) -> int:
        return self.model.config.max_position_embeddings

    # ------------------------------------------------------------------ the joint sequence
    def tokenize(self, texts: Sequence[str]) -> TokenizedText:
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.max_text_length, truncation=True,
                             return_tensors="pt")  # fmt: skip
        return TokenizedText(input_ids=enc["input_ids"], lengths=enc["attention_mask"].sum(dim=1))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
              pixel_mask: torch.Tensor | None = None, image_index: int = 0,
              image_type_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long,
                                    device=pixel_values.device)  # fmt: skip
        weight_dtype = self.model.embeddings.patch_embeddings.projection.weight.dtype
        image_type = 1 + image_index if image_index < self.num_image_types else 1
        # ViLT's embeddings draw the order of the patch tokens from the global random generator on every call.
        # The outputs do not depend on that order (up to float rounding), but drawing it from a fixed seed makes
        # every forward reproducible and leaves the caller's random stream (data order, dropout) untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PATCH_ORDER_SEED)
            hidden, mask = self.model.embeddings(input_ids, attention_mask, None, pixel_values.to(weight_dtype),
                                                 pixel_mask, None, None, image_token_type_idx=image_type)  # fmt: skip
        if image_type_offset is not None:
            text_length = input_ids.shape[1]
            offset = torch.zeros_like(hidden[0])
            offset[text_length:] = image_type_offset.to(hidden.dtype)
            hidden = hidden + offset
        return hidden, mask

    @property
    def num_image_types(self) -> int:
        # modality types: 0 text, then one per image of a pair (ViLT's NLVR2 checkpoints have 3)
        return max(1, self.model.config.modality_type_vocab_size - 1)

    def matching_head(self) -> nn.Linear | None:
        return self.matching

    def _attention_mask(self, hidden: torch.Tensor, mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        # the model's own mask builder, as ViltModel.forward calls it
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, prompts: DeepPrompts | None = None,
                   block: BlockAdapter | None = None) -> torch.Tensor:  # fmt: skip
        layers = self.model.encoder.layer
        n = 0
        if prompts is not None and prompts.tokens:
            prompts.validate(self.width, len(layers), "joint")
            n = prompts.num_tokens
        length = hidden.shape[1]
        if n:
            first = prompts.tokens[0]
            first = first.unsqueeze(0).expand(hidden.shape[0], -1, -1) if first.dim() == 2 else first
            hidden = torch.cat([hidden, first.to(hidden.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)
        attention_mask = self._attention_mask(hidden, mask)
        with attention_block_hooks(self.attach_points(), block):
            for j, layer in enumerate(layers):
                deep = prompts.at(j) if (n and j > 0) else None
                if deep is not None:
                    deep = deep.unsqueeze(0).expand(hidden.shape[0], -1, -1) if deep.dim() == 2 else deep
                    hidden = torch.cat([hidden[:, :length], deep.to(hidden.dtype)], dim=1)
                out = layer(hidden, attention_mask)
                hidden = out[0] if isinstance(out, tuple) else out
        return hidden[:, :length]

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.pooler(self.model.layernorm(hidden))

    def final_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's ``last_hidden_state``: the fusion layers' output after the final LayerNorm."""
        return self.model.layernorm(hidden)

    def attach_points(self) -> list[nn.Module]:
        return [layer.attention.output for layer in self.model.encoder.layer]

    # ------------------------------------------------------------------ the encoder's own weights
    def named_weights(self, parts: Sequence[str] = ()) -> dict[str, nn.Parameter]:
        """The model's weights by their name (LoRA adapters excluded): all of them (full fine-tuning), or the
        ``parts`` named: ``pooler``, ``token_types`` (the modality-type embeddings)."""
        prefixes = {"pooler": "pooler.", "token_types": "embeddings.token_type_embeddings."}
        unknown = [p for p in parts if p not in prefixes]
        if unknown:
            raise ValueError(f"unknown ViLT weight parts {unknown}; choose from {sorted(prefixes)}")
        weights = {n: p for n, p in self.model.named_parameters() if "lora_" not in n}
        if not parts:
            return weights
        wanted = tuple(prefixes[p] for p in parts)
        return {n: p for n, p in weights.items() if n.startswith(wanted)}

    def add_lora(self, r: int, alpha: float, dropout: float,
                 projections: Sequence[str] = ("q", "v")) -> dict[str, nn.Parameter]:  # fmt: skip
        """Inject LoRA adapters (``peft``) into the attention ``projections`` (roles of ``info.attention_projections``)
        of every block; returns them by their name in ``model``. A backbone takes one set of adapters."""
        return self.inject_lora(list(self.model.encoder.layer), projections, r, alpha, dropout)


@contextmanager
def attention_block_hooks(points: Sequence[nn.Module], block: BlockAdapter | None) -> Iterator[None]:
    """Route each attach point's output through ``block(j, x, attn_out)`` for one forward pass; ``x`` is the
    LayerNorm'd block input the point receives as its second argument (``input_tensor``)."""
    if block is None:
        yield
        return
    handles = []
    for j, point in enumerate(points):
        def hook(module, args, output, j=j):
            changed = block(j, args[1], output)
            return output if changed is None else changed

        handles.append(point.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


register_backbone(["vilt"], ViltBackbone)
