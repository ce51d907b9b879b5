"""Grounding DINO (transformers ``GroundingDinoForObjectDetection``, and MM-Grounding-DINO which shares its layout)
adapter: the only module that knows the detector's internals.

Sites it offers (``backbones/base.py``):

- ``fusion_attention``: the bi-directional attention of every encoder layer's fusion block. A method reads each
  layer's projections (:meth:`GroundingDinoBackbone.fusion_site`) and hands :class:`FusionTokens` to
  :meth:`GroundingDinoBackbone.detect`; torch forward hooks on the model's own attention modules append them to
  both inputs, extend both masks and drop their output rows, for one forward pass.
- ``detection_text``: learned word embeddings at the BERT text encoder's input, ``n`` of them at the start of every
  category phrase (a forward hook on the model's own word-embedding module replaces placeholder positions).
- ``detector_weights``: the prediction heads, all weights, or LoRA adapters (through ``peft``) of the detector, and
  its own losses (Hungarian matching, focal class loss over text tokens, L1 and GIoU box losses).

The text prompt is the category names joined as Grounding DINO reads them: ``[CLS] cat . dog . [SEP]``. Each
phrase is one label; a category's score for a query is the mean of the sigmoid token logits over its phrase (as
Grounding DINO's COCO evaluation does with its normalised positive map).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from vlprompt.backbones.base import (
    KIND_FUSION_DETECTOR,
    SITE_DETECTION_TEXT,
    SITE_DETECTION_TEXT_FEATURES,
    SITE_DETECTOR,
    SITE_FUSION,
    BackboneLoadError,
    FamilyInfo,
    FusionDetectorBackbone,
    FusionTokens,
    register_backbone,
    without_hub_kernels,
)

@contextmanager
def loss_of_this_process_only() -> Iterator[None]:
    """Within a job of several processes, make transformers' detection loss normalise by this process's own target
    boxes. Left alone, it averages the box count over the processes inside the forward pass (an all-reduce that a
    process with an empty slice never reaches, and a normaliser that scales the summed gradient by the number of
    processes); vlprompt's trainer weights each process's loss by its share of the global batch's boxes instead
    (``DetectionTask.loss_weight``). A no-op in a single process."""
    from vlprompt.engine.distributed import world_size

    if world_size() == 1:
        yield
        return
    from transformers.loss import loss_for_object_detection

    available = loss_for_object_detection.is_accelerate_available
    loss_for_object_detection.is_accelerate_available = lambda: False
    try:
        yield
    finally:
        loss_for_object_detection.is_accelerate_available = available


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers' model class per model_type (both share the module layout this adapter uses)
DETECTOR_CLASSES = {
    "grounding-dino": "GroundingDinoForObjectDetection",
    "mm-grounding-dino": "MMGroundingDinoForObjectDetection",
}
# LoRA default: the attention projections of the encoder (fusion, text enhancer, deformable) and decoder layers.
LORA_TARGETS = (
    r"model\.(encoder|decoder)\.layers\.\d+\.("
    r"fusion_layer\.attn\.(vision_proj|text_proj|values_vision_proj|values_text_proj|out_vision_proj|out_text_proj)"
    r"|text_enhancer_layer\.self_attn\.(query|key|value|out_proj)"
    r"|(deformable_layer\.self_attn|encoder_attn)\.(value_proj|output_proj)"
    r"|(self_attn|encoder_attn_text)\.(query|key|value|out_proj))"
)


@dataclass(frozen=True)
class DetectionImageConfig:
    """How images are fed to the detector: DETR-style resize (shortest edge, capped longest edge) + normalisation."""

    shortest_edge: int = 800
    longest_edge: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_folder(cls, folder: str | Path) -> "DetectionImageConfig":
        path = Path(folder) / "preprocessor_config.json"
        if not path.exists():
            return cls()
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BackboneLoadError(f"{path} is not valid JSON ({err})") from err
        size = cfg.get("size") or {}
        return cls(
            shortest_edge=int(size.get("shortest_edge", 800)),
            longest_edge=int(size.get("longest_edge", 1333)),
            mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("image_std", IMAGENET_STD)),
        )

    def processor_dict(self) -> dict:
        """The fields of a ``preprocessor_config.json`` (as transformers' GroundingDinoImageProcessor writes them)."""
        return {
            "image_processor_type": "GroundingDinoImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.shortest_edge, "longest_edge": self.longest_edge},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_pad": True,
        }


@dataclass(frozen=True)
class FusionSite:
    """One fusion layer's bi-directional attention: the projections into its aligning space (torch layout
    ``weight (E, width)``): ``q = v W_v^T + b_v`` (vision queries), ``k = l W_l^T + b_l`` (text keys), plus the value
    projections of both modalities."""

    vision_query: nn.Linear
    text_key: nn.Linear
    vision_value: nn.Linear
    text_value: nn.Linear
    embed_dim: int
    vision_dim: int
    text_dim: int
    num_heads: int


class DetectionText(nn.Module):
    """A tokenised category prompt: ``[CLS] (ctx) name1 . (ctx) name2 . [SEP]``.

    ``context_index[t]`` is ``j`` where position ``t`` holds learned context token ``j`` (-1 for words);
    ``label_map[c]`` marks the positions of category ``c``'s phrase (what the detector's loss treats as its label).
    Buffers (not saved): they follow the method across devices.
    """

    def __init__(self, input_ids: torch.Tensor, context_index: torch.Tensor, label_map: torch.Tensor,
                 n_context: int) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("input_ids", input_ids, persistent=False)  # (T,)
        self.register_buffer("context_index", context_index, persistent=False)  # (T,)
        self.register_buffer("label_map", label_map, persistent=False)  # (C, T)
        self.n_context = n_context


GROUNDING_DINO_INFO = FamilyInfo(kind=KIND_FUSION_DETECTOR,
                                 sites=frozenset({SITE_FUSION, SITE_DETECTION_TEXT, SITE_DETECTION_TEXT_FEATURES,
                                                  SITE_DETECTOR}))  # fmt: skip


class GroundingDinoBackbone(FusionDetectorBackbone):
    """A frozen Grounding DINO / MM-Grounding-DINO with fusion, text-input and detector-weight sites."""

    info = GROUNDING_DINO_INFO

    def __init__(self, model: nn.Module, tokenizer, image_config: DetectionImageConfig | None = None,
                 name_or_path: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_config = image_config or DetectionImageConfig()
        self.name_or_path = str(name_or_path)
        self.model.requires_grad_(False)
        self.model.eval()
        self._check_tokenizer()

    # ------------------------------------------------------------------ loading / identity
    @property
    def family(self) -> str:
        return self.model.config.model_type

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **model_kwargs) -> "GroundingDinoBackbone":
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        path = str(name_or_path)
        try:
            model_type = AutoConfig.from_pretrained(path).model_type
            model_class = getattr(transformers, DETECTOR_CLASSES[model_type])
            model = model_class.from_pretrained(path, **without_hub_kernels(model_kwargs))
        except (OSError, KeyError) as err:
            raise BackboneLoadError(
                f"could not load a Grounding DINO detector from {path!r}: {err}. A model folder needs config.json "
                "and model.safetensors, as written by save_pretrained."
            ) from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as err:
            raise BackboneLoadError(
                f"Grounding DINO at {path!r} has no usable tokenizer ({err}); save its BERT tokenizer beside the "
                f"weights: tokenizer.save_pretrained({path!r})."
            ) from err
        image_config = DetectionImageConfig.from_folder(path) if Path(path).is_dir() else DetectionImageConfig()
        return cls(model, tokenizer, image_config, name_or_path=path)

    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        dot = tok.convert_tokens_to_ids(".")
        ids = {"[CLS]": tok.cls_token_id, "[SEP]": tok.sep_token_id, "'.'": dot}
        delimiters = set(self.delimiters.tolist())
        wrong = {k: v for k, v in ids.items() if v not in delimiters}
        if wrong:
            raise BackboneLoadError(
                f"the tokenizer's ids {wrong} are not the phrase delimiters this detector splits its text at "
                f"({sorted(delimiters)}, bert-base-uncased's [CLS], [SEP], '.', '?'); use the checkpoint's own tokenizer."
            )
        self.cls_id, self.sep_id, self.dot_id = tok.cls_token_id, tok.sep_token_id, dot
        self.context_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id

    @property
    def delimiters(self) -> torch.Tensor:
        return self.model.model.special_tokens

    @property
    def identity(self) -> dict:
        cfg = self.model.config.to_dict()
        keys = ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
                "encoder_attention_heads", "decoder_attention_heads", "num_queries", "num_feature_levels",
                "encoder_n_points", "decoder_n_points", "max_text_len", "two_stage")
        arch = {"model_type": cfg.get("model_type"), **{k: cfg.get(k) for k in keys}}
        text = cfg.get("text_config") or {}
        arch["text_config"] = {k: text.get(k) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")}
        vision = cfg.get("backbone_config") or {}
        arch["backbone_config"] = {k: vision.get(k) for k in (
            "model_type", "embed_dim", "depths", "num_heads", "window_size", "out_indices")}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        return {"family": self.family, "name_or_path": self.name_or_path, "config_hash": digest, "arch": arch}

    def num_parameters(self) -> int:
        """The detector's own parameters (LoRA adapters injected by a method are not counted)."""
        return sum(p.numel() for p in self.named_weights("all").values())

    # ------------------------------------------------------------------ dimensions
    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    @property
    def text_width(self) -> int:
        """Width of the BERT word embeddings (where text-input prompts live)."""
        return self.model.config.text_config.hidden_size

    @property
    def text_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def vision_layers(self) -> int:
        """Encoder layers (each with one fusion block); Swin's windows take no sequence prompts."""
        return len(self._encoder_layers())

    @property
    def fusion_layers(self) -> int:
        return len(self._encoder_layers())

    @property
    def max_text_len(self) -> int:
        return self.model.config.max_text_len

    def _encoder_layers(self) -> nn.ModuleList:
        return self.model.model.encoder.layers

    # ------------------------------------------------------------------ fusion site (SDPT native, deep fusion prompts)
    def fusion_site(self, layer: int) -> FusionSite:
        attn = self._encoder_layers()[layer].fusion_layer.attn
        return FusionSite(
            vision_query=attn.vision_proj, text_key=attn.text_proj, vision_value=attn.values_vision_proj,
            text_value=attn.values_text_proj, embed_dim=attn.embed_dim, vision_dim=attn.vision_dim,
            text_dim=attn.text_dim, num_heads=attn.num_heads,
        )

    # ------------------------------------------------------------------ detector weights (heads, full, LoRA)
    def head_modules(self) -> list[nn.Module]:
        """The prediction heads: decoder box/class heads and the two-stage proposal heads."""
        m = self.model
        out = [m.bbox_embed, m.class_embed]
        for name in ("encoder_output_bbox_embed", "encoder_output_class_embed", "enc_output", "enc_output_norm"):
            module = getattr(m.model, name, None)
            if module is not None:
                out.append(module)
        return out

    def named_weights(self, part: str = "all") -> dict[str, nn.Parameter]:
        """The detector's parameters by their model name (tied copies once; LoRA adapters excluded): ``part``
        "heads" or "all"."""
        if part not in ("heads", "all"):
            raise ValueError(f"part must be 'heads' or 'all', got {part!r}")
        params = {n: p for n, p in self.model.named_parameters() if "lora_" not in n}
        if part == "all":
            return params
        wanted = {id(p) for module in self.head_modules() for p in module.parameters()}
        return {n: p for n, p in params.items() if id(p) in wanted}

    def add_lora(self, r: int, alpha: float, dropout: float,
                 target_modules: str | None = None) -> dict[str, nn.Parameter]:  # fmt: skip
        """Inject LoRA adapters (``peft``) into the matching linear layers (None: the encoder/decoder attention
        projections); returns the new trainable parameters."""
        target_modules = target_modules or LORA_TARGETS
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as err:  # pragma: no cover - peft is a dependency
            raise ImportError("LoRA needs peft: pip install peft") from err
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
        # peft looks for word embeddings tied to an output layer when the config says tie_word_embeddings (a
        # language-model notion; the detector ties only its box heads) and asks the model for get_input_embeddings,
        # which Grounding DINO does not implement. Nothing of that applies here, so the flag is off while injecting.
        model_config = self.model.config
        tied = getattr(model_config, "tie_word_embeddings", False)
        model_config.tie_word_embeddings = False
        try:
            inject_adapter_in_model(config, self.model)
        except ValueError as err:
            raise ValueError(f"LoRA target_modules {target_modules!r} matched no layer of this detector: {err}") from err
        finally:
            model_config.tie_word_embeddings = tied
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    # ------------------------------------------------------------------ text
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.text_backbone.get_input_embeddings()(input_ids)

    def phrase_ids(self, phrase: str) -> list[int]:
        return list(self.tokenizer(phrase, add_special_tokens=False)["input_ids"])

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        words = self.phrase_ids(phrase)
        if not words:
            raise ValueError(f"the phrase {phrase!r} has no tokens")
        with torch.no_grad():
            return self.embed_tokens(torch.tensor(words, device=self.device)).detach().clone()

    def category_prompt(self, names: Sequence[str], template: str = "{}", n_context: int = 0) -> DetectionText:
        """``[CLS] (ctx x n) phrase_1 . (ctx x n) phrase_2 . ... [SEP]`` with ``phrase_c = template.format(name_c)``."""
        if not names:
            raise ValueError("a detection prompt needs at least one category name")
        delimiters = set(self.delimiters.tolist())
        ids, context, phrase_of = [self.cls_id], [-1], [-1]
        for c, name in enumerate(names):
            words = self.phrase_ids(template.format(name))
            if not words:
                raise ValueError(f"category name {name!r} has no tokens")
            if delimiters & set(words):
                raise ValueError(
                    f"category name {name!r} contains '.' or '?', which Grounding DINO reads as the end of a phrase; "
                    "rename the category."
                )
            ids += [self.context_id] * n_context + words + [self.dot_id]
            context += list(range(n_context)) + [-1] * (len(words) + 1)
            phrase_of += [c] * (n_context + len(words)) + [-1]
        ids.append(self.sep_id)
        context.append(-1)
        phrase_of.append(-1)
        if len(ids) > self.max_text_len:
            raise ValueError(
                f"the text prompt for {len(names)} categories needs {len(ids)} tokens but this detector reads at most "
                f"{self.max_text_len} (max_text_len); train/evaluate on fewer categories (--set data.categories=[...])."
            )
        phrase = torch.tensor(phrase_of)
        label_map = (phrase.unsqueeze(0) == torch.arange(len(names)).unsqueeze(1)).float()
        return DetectionText(torch.tensor(ids), torch.tensor(context), label_map, n_context).to(self.device)

    # ------------------------------------------------------------------ forward
    def detect(
        self,
        pixel_values: torch.Tensor,
        prompt: DetectionText,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        context: torch.Tensor | None = None,
        fusion: Callable[[int], FusionTokens | None] | None = None,
        text_offset: torch.Tensor | None = None,
        **kwargs,
    ):
        """Run the detector on a batch with one category prompt; ``labels`` (DETR format: ``class_labels`` = phrase
        index, ``boxes`` = normalised cx, cy, w, h) add the detector's own loss. ``context`` ``(n, d_text)`` fills the
        prompt's context positions; ``fusion(layer)`` gives tokens for that fusion layer (or None); ``text_offset``
        ``(rows >= T, d_text)`` is added, row t to token position t, to the text encoder's output features."""
        batch = pixel_values.shape[0]
        device = pixel_values.device
        text = prompt
        input_ids = text.input_ids.to(device).unsqueeze(0).expand(batch, -1)
        attention_mask = torch.ones_like(input_ids)
        dtype = next(self.model.parameters()).dtype
        with ExitStack() as stack:
            if context is not None:
                stack.enter_context(self._context_hook(text.context_index.to(device), context))
            if fusion is not None:
                stack.enter_context(self._fusion_hooks(fusion))
            if text_offset is not None:
                stack.enter_context(self._text_offset_hook(text_offset))
            if labels is not None:
                stack.enter_context(loss_of_this_process_only())
            return self.model(
                pixel_values=pixel_values.to(dtype), input_ids=input_ids, attention_mask=attention_mask,
                pixel_mask=pixel_mask, labels=labels, **kwargs,
            )

    def category_scores(self, logits: torch.Tensor, text: DetectionText) -> torch.Tensor:
        """Per-category scores ``(B, Q, C)``: mean sigmoid token logit over each category's phrase."""
        label_map = text.label_map.to(logits.device, torch.float32)
        weights = label_map / label_map.sum(-1, keepdim=True)
        probs = logits[..., : label_map.shape[1]].float().sigmoid()
        return probs @ weights.t()

    @contextmanager
    def _context_hook(self, context_index: torch.Tensor, context: torch.Tensor):
        if context.dim() != 2 or context.shape[1] != self.text_width:
            raise ValueError(f"text context must be (n, {self.text_width}), got {tuple(context.shape)}")
        n = int(context_index.max()) + 1
        if n != context.shape[0]:
            raise ValueError(f"the prompt has {n} context positions per phrase but {context.shape[0]} tokens were given")
        is_context = (context_index >= 0)[None, :, None]
        rows = context_index.clamp(min=0)

        def hook(module, args, output):
            fill = context[rows].to(output.dtype).unsqueeze(0)
            return torch.where(is_context, fill, output)

        handle = self.model.model.text_backbone.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def _text_offset_hook(self, offset: torch.Tensor):
        """Add ``offset[t]`` to token t of the text encoder's output (the input of its projection to d_model, which
        feeds the fusion layers and the decoder's text attention)."""
        if offset.dim() != 2 or offset.shape[1] != self.text_width:
            raise ValueError(f"a text feature offset must be (positions, {self.text_width}), got {tuple(offset.shape)}")

        def pre(module, args):
            features = args[0]
            positions = features.shape[1]
            if positions > offset.shape[0]:
                raise ValueError(f"the prompt has {positions} tokens but the text feature offset covers "
                                 f"{offset.shape[0]}; shorten the prompt")  # fmt: skip
            return (features + offset[:positions].to(features.dtype).unsqueeze(0), *args[1:])

        handle = self.model.model.text_projection.register_forward_pre_hook(pre)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def _fusion_hooks(self, fusion: Callable[[int], FusionTokens | None]):
        """Append tokens to each fusion attention's two inputs (masks extended), drop their rows from its outputs."""
        handles = []
        for j, layer in enumerate(self._encoder_layers()):
            attn = layer.fusion_layer.attn
            state: dict = {}

            def pre(module, args, kwargs, j=j, state=state):
                tokens = fusion(j)
                state.clear()
                if tokens is None or (tokens.vision is None and tokens.text is None):
                    return None
                args = list(args)
                vision = _get(args, kwargs, 0, "vision_features")
                text = _get(args, kwargs, 1, "text_features")
                v_mask = kwargs.get("vision_attention_mask")
                t_mask = kwargs.get("text_attention_mask")
                batch, n_v, n_t = vision.shape[0], vision.shape[1], text.shape[1]
                state.update(n_v=n_v, n_t=n_t)
                if tokens.vision is not None:
                    extra = _expand(tokens.vision, batch, "vision").to(vision.dtype)
                    vision = torch.cat([vision, extra], dim=1)
                    if v_mask is not None:
                        v_mask = torch.cat([v_mask, v_mask.new_zeros(batch, extra.shape[1])], dim=1)
                if tokens.text is not None:
                    extra = _expand(tokens.text, batch, "text").to(text.dtype)
                    text = torch.cat([text, extra], dim=1)
                    if t_mask is None and tokens.mask_text:
                        t_mask = torch.zeros(batch, n_t, dtype=torch.bool, device=text.device)
                    if t_mask is not None:
                        hidden = torch.full((batch, extra.shape[1]), bool(tokens.mask_text), device=t_mask.device)
                        t_mask = torch.cat([t_mask, hidden.to(t_mask.dtype)], dim=1)
                _set(args, kwargs, 0, "vision_features", vision)
                _set(args, kwargs, 1, "text_features", text)
                if "vision_attention_mask" in kwargs or v_mask is not None:
                    kwargs["vision_attention_mask"] = v_mask
                if "text_attention_mask" in kwargs or t_mask is not None:
                    kwargs["text_attention_mask"] = t_mask
                return tuple(args), kwargs

            def post(module, args, kwargs, output, state=state):
                if not state:
                    return None
                n_v, n_t = state["n_v"], state["n_t"]
                (v_out, v_w), (t_out, t_w) = output
                v_w = v_w[:, :n_v, :n_t] if v_w is not None else None
                t_w = t_w[:, :n_t, :n_v] if t_w is not None else None
                return (v_out[:, :n_v], v_w), (t_out[:, :n_t], t_w)

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(post, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _get(args: list, kwargs: dict, index: int, name: str) -> torch.Tensor:
    return args[index] if len(args) > index else kwargs[name]


def _set(args: list, kwargs: dict, index: int, name: str, value: torch.Tensor) -> None:
    if len(args) > index:
        args[index] = value
    else:
        kwargs[name] = value


def _expand(tokens: torch.Tensor, batch: int, side: str) -> torch.Tensor:
    if tokens.dim() == 2:
        return tokens.unsqueeze(0).expand(batch, -1, -1)
    if tokens.dim() != 3 or tokens.shape[0] != batch:
        raise ValueError(f"{side} fusion tokens must be (K, width) or ({batch}, K, width), got {tuple(tokens.shape)}")
    return tokens


register_backbone(list(DETECTOR_CLASSES), GroundingDinoBackbone)
