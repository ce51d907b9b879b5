"""CLIP (transformers ``CLIPModel``) adapter: the only module that knows CLIP's internals.

The towers are run by looping over the model's own encoder layers, so prompt tokens can be inserted or replaced at
any layer's input without copying or patching transformers' code.
"""
from __future__ import annotations

from pathlib import Path

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
    BackboneLoadError,  # noqa: F401 - importable from here as in 0.1.0
    BlockAdapter,
    ClassPrompts,
    DeepPrompts,
    FamilyInfo,
    TokenizedText,
    TransientPrompts,
    register_backbone,
)

CLIP_INFO = FamilyInfo(
    kind=KIND_DUAL_ENCODER,
    sites=frozenset({SITE_TEXT_SEQUENCE, SITE_IMAGE_SEQUENCE, SITE_JOINT_SPACE, SITE_LINEAR_PROJECTIONS, SITE_BLOCK,
                     SITE_TRANSIENT_IMAGE, SITE_TOWER_WEIGHTS}),  # fmt: skip
    image_prompt_positions=(IMAGE_PROMPTS_END, IMAGE_PROMPTS_FRONT),
    class_positions=CLASS_POSITIONS,
    scoring="softmax",
    attention_projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                           "o": "self_attn.out_proj"},
)


class CLIPBackbone(TransformersTwoTowers):
    """A frozen CLIP with prompt sites in both towers.

    Text features are ``final_layer_norm(x_eot) @ W_t``; image features ``post_layernorm(x_cls) @ W_v``; both
    unnormalised. ``logit_scale`` is the (already exponentiated) temperature.
    """

    family = "clip"
    info = CLIP_INFO
    text_prefix_tokens = 1  # [SOS]
    # Cut text sequences after their last end-of-text token (exact: the tower is causal). False runs every text over
    # the whole context (77 positions), as the reference implementations do: only for checks that the cut is exact.
    truncate_text: bool = True

    def __init__(self, model: nn.Module, tokenizer, image_processor=None, name_or_path: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name_or_path = str(name_or_path)
        self.model.requires_grad_(False)
        self.model.eval()
        text_cfg = model.config.text_config
        self.context_length: int = text_cfg.max_position_embeddings
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            self.eos_token_id = text_cfg.eos_token_id

    # ------------------------------------------------------------------ loading / identity
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **model_kwargs) -> "CLIPBackbone":
        from transformers import CLIPImageProcessor, CLIPModel

        path = str(name_or_path)
        model = load_weights(CLIPModel, path, "CLIP", **model_kwargs)
        tokenizer = load_tokenizer(path, model, "CLIP")
        try:
            processor = CLIPImageProcessor.from_pretrained(path)
        except OSError:
            processor = None  # transforms fall back to the vision config's image size and OpenAI's statistics
        return cls(model, tokenizer, processor, name_or_path=path)

    @property
    def identity(self) -> dict:
        """Name plus a hash of the architecture config: enough to refuse a prompt trained on another backbone."""
        cfg = self.model.config.to_dict()
        return self.architecture_identity({k: cfg[k] for k in ("projection_dim",) if k in cfg})

    # ------------------------------------------------------------------ dimensions
    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    # ------------------------------------------------------------------ joint space (SDPT, DPT)
    def joint_space(self) -> dict[str, torch.Tensor]:
        """Projection weights ``(d, width)`` and final LayerNorm affine of each tower."""
        m = self.model
        return {
            "text_projection": m.text_projection.weight,
            "image_projection": m.visual_projection.weight,
            "text_ln_weight": m.text_model.final_layer_norm.weight,
            "text_ln_bias": m.text_model.final_layer_norm.bias,
            "image_ln_weight": m.vision_model.post_layernorm.weight,
            "image_ln_bias": m.vision_model.post_layernorm.bias,
        }

    # ------------------------------------------------------------------ text tower
    def tokenize(self, texts, special_tokens: bool = True) -> TokenizedText:
        if not special_tokens:
            rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            width = max((len(r) for r in rows), default=0)
            ids = torch.tensor([r + [self.eos_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
            return TokenizedText(ids.view(len(rows), width), torch.tensor([len(r) for r in rows]))
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = enc["input_ids"]
        is_eot = ids == self.eos_token_id
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError("the tokenizer did not produce an end-of-text token for every text")
        return TokenizedText(input_ids=ids, lengths=is_eot.int().argmax(dim=1) + 1)

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
        """Text features ``(S, d)`` of embedded sequences ``(S, T, d_t)`` whose end-of-text is at ``lengths - 1``.

        ``prompts.tokens[0]`` is inserted right after ``[SOS]`` (positional embeddings apply, as for CoOp's context);
        deeper entries replace those positions at later layers. Because the tower is causal, positions after the
        last end-of-text token cannot change the pooled output, so the sequence is cut there: exact, and much
        cheaper than running all 77 positions.
        """
        text_model = self.model.text_model
        eot_index = lengths - 1
        n = 0
        if prompts is not None and prompts.tokens:
            prompts.validate(self.text_width, self.text_layers, "text")
            n = prompts.num_tokens
        if self.truncate_text:
            token_embeds = token_embeds[:, : int(eot_index.max()) + 1]
        if n:
            first = expand_tokens(prompts.tokens[0], token_embeds.shape[0]).to(token_embeds.dtype)
            token_embeds = torch.cat([token_embeds[:, :1], first, token_embeds[:, 1:]], dim=1)
            eot_index = eot_index + n
        length = int(eot_index.max()) + 1
        if length > self.context_length:
            raise ValueError(
                f"a prompted text needs {length} positions but CLIP's text context is {self.context_length}: "
                "use fewer prompt tokens or shorter class names / templates."
            )
        if not self.truncate_text:  # the whole context; inserted prompts push the trailing padding out
            length = min(token_embeds.shape[1], self.context_length)
        hidden = token_embeds[:, :length]
        hidden = hidden + text_model.embeddings.position_embedding.weight[:length].to(hidden.dtype)
        mask = self._causal_mask(hidden)
        with block_hooks(text_model.encoder.layers, block):
            for j, layer in enumerate(text_model.encoder.layers):
                if j > 0 and n:
                    hidden = replace_tokens(hidden, prompts.at(j), start=1)
                hidden = layer(hidden, mask, is_causal=True)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = text_model.final_layer_norm(hidden[rows, eot_index])
        return self.model.text_projection(pooled)

    def encode_class_prompts_per_image(self, prompts_of: ClassPrompts, prefixes: torch.Tensor) -> torch.Tensor:
        """Text features ``(B, C, d)`` of the ``B x C`` sequences ``[SOS][prefixes[b]][text c after its SOS]``.

        Equals the base class's generic form (the texts repeated ``B`` times with per-sequence prompts: CoCoOp's
        per-image contexts), for less work: the tower is causal, so ``[SOS][prefix]`` does not depend on
        the text after it and runs once per prefix; only the text's own tokens run per (prefix, text) pair, attending
        to the prefix's keys and values. With 4 context tokens and short class names that is about half the tokens.
        """
        text_model = self.model.text_model
        if not self.truncate_text or prefixes.shape[1] == 0:  # the full-context form (checks that the cuts are exact)
            return super().encode_class_prompts_per_image(prompts_of, prefixes)
        prefixes = prefixes.to(text_model.embeddings.token_embedding.weight.dtype)  # fp32 prompts, half weights
        batch, n_prefix = prefixes.shape[0], prefixes.shape[1]
        n_texts = len(prompts_of)
        tokenized = TokenizedText(prompts_of.input_ids, prompts_of.lengths)
        length = int(tokenized.eot_index.max()) + 1  # of the texts alone; only the truncated form exists here
        embeds = self.embed_tokens(tokenized.input_ids[:, :length]).to(prefixes.dtype)
        if length + n_prefix > self.context_length:
            raise ValueError(
                f"a prompted text needs {length + n_prefix} positions but CLIP's text context is "
                f"{self.context_length}: use fewer prompt tokens or shorter class names / templates."
            )
        positions = text_model.embeddings.position_embedding.weight.to(prefixes.dtype)
        head_len = n_prefix + 1
        head = torch.cat([embeds[:1, :1].expand(batch, 1, -1), prefixes], dim=1) + positions[:head_len]
        tail = (embeds[:, 1:] + positions[head_len : head_len + length - 1]).unsqueeze(0).expand(batch, -1, -1, -1)
        tail = tail.reshape(batch * n_texts, length - 1, -1)
        head_mask = self._causal_mask(head)
        tail_len = length - 1
        # Tail query i sees the whole head and tail keys 0..i.
        visible = torch.ones(tail_len, head_len + tail_len, dtype=torch.bool, device=tail.device)
        visible[:, head_len:] = torch.tril(visible[:, head_len:])
        rows = torch.arange(tail.shape[0], device=tail.device)
        eot_in_tail = (tokenized.eot_index - 1).repeat(batch)
        layers = list(text_model.encoder.layers)
        for layer in layers[:-1]:
            head_in = layer.layer_norm1(head)
            normed = layer.layer_norm1(tail)
            tail = tail + self._attend_with_head(layer.self_attn, normed, normed, head_in, visible, n_texts)
            tail = tail + layer.mlp(layer.layer_norm2(tail))
            head = layer(head, head_mask, is_causal=True)
        # Only the end-of-text token's output is pooled, so the last layer runs for that token alone (its keys and
        # values still come from every token it sees).
        last = layers[-1]
        normed = last.layer_norm1(tail)
        sees = visible[eot_in_tail].unsqueeze(1).unsqueeze(1)  # (B*C, 1, 1, head + tail)
        out = tail[rows, eot_in_tail].unsqueeze(1) + self._attend_with_head(
            last.self_attn, normed[rows, eot_in_tail].unsqueeze(1), normed, last.layer_norm1(head), sees, n_texts
        )
        out = out + last.mlp(last.layer_norm2(out))
        pooled = text_model.final_layer_norm(out[:, 0])
        return self.model.text_projection(pooled).view(batch, n_texts, -1)

    @staticmethod
    def _attend_with_head(attn: nn.Module, queries: torch.Tensor, tail: torch.Tensor, head: torch.Tensor,
                          visible: torch.Tensor, n_texts: int) -> torch.Tensor:  # fmt: skip
        """The attention module's output for ``queries`` ``(B*C, q, w)`` over keys and values of a shared ``head``
        ``(B, h, w)`` (one per group of ``n_texts`` rows) followed by each row's own ``tail`` ``(B*C, t, w)``, where
        ``visible`` (broadcastable to ``(B*C, heads, q, h+t)``) says which keys a query sees. Uses the module's own
        projections and scale, with torch's scaled-dot-product attention."""
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(*x.shape[:-1], -1, attn.head_dim).transpose(-3, -2)

        head_k = heads(attn.k_proj(head)).repeat_interleave(n_texts, dim=0)
        head_v = heads(attn.v_proj(head)).repeat_interleave(n_texts, dim=0)
        keys = torch.cat([head_k, heads(attn.k_proj(tail))], dim=-2)
        values = torch.cat([head_v, heads(attn.v_proj(tail))], dim=-2)
        out = torch.nn.functional.scaled_dot_product_attention(
            heads(attn.q_proj(queries)), keys, values, attn_mask=visible,
            dropout_p=attn.dropout if attn.training else 0.0, scale=attn.scale,
        )  # fmt: skip
        return attn.out_proj(out.transpose(-3, -2).reshape(*queries.shape[:-1], -1))

    def _causal_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        from transformers.masking_utils import create_causal_mask

        # The model's own mask builder: None for SDPA (which then uses its causal kernel), explicit otherwise.
        # The cache is the fourth argument, positional: transformers 5.23 names it past_key_values, 5.25 cache (and
        # warns on the old keyword); None works on both without a warning.
        return create_causal_mask(self.model.text_model.config, hidden, None, None)

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

        ``prompts.tokens[0]`` is inserted after the positional embedding and before CLIP's pre-LayerNorm (no
        positional embedding on prompts), either after the patches (``"end"``: VPT, IVLP, MaPLe) or between the
        class token and the patches (``"front"``: UPT); deeper entries replace those positions.
        ``block`` changes each attention block's output (APT). ``transient`` tokens are appended after the
        pre-LayerNorm to a layer's input and dropped from its output (DPT).
        """
        vision = self.model.vision_model
        if position not in self.info.image_prompt_positions:
            raise ValueError(f"image prompt position {position!r} unknown; choose one of "
                             f"{self.info.image_prompt_positions}")
        hidden = vision.embeddings(pixel_values.to(self.model.visual_projection.weight.dtype))
        n = 0
        if prompts is not None and prompts.tokens:
            prompts.validate(self.vision_width, self.vision_layers, "image")
            n = prompts.num_tokens
        start = 1 if position == IMAGE_PROMPTS_FRONT else hidden.shape[1]  # "front": after the class token
        if n:
            first = expand_tokens(prompts.tokens[0], hidden.shape[0]).to(hidden.dtype)
            hidden = torch.cat([hidden[:, :start], first, hidden[:, start:]], dim=1)
        hidden = vision.pre_layrnorm(hidden)
        hidden = self.run_image_layers(hidden, prompts if n else None, start, block, transient)
        pooled = vision.post_layernorm(hidden[:, 0])
        return self.model.visual_projection(pooled)


register_backbone(["clip"], CLIPBackbone)
