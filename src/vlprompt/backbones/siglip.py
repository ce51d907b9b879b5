"""SigLIP (transformers ``SiglipModel``) and SigLIP 2 NaFlex (``Siglip2Model``) adapters.

Like the CLIP adapter, the towers run by looping over the model's own encoder layers, so prompt tokens can be
inserted or replaced at any layer's input without copying or patching transformers' code. Where SigLIP differs:

* Text. SigLIP was trained on texts padded to its whole context (``padding="max_length"``, 64 positions), with no
  attention mask and no start token, and pools the *last* position (padding for short texts) through a linear
  ``head``. So text prompts go first, the sequence is always padded (with the tokenizer's pad token) or cut back to
  exactly the context length, every position attends to every other (bidirectional), and a prompted text that does
  not fit is refused rather than silently cut.
* Image. There is no class token and the pooled feature comes from an attention-pooling ``head`` (a learned probe
  attending over all tokens). Prompts go after the patches ("end") or before them ("front") and act on the patches
  through self-attention, as VPT's do in a class-token ViT; they are dropped before ``post_layernorm`` and the
  pooling head, so the head sees exactly the patch tokens it was trained on. (Keeping them would let the head pool
  tokens it never saw in training, and would make the pooled feature depend on how many prompts there are.)
* Scoring. ``logit_scale.exp() * cos + logit_bias``, one sigmoid per class (``scoring="sigmoid"``).
* No linear projections into the joint space: SDPT's pseudo-inverses have nothing to invert on the image side.

SigLIP 2's fixed-resolution checkpoints are ``model_type="siglip"`` (plain ``SiglipModel`` weights with a Gemma
tokenizer) and load through :class:`SiglipBackbone`. Its NaFlex checkpoints (``Siglip2Model``) load through
:class:`Siglip2Backbone`, used at one fixed square resolution: see that class.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vlprompt.backbones.towers import (
    TransformersTwoTowers,
    block_hooks,
    expand_tokens,
    load_tokenizer,
    load_weights,
    replace_tokens,
)
from vlprompt.backbones.base import (
    CLASS_POSITIONS,
    IMAGE_PROMPTS_END,
    IMAGE_PROMPTS_FRONT,
    KIND_DUAL_ENCODER,
    SITE_BLOCK,
    SITE_IMAGE_SEQUENCE,
    SITE_JOINT_SPACE,
    SITE_LINEAR_PROJECTIONS,
    SITE_TOWER_WEIGHTS,
    SITE_TEXT_SEQUENCE,
    SITE_TRANSIENT_IMAGE,
    BackboneLoadError,
    BlockAdapter,
    DeepPrompts,
    FamilyInfo,
    TokenizedText,
    TransientPrompts,
    register_backbone,
)

SIGLIP_INFO = FamilyInfo(
    kind=KIND_DUAL_ENCODER,
    sites=frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE, SITE_JOINT_SPACE, SITE_BLOCK, SITE_TRANSIENT_IMAGE,
                     SITE_TOWER_WEIGHTS}),
    missing={
        SITE_LINEAR_PROJECTIONS: (
            "SigLIP's image features come from an attention-pooling head (a small transformer block), not a linear "
            "projection, so no pseudo-inverse maps joint-space vectors into the image tower"
        ),
    },
    image_prompt_positions=(IMAGE_PROMPTS_END, IMAGE_PROMPTS_FRONT),
    class_positions=CLASS_POSITIONS,
    scoring="sigmoid",
    # The encoder layers' self-attention only: the attention-pooling head is not an encoder layer.
    attention_projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                           "o": "self_attn.out_proj"},
)

# Config fields that fix the architecture (and so which prompts fit it): hashed into ``identity``.


class SiglipBackbone(TransformersTwoTowers):
    """A frozen SigLIP with prompt sites in both towers.

    Text features are ``head(final_layer_norm(x_last))`` over the full padded context; image features
    ``head(post_layernorm(patches))`` (attention pooling); both unnormalised. ``logit_scale`` is the (already
    exponentiated) temperature and ``logit_bias`` the bias added to every logit.
    """

    family = "siglip"
    info = SIGLIP_INFO
    text_prefix_tokens = 0  # no start token: prompts go first (an instance with a start-token tokenizer overrides)
    model_class_name = "SiglipModel"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any = None, name_or_path: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name_or_path = str(name_or_path)
        self.model.requires_grad_(False)
        self.model.eval()
        if getattr(model.vision_model, "head", None) is None:
            raise BackboneLoadError(
                f"{self.family} model {self.name_or_path!r} has no attention-pooling head (vision_use_head=False), "
                "so it has no pooled image features; use a checkpoint saved with its head."
            )
        text_cfg = model.config.text_config
        self.context_length: int = text_cfg.max_position_embeddings
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id: int = int(pad if pad is not None else text_cfg.pad_token_id)
        start = _start_tokens(tokenizer)
        if start:  # e.g. a Gemma tokenizer that adds <bos>: prompts go after it, as after CLIP's [SOS]
            self.text_prefix_tokens = start

    # ------------------------------------------------------------------ loading / identity
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **model_kwargs: Any) -> "SiglipBackbone":
        import transformers

        path = str(name_or_path)
        local = {"local_files_only": True} if Path(path).is_dir() else {}  # a folder never reaches the hub
        model = load_weights(getattr(transformers, cls.model_class_name), path, cls.family, **{**local, **model_kwargs})
        tokenizer = load_tokenizer(path, model, cls.family, **local)
        return cls(model, tokenizer, cls._load_image_processor(path, local, model), name_or_path=path)

    @classmethod
    def _load_image_processor(cls, path: str, local: dict[str, bool], model: nn.Module) -> Any:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(path, **local)
        except (OSError, ValueError):
            return None  # transforms fall back to the vision config's image size

    @property
    def identity(self) -> dict[str, Any]:
        """Name plus a hash of the architecture config: enough to refuse a prompt trained on another backbone."""
        return self.architecture_identity({"model_type": self.model.config.model_type})

    # ------------------------------------------------------------------ dimensions
    @property
    def embed_dim(self) -> int:
        # The pooling head keeps the vision width; the text head projects onto it.
        return self.model.config.vision_config.hidden_size

    @property
    def logit_bias(self) -> torch.Tensor:
        return self.model.logit_bias

    # ------------------------------------------------------------------ text tower
    def tokenize(self, texts: Sequence[str], special_tokens: bool = True) -> TokenizedText:
        """Ids padded on the right to the whole context (as SigLIP was trained), and each text's token count
        including the end-of-text ``</s>`` the tokenizer appends. Without special tokens: the words' tokens alone,
        padded to the longest."""
        rows = self.tokenizer(
            list(texts),
            add_special_tokens=special_tokens,
            truncation=special_tokens,
            max_length=self.context_length if special_tokens else None,
        )["input_ids"]
        # Padded here rather than by the tokenizer: some SigLIP tokenizers pad on the left or return no mask.
        width = self.context_length if special_tokens else max((len(r) for r in rows), default=0)
        ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        return TokenizedText(ids.view(len(rows), width), torch.tensor([len(r) for r in rows], dtype=torch.long))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (no positions) of token ids: the space CoOp-style contexts live in."""
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def encode_embedded(
        self,
        token_embeds: torch.Tensor,
        lengths: torch.Tensor,
        prompts: DeepPrompts | None = None,
        block: BlockAdapter | None = None,
    ) -> torch.Tensor:
        """Text features ``(S, d)`` of embedded sequences ``(S, T, d_t)`` whose first ``lengths`` positions are
        content (padding after; ``T`` need not be the context length).

        ``prompts.tokens[0]`` is inserted before the words (after a start token, if the tokenizer adds one);
        deeper entries replace those positions at later layers. The result is padded with the pad token's
        embedding (or its trailing padding dropped) to exactly the context length, position embeddings are added
        to every position (prompts included), and the tower runs unmasked and pools the last position, as
        ``SiglipModel`` does on a ``padding="max_length"`` text.
        """
        text_model = self.model.text_model
        n = _num_prompts(prompts, self.text_width, self.text_layers, "text")
        filled = lengths.to(token_embeds.device) + n
        longest = int(filled.max())
        if longest > self.context_length:
            raise ValueError(
                f"a prompted text needs {longest} positions but {self.family}'s text context is "
                f"{self.context_length}: use fewer prompt tokens or shorter class names / templates."
            )
        start = self.text_prefix_tokens
        hidden = token_embeds
        if n:
            first = expand_tokens(prompts.tokens[0], hidden.shape[0]).to(hidden.dtype)
            hidden = torch.cat([hidden[:, :start], first, hidden[:, start:]], dim=1)
        hidden = self._fill_context(hidden, filled)
        hidden = hidden + text_model.embeddings.position_embedding.weight[: self.context_length].to(hidden.dtype)
        with block_hooks(text_model.encoder.layers, block):
            for j, layer in enumerate(text_model.encoder.layers):
                if j > 0 and n:
                    hidden = replace_tokens(hidden, prompts.at(j), start=start)
                hidden = layer(hidden, None)  # no mask: SigLIP attends to its padding, as trained
        return text_model.head(text_model.final_layer_norm(hidden[:, -1]))

    def _fill_context(self, hidden: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """``hidden`` cut or padded to the context length, every position from ``filled`` on the pad embedding
        (whatever the caller left there), so the last, pooled position sees the padding SigLIP was trained on."""
        pad_id = torch.tensor(self.pad_token_id, device=hidden.device)
        pad = self.embed_tokens(pad_id).to(hidden.dtype)
        hidden = hidden[:, : self.context_length]
        missing = self.context_length - hidden.shape[1]
        if missing:
            hidden = torch.cat([hidden, pad.expand(hidden.shape[0], missing, -1)], dim=1)
        positions = torch.arange(self.context_length, device=hidden.device)
        beyond = positions.unsqueeze(0) >= filled.unsqueeze(1)
        return torch.where(beyond.unsqueeze(-1), pad, hidden)

    # ------------------------------------------------------------------ image tower
    def encode_image(
        self,
        pixel_values: torch.Tensor,
        prompts: DeepPrompts | None = None,
        position: str = IMAGE_PROMPTS_END,
        block: BlockAdapter | None = None,
        transient: TransientPrompts | None = None,
    ) -> torch.Tensor:
        """Image features ``(B, d)``.

        ``prompts.tokens[0]`` is inserted after the position embeddings (no position embedding on prompts), after
        the patches (``"end"``: VPT, IVLP, MaPLe) or before them (``"front"``: UPT); deeper entries replace those
        positions; they are dropped before the pooling head (see the module docstring). ``block`` changes each
        attention block's output (APT); ``transient`` tokens are appended to a layer's input and dropped from its
        output (DPT).
        """
        vision = self.model.vision_model
        if position not in self.info.image_prompt_positions:
            raise ValueError(f"image prompt position {position!r} unknown; choose one of "
                             f"{self.info.image_prompt_positions}")  # fmt: skip
        hidden = self._embed_patches(pixel_values)
        n = _num_prompts(prompts, self.vision_width, self.vision_layers, "image")
        start = 0 if position == IMAGE_PROMPTS_FRONT else hidden.shape[1]
        if n:
            first = expand_tokens(prompts.tokens[0], hidden.shape[0]).to(hidden.dtype)
            hidden = torch.cat([hidden[:, :start], first, hidden[:, start:]], dim=1)
        hidden = self.run_image_layers(hidden, prompts if n else None, start, block, transient)
        if n:
            hidden = torch.cat([hidden[:, :start], hidden[:, start + n :]], dim=1)
        return vision.head(vision.post_layernorm(hidden))

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus position embeddings ``(B, P, width)``, as the model's own embedding module makes."""
        embeddings = self.model.vision_model.embeddings
        return embeddings(pixel_values.to(embeddings.patch_embedding.weight.dtype))


class Siglip2Backbone(SiglipBackbone):
    """A frozen SigLIP 2 NaFlex model (``Siglip2Model``) used at one fixed square resolution.

    NaFlex takes pre-cut patches of any aspect ratio plus their grid (``spatial_shapes``) and a mask of padded
    patches. Here every image is a square of ``image_size = patch_size * sqrt(num_patches)`` pixels (256 px for
    the 256-patch models): its patches fill the whole sequence, so the mask is all ones (no padding to hide) and the
    position embeddings are the model's own grid, unresized. The text tower is SigLIP's. Images are cut into
    patches in the order Siglip2's image processor uses (row-major patches, each flattened as (y, x, channel)).
    """

    family = "siglip2"
    model_class_name = "Siglip2Model"

    @property
    def image_size(self) -> int:
        return self.patch_size * self._grid_side

    @property
    def _grid_side(self) -> int:
        return math.isqrt(self.model.config.vision_config.num_patches)

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.vision_model.embeddings
        patches, spatial_shapes = patchify(pixel_values, self.patch_size)
        return embeddings(patches.to(embeddings.patch_embedding.weight.dtype), spatial_shapes)

    @classmethod
    def _load_image_processor(cls, path: str, local: dict[str, bool], model: nn.Module) -> Any:
        """A square-resize processor with the NaFlex processor's statistics: what this fixed-resolution use needs
        (the NaFlex processor resizes each image to its own patch grid, which the data pipeline does not)."""
        naflex = super()._load_image_processor(path, local, model)
        if naflex is None:
            return None
        vision = model.config.vision_config
        return square_image_processor(vision.patch_size * math.isqrt(vision.num_patches), naflex)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square images ``(B, C, H, W)`` as NaFlex input: patches ``(B, h*w, p*p*C)`` and ``spatial_shapes`` ``(B, 2)``."""
    batch, channels, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image of {height}x{width} pixels is not a whole number of {patch_size}-pixel patches")
    rows, cols = height // patch_size, width // patch_size
    grid = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)
    spatial_shapes = torch.tensor([[rows, cols]], device=pixel_values.device).expand(batch, 2)
    return patches, spatial_shapes


def square_image_processor(size: int, like: Any = None) -> Any:
    """A SigLIP image processor resizing to ``size`` x ``size``, with ``like``'s statistics and resampling."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    values: dict[str, Any] = {"size": {"height": size, "width": size}}
    for key in ("image_mean", "image_std", "resample", "rescale_factor"):
        if getattr(like, key, None) is not None:
            values[key] = getattr(like, key)
    return SiglipImageProcessorPil(**values)


def _num_prompts(prompts: DeepPrompts | None, width: int, layers: int, tower: str) -> int:
    if prompts is None or not prompts.tokens:
        return 0
    prompts.validate(width, layers, tower)
    return prompts.num_tokens


def _start_tokens(tokenizer: Any) -> int:
    """How many special tokens the tokenizer puts before a text's words (0 for SigLIP's; 1 for a <bos> one)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return i
    return 0


register_backbone(["siglip"], SiglipBackbone)
register_backbone(["siglip2"], Siglip2Backbone)
