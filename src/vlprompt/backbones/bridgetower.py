"""BridgeTower (transformers' ``BridgeTowerModel``): a text and an image encoder joined by bridge layers to L
co-attention layers in two streams (base: RoBERTa-base, CLIP ViT-B/16, L = 6, width C = 768). METER's layout,
plus the bridges.

How the fusion-encoder contract maps onto two streams (see base.py's ``FusionEncoderBackbone``):

- ``embed`` runs everything the sites never change, the two uni-modal encoders and the bridges' inputs, and returns
  the *bridge sequence* ``(B, L * (T + I), C)``: L blocks, one per co-attention layer, each ``[text (T), image
  (I)]``. Block 0 is the first co-attention layer's input; block l >= 1 is what the bridge (``link tower``) of
  layer l adds to the previous layer's outputs (a top uni-modal layer's output, projected, plus its modality type).
  Its mask repeats ``[text mask, ones]`` per block. Nothing is remembered between calls: ``run_layers`` and ``pool``
  derive T from the length, since the image stream always has ``(image_size / patch_size)^2 + 1`` tokens.
- ``run_layers`` runs the bridges and the co-attention layers and returns the final sequence ``(B, T + I, C)``:
  the text stream's output, then the image stream's (the model's ``text_features`` and ``image_features``).
- ``pool`` is the model's own pooled output: the text and image poolers' outputs concatenated, ``(B, 2C)``
  (``pooled_width``); ``width`` stays C, the width of every stream, attach point and prompt token.

Sites (``BRIDGETOWER_INFO``):

- ``attention_block``: 4 L attach points (base: 24), the self- and cross-attention outputs of every co-attention
  layer in both streams, in the order of the forward: for each layer l, text self-attention (4l), text
  cross-attention (4l + 1), image self-attention (4l + 2), image cross-attention (4l + 3). At each, the block adapter
  sees ``x``, the stream's hidden state entering that attention (its queries; for cross-attention the stream's own
  state, not the other stream's), and the attention output after its output projection (``dense``), before dropout,
  the residual and the LayerNorm (these layers are post-LN): where the APT release puts its module in METER
  (``METER/meter/modules/bert_model_apt.py``, ``BertSelfOutput``: dense, APT, dropout, LayerNorm(h + input)).
- ``joint_sequence``: deep prompts as the APT release's METER baseline places them
  (``METER/meter/modules/meter_module_prompt.py``): at co-attention layer l, ``tokens[l]`` ``(N, C)`` holds N / 2
  text-stream prompts, which the image stream's cross-attention attends to besides the text tokens, then N / 2
  image-stream prompts, which the text stream's cross-attention attends to. They are keys and values of that one
  layer only: no stream's queries, self-attention or feed-forward sees them, nothing carries over to the next layer
  (a layer without tokens has none), and they are never masked. The release uses 200 per stream per layer
  (``n_prompts = 400`` here: 6 x 400 x 768 = 1.84M trainable on the base architecture).
- ``fusion_weights``: all weights (full fine-tuning), named parts (``pooler``, ``token_types``: what APT's release
  trains besides APT), or LoRA (``peft``) on the q/k/v/output projections of the self- and cross-attention of every
  co-attention layer.

Loading keeps the base model of any BridgeTower checkpoint folder; a retrieval checkpoint
(``BridgeTowerForImageAndTextRetrieval``) also gives its matching head (``matching_head``).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

# Roles of one attention module (``BridgeTowerAttention``: ``self`` and ``output``) for LoRA: add_lora hands inject_lora
# every self- and cross-attention module of the co-attention layers.
BRIDGETOWER_INFO = FamilyInfo(kind=KIND_FUSION_ENCODER,
                              sites=frozenset({SITE_BLOCK, SITE_JOINT_SEQUENCE, SITE_FUSION_WEIGHTS}),
                              attention_projections={"q": "self.query", "k": "self.key", "v": "self.value",
                                                     "o": "output.dense"})  # fmt: skip
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Config fields that make a BridgeTower architecture: a prompt trained on one refuses another that differs in them.
TEXT_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "hidden_act", "max_position_embeddings", "type_vocab_size", "pad_token_id")  # fmt: skip
VISION_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "patch_size", "image_size", "share_layernorm",
                      "remove_last_layer")  # fmt: skip
CROSS_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "share_cross_modal_transformer_layers",
                     "share_link_tower_layers", "link_tower_type")  # fmt: skip
# METER's and BridgeTower's fine-tuning text length (VQA, NLVR2); RoBERTa's 512 positions would make every text
# stream ten times longer than its questions.
MAX_TEXT_LENGTH = 50
# Weights BridgeTowerModel's forward never reads (the text encoder's own pooler): full tuning leaves them out.
UNUSED_PREFIXES = ("text_model.pooler.",)
RETRIEVAL_ARCHITECTURE = "BridgeTowerForImageAndTextRetrieval"


class BridgeTowerBackbone(FusionEncoderBackbone):
    """A frozen BridgeTower with the attention-block, joint-sequence and fusion-weight sites."""

    info = BRIDGETOWER_INFO

    def __init__(self, model: nn.Module, tokenizer, name_or_path: str = "", itm_score: nn.Linear | None = None,
                 max_text_length: int = MAX_TEXT_LENGTH) -> None:  # fmt: skip
        super().__init__()
        if hasattr(model, "bridgetower"):  # a retrieval model: its base model, and its matching head
            itm_score = model.itm_score.fc if itm_score is None else itm_score
            model = model.bridgetower
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = str(name_or_path)
        self.itm_score = itm_score
        self.model.requires_grad_(False)
        self.model.eval()
        if itm_score is not None:
            itm_score.requires_grad_(False)
        text = self.model.config.text_config
        # RoBERTa's position ids start after the padding id: a text of T tokens needs T + pad + 1 positions.
        self._max_text_length = min(max_text_length, text.max_position_embeddings - text.pad_token_id - 1)
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """Refuse a tokenizer the model cannot read: more tokens than embeddings, a padding id that is not the
        model's (its position ids skip padding by that id), or one that reads ordinary words as unknown."""
        tok, text = self.tokenizer, self.model.config.text_config
        ids = tok("a photo of the cat", add_special_tokens=False)["input_ids"]
        if (not ids or all(i == tok.unk_token_id for i in ids) or len(tok) > text.vocab_size
                or tok.pad_token_id != text.pad_token_id):  # fmt: skip
            raise BackboneLoadError(
                f"BridgeTower at {self.name_or_path!r} has a tokenizer of {len(tok)} tokens (padding id "
                f"{tok.pad_token_id}) that does not fit the model's {text.vocab_size} embeddings (padding id "
                f"{text.pad_token_id}): save the checkpoint's own RoBERTa tokenizer beside its weights "
                "(tokenizer.save_pretrained(folder))."
            )

    # ------------------------------------------------------------------ loading / identity
    @property
    def family(self) -> str:
        return "bridgetower"

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **model_kwargs: Any) -> "BridgeTowerBackbone":
        from transformers import AutoConfig, AutoTokenizer, BridgeTowerForImageAndTextRetrieval, BridgeTowerModel

        path = str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise BackboneLoadError(f"could not read a BridgeTower config from {path!r} ({_first_line(err)}); a model "
                                    "folder needs config.json and model.safetensors, as written by "
                                    "save_pretrained.") from err  # fmt: skip
        if config.model_type != "bridgetower":
            raise BackboneLoadError(f"{path!r} holds a {config.model_type!r} model, not BridgeTower: load it with "
                                    "vlprompt.backbones.load_backbone, which picks its family's adapter.")  # fmt: skip
        retrieval = RETRIEVAL_ARCHITECTURE in (config.architectures or [])
        model_class = BridgeTowerForImageAndTextRetrieval if retrieval else BridgeTowerModel
        try:
            model = model_class.from_pretrained(path, **without_hub_kernels(model_kwargs))
        except OSError as err:
            raise BackboneLoadError(f"could not load BridgeTower weights from {path!r} ({_first_line(err)}); a model "
                                    "folder needs model.safetensors beside config.json, as written by "
                                    "save_pretrained.") from err  # fmt: skip
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise BackboneLoadError(f"BridgeTower at {path!r} has no usable tokenizer ({_first_line(err)}); save its "
                                    "RoBERTa tokenizer beside the weights: "
                                    f"tokenizer.save_pretrained({path!r}).") from err
        return cls(model, tokenizer, name_or_path=path)

    @property
    def identity(self) -> dict:
        cfg = self.model.config.to_dict()
        arch = {
            "model_type": "bridgetower",
            "text": {k: cfg["text_config"].get(k) for k in TEXT_ARCH_FIELDS},
            "vision": {k: cfg["vision_config"].get(k) for k in VISION_ARCH_FIELDS},
            "cross_modal": {k: cfg.get(k) for k in CROSS_ARCH_FIELDS},
            "token_types": self.model.token_type_embeddings.num_embeddings,
        }
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        return {"family": self.family, "name_or_path": self.name_or_path, "config_hash": digest, "arch": arch}

    # ------------------------------------------------------------------ dimensions
    @property
    def width(self) -> int:
        """C: the co-attention layers' width (every stream token, attach point and prompt token)."""
        return self.model.config.hidden_size

    @property
    def pooled_width(self) -> int:
        """Width of :meth:`pool`'s output: the text and image poolers' outputs side by side (2C)."""
        return 2 * self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        """L: co-attention layers (each has a text-stream and an image-stream layer)."""
        return len(self.model.cross_modal_text_layers)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return CLIP_MEAN  # BridgeTower's image processor normalises as its CLIP image encoder was trained

    @property
    def image_std(self) -> tuple[float, float, float]:
        return CLIP_STD

    @property
    def image_tokens(self) -> int:
        """I: tokens of the image stream (the class token and one per patch)."""
        vision = self.model.config.vision_config
        return (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1

    @property
    def max_text_length(self) -> int:
        return self._max_text_length

    @property
    def num_image_types(self) -> int:
        # modality types: 0 text, then one per image of a pair (the released checkpoints have 2 types: one image)
        return max(1, self.model.token_type_embeddings.num_embeddings - 1)

    # ------------------------------------------------------------------ the bridge sequence
    def tokenize(self, texts: Sequence[str]) -> TokenizedText:
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.max_text_length, truncation=True,
                             return_tensors="pt")  # fmt: skip
        return TokenizedText(input_ids=enc["input_ids"], lengths=enc["attention_mask"].sum(dim=1))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
              pixel_mask: torch.Tensor | None = None, image_index: int = 0,
              image_type_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The bridge sequence ``(B, L (T + I), C)`` and its mask (module docstring); ``pixel_mask`` is unused, as
        in ``BridgeTowerModel`` (images are never padded)."""
        model = self.model
        text_tops, image_tops = self._bridged_outputs(input_ids, attention_mask, pixel_values)
        text_type, image_type = self._type_embeddings(image_index, input_ids.device)
        blocks = []
        for l, (text_top, image_top) in enumerate(zip(text_tops, image_tops)):
            text_in = model._apply_text_transform(text_top, l) + text_type.expand(*text_top.shape[:2], -1)
            image_in = model._apply_image_transform(image_top, l) + image_type.expand(*image_top.shape[:2], -1)
            if image_type_offset is not None:  # at every bridge, as the image type it stands in for
                image_in = image_in + image_type_offset.to(image_in.dtype)
            if l == 0:
                text_in = model.cross_modal_text_layernorm(text_in)
                image_in = model.cross_modal_image_layernorm(image_in)
            blocks.append(torch.cat([text_in, image_in], dim=1))
        image_ones = attention_mask.new_ones(attention_mask.shape[0], self.image_tokens)
        mask = torch.cat([attention_mask, image_ones], dim=1).repeat(1, self.num_layers)
        return torch.cat(blocks, dim=1), mask

    def _bridged_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """The outputs of the L top layers of each uni-modal encoder, one per co-attention layer (the image's after
        its final LayerNorm, batch first), as ``BridgeTowerModel.forward`` computes them."""
        model = self.model
        text_layers, image_blocks = model.text_model.encoder.layer, model.vision_model.visual.transformer.resblocks
        visual, vision_dtype = model.vision_model.visual, model.vision_model.dtype
        text = model.text_model.embeddings(input_ids=input_ids)
        text_mask = self._key_mask(text, attention_mask)
        # the layers below the bridged ones run first; the last of them feeds the first co-attention layer
        split = len(text_layers) - self.num_layers + 1
        for layer in text_layers[:split]:
            text = layer(text, text_mask)
        image = visual.forward_pre(pixel_values.type(vision_dtype))  # (I, B, C_v): not batch first
        for image_block in image_blocks[:split]:
            image = image_block(image)
        text_tops, image_tops = [text], [visual.forward_post(image.type(vision_dtype))]
        for i in range(split, len(text_layers)):
            text = text_layers[i](text, text_mask)
            image = image_blocks[i](image).type(vision_dtype)
            text_tops.append(text)
            image_tops.append(visual.forward_post(image))
        return text_tops, image_tops

    def _type_embeddings(self, image_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's and this image's modality-type embeddings, ``(1, C)`` each."""
        image_type = 1 + image_index if image_index < self.num_image_types else 1
        types = self.model.token_type_embeddings
        ids = torch.tensor([0, image_type], dtype=torch.long, device=device)
        text_type, image_type_embedding = types(ids).split(1)
        return text_type, image_type_embedding

    def _key_mask(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The additive mask ``(B, 1, 1, K)`` over K keys from a ``(B, K)`` padding mask (None when nothing is
        masked), built as ``BridgeTowerModel.forward`` builds its text mask."""
        from transformers.masking_utils import create_bidirectional_mask

        # one query row: the mask broadcasts over the queries of either stream
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden[:, 0:1], attention_mask=mask)

    def stream_lengths(self, length: int, blocks: int = 1) -> tuple[int, int]:
        """(T, I) of a sequence of ``length`` tokens made of ``blocks`` ``[text, image]`` blocks."""
        image = self.image_tokens
        if length % blocks or length // blocks <= image:
            raise ValueError(f"a BridgeTower sequence of {length} tokens is not {blocks} block(s) of text tokens and "
                             f"{image} image tokens: pass the sequence embed returns (or run_layers' output to pool)")
        return length // blocks - image, image

    def split_streams(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text and image streams of a final sequence (``run_layers``' output)."""
        text_length, _ = self.stream_lengths(sequence.shape[1])
        return sequence[:, :text_length], sequence[:, text_length:]

    def _link(self, stream: str, layer: int) -> nn.Module:
        towers = getattr(self.model, f"cross_modal_{stream}_link_tower")
        return towers if self.model.config.share_link_tower_layers else towers[layer - 1]

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, prompts: DeepPrompts | None = None,
                   block: BlockAdapter | None = None) -> torch.Tensor:  # fmt: skip
        model = self.model
        text_length, image_length = self.stream_lengths(hidden.shape[1], self.num_layers)
        half = self._prompts_per_stream(prompts)
        text_mask = mask[:, :text_length]
        self_mask = self._key_mask(hidden, text_mask)
        # the image stream's cross-attention keys: the text tokens, then the text-stream prompts (never masked)
        prompted_mask = (self._key_mask(hidden, torch.cat([text_mask, text_mask.new_ones(len(text_mask), half)], 1))
                         if half else self_mask)  # fmt: skip
        blocks = hidden.split(text_length + image_length, dim=1)
        text, image = blocks[0][:, :text_length], blocks[0][:, text_length:]
        with attention_output_hooks(self.attach_points(), block):
            for l in range(self.num_layers):
                if l:  # the bridges: this layer's uni-modal inputs joined to the previous layer's outputs
                    text = self._link("text", l)(blocks[l][:, :text_length], text, self_mask)
                    image = self._link("image", l)(blocks[l][:, text_length:], image, None)
                tokens = prompts.at(l) if half else None
                text_keys, image_keys = _with_prompts(text, image, tokens, half)
                keys_mask = self_mask if tokens is None else prompted_mask
                # both streams' layers read the other stream's input to this layer, as BridgeTowerModel.forward does
                new_text = model.cross_modal_text_layers[l](text, image_keys, attention_mask=self_mask)[0]
                image = model.cross_modal_image_layers[l](image, text_keys, encoder_attention_mask=keys_mask)[0]
                text = new_text
        return torch.cat([text, image], dim=1)

    def _prompts_per_stream(self, prompts: DeepPrompts | None) -> int:
        if prompts is None or not prompts.tokens:
            return 0
        prompts.validate(self.width, self.num_layers, "co-attention")
        n = prompts.num_tokens
        if n % 2:
            raise ValueError(f"BridgeTower deep prompts are split evenly between the text and image streams: give an "
                             f"even number of tokens per layer, got {n}")
        return n // 2

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's ``pooler_output`` ``(B, 2C)``: its text pooler on the first text token and its image pooler on
        the image class token, concatenated."""
        text, image = self.split_streams(hidden)
        return self.model.get_cls_features(text, image)

    def attach_points(self) -> list[nn.Module]:
        """Per co-attention layer: text self-, text cross-, image self-, image cross-attention output modules
        (``BridgeTowerSelfOutput``; the change applies to their ``dense`` output)."""
        points = []
        for text_layer, image_layer in zip(self.model.cross_modal_text_layers, self.model.cross_modal_image_layers):
            for layer in (text_layer, image_layer):
                points += [layer.attention.output, layer.crossattention.output]
        return points

    def matching_head(self) -> nn.Linear | None:
        """A retrieval checkpoint's ITM score as one logit, match minus no-match: ``Linear(2C, 1)``, frozen."""
        if self.itm_score is None:
            return None
        weight, bias = self.itm_score.weight.detach(), self.itm_score.bias.detach()
        head = nn.Linear(weight.shape[1], 1, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight[1:] - weight[:1])
            head.bias.copy_(bias[1:] - bias[:1])
        return head.requires_grad_(False)

    # ------------------------------------------------------------------ the encoder's own weights
    def named_weights(self, parts: Sequence[str] = ()) -> dict[str, nn.Parameter]:
        """The model's weights by their name (LoRA adapters and weights the forward never reads excluded): all of
        them (full fine-tuning), or the ``parts`` named: ``pooler`` (the text and image poolers of the co-attention
        layers), ``token_types`` (their modality-type embeddings)."""
        prefixes = {"pooler": ("cross_modal_text_pooler.", "cross_modal_image_pooler."),
                    "token_types": ("token_type_embeddings.",)}  # fmt: skip
        unknown = [p for p in parts if p not in prefixes]
        if unknown:
            raise ValueError(f"unknown BridgeTower weight parts {unknown}; choose from {sorted(prefixes)}")
        weights = {n: p for n, p in self.model.named_parameters()
                   if "lora_" not in n and not n.startswith(UNUSED_PREFIXES)}  # fmt: skip
        if not parts:
            return weights
        wanted = tuple(prefix for part in parts for prefix in prefixes[part])
        return {n: p for n, p in weights.items() if n.startswith(wanted)}

    def add_lora(self, r: int, alpha: float, dropout: float,
                 projections: Sequence[str] = ("q", "v")) -> dict[str, nn.Parameter]:  # fmt: skip
        """Inject LoRA adapters (``peft``) into the ``projections`` (q, k, v, o) of the self- and cross-attention of
        every co-attention layer in both streams; returns them by their name in ``model``."""
        attentions = [attention for layer in [*self.model.cross_modal_text_layers, *self.model.cross_modal_image_layers]
                      for attention in (layer.attention, layer.crossattention)]  # fmt: skip
        return self.inject_lora(attentions, projections, r, alpha, dropout)


@contextmanager
def attention_output_hooks(points: Sequence[nn.Module], block: BlockAdapter | None) -> Iterator[None]:
    """Route each attach point's ``dense`` output through ``block(j, x, attn_out)`` for one forward pass; ``x`` is
    the query-side hidden state the point receives as ``input_tensor`` (its residual), remembered by a pre-hook."""
    if block is None:
        yield
        return
    queries: dict[int, torch.Tensor] = {}
    handles = []
    for j, point in enumerate(points):
        def remember(module, args, j=j):
            queries[j] = args[1]

        def adapt(module, args, output, j=j):
            changed = block(j, queries.pop(j), output)
            return output if changed is None else changed

        handles.append(point.register_forward_pre_hook(remember))
        handles.append(point.dense.register_forward_hook(adapt))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        queries.clear()


def _with_prompts(text: torch.Tensor, image: torch.Tensor, tokens: torch.Tensor | None,
                  half: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each stream as the other stream's cross-attention keys: with its half of ``tokens`` appended (the first half
    joins the text stream, the second the image stream)."""
    if tokens is None:
        return text, image
    tokens = tokens.to(text.dtype)
    tokens = tokens.unsqueeze(0).expand(len(text), -1, -1) if tokens.dim() == 2 else tokens
    return torch.cat([text, tokens[:, :half]], dim=1), torch.cat([image, tokens[:, half:]], dim=1)


def _first_line(err: BaseException) -> str:
    """An exception's message on one line (transformers' loading errors span several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


register_backbone(["bridgetower"], BridgeTowerBackbone)
