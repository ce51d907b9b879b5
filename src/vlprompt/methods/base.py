"""What every method is: a validated config dataclass plus an ``nn.Module`` over a frozen backbone.

``PromptMethod`` is the prompt model a user holds (PEFT's ``PeftModel`` for prompts): its hooks are declared here
with no-op defaults (the trainer calls them, it never probes), and it saves and loads itself
(``save_pretrained`` / ``from_pretrained``). ``ClassificationMethod`` is the base of methods on dual encoders
(CLIP, SigLIP); ``DetectionMethod`` (methods/detection.py) of methods on fusion detectors. Methods use only the
backbone contract (``backbones/base.py``): they never import a family module or read token positions.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlprompt.backbones.base import Backbone, DeepPrompts, DualEncoderBackbone, UnsupportedBackboneError
from vlprompt.tasks.batches import ClassificationBatch, StepOutput


class MethodConfigError(ValueError):
    """A method config field is invalid; the message names the field and the allowed values."""


@dataclass
class MethodConfig:
    """Base of every method config. Fields are checked against their annotations and declared ranges
    (``vlprompt.options``); subclasses add cross-field checks in ``validate``."""

    method_name: ClassVar[str] = ""  # the method's name in option messages (``coop.n_ctx=...``)

    def __post_init__(self) -> None:
        from vlprompt.options import OptionError, check_options

        try:
            check_options(self, prefix=f"{self.method_name}." if self.method_name else "")
        except OptionError as err:
            raise MethodConfigError(str(err)) from None
        self.validate()

    def validate(self) -> None:  # cross-field checks, overridden by methods
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], saved_version: str | None = None) -> "MethodConfig":
        """The config of ``values``. An unknown option is an error, except in a config saved by another vlprompt
        version (``saved_version``): options it had that this version lacks are dropped with a warning."""
        import vlprompt

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown and saved_version is not None and saved_version != vlprompt.__version__:
            warnings.warn(
                f"{cls.__name__}: options {unknown} from a prompt saved by vlprompt {saved_version} are unknown to "
                f"vlprompt {vlprompt.__version__} and were dropped",
                stacklevel=2,
            )
            values = {k: v for k, v in values.items() if k in known}
        elif unknown:
            raise MethodConfigError(f"{cls.__name__} has no option(s) {unknown}; its options are {sorted(known)}.")
        return cls(**values)


ALL_LAYERS = "all"  # a depth that means every layer of the tower it prompts, whatever the backbone's depth


def resolve_depths(config: MethodConfig, backbone: DualEncoderBackbone) -> None:
    """Resolve the config's prompt depths (fields declared with ``opt(..., tower=...)``) against ``backbone`` in
    place: ``"all"`` becomes the tower's layer count; a depth beyond it is refused, naming the limit."""
    prefix = f"{config.method_name}." if config.method_name else ""
    for f in dataclasses.fields(config):
        tower = f.metadata.get("tower")
        if tower is None:
            continue
        limit = backbone.layers(tower)
        value = getattr(config, f.name)
        if value == ALL_LAYERS:
            setattr(config, f.name, limit)
        elif value > limit:
            where = {"both": "shallower tower", "text": "text tower", "image": "image tower"}[tower]
            raise MethodConfigError(f"{prefix}{f.name}={value} exceeds the {limit} layers of the {where} of this "
                                    f"{backbone.family} backbone; use at most {limit} (or 'all')")  # fmt: skip


def check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' where the class name goes")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise MethodConfigError(message)


def subset_rows(trained: Sequence[str], asked: Sequence[str], what: str,
                fix: str = "Use a prompt method for cross-dataset evaluation.") -> list[int] | None:
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
            f"but not {unknown[:5] or 'repeated names'}. {fix}"
        )
    return [index[name] for name in asked]


class PromptMethod(nn.Module):
    """A prompt-tuning method on a frozen backbone: the prompt model users train, save, load and call.

    Subclasses set ``name``, ``config_class``, ``required_sites`` and, for their task, which towers they change.
    Every hook the trainer calls is declared here with its default.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    required_sites: ClassVar[frozenset[str]] = frozenset()
    task: ClassVar[str] = "classification"  # the task object that trains and scores it (vlprompt.tasks)
    backbone_kind: ClassVar[str] = "dual_encoder"  # the kind of backbone contract it is written against
    # Fitted by its own solver on cached features (linear probe) instead of by gradient steps.
    fits_features: ClassVar[bool] = False
    # Fitted on features first, then trained by gradient steps from that fit (Tip-Adapter-F's cache keys).
    trains_after_fit: ClassVar[bool] = False
    # False for a method with nothing to learn (zero-shot): no training recipe applies.
    learns: ClassVar[bool] = True
    # The text features depend on the image (CoCoOp): class features can never be computed once per run.
    conditions_text_on_image: ClassVar[bool] = False
    modifies_text: ClassVar[bool] = False
    modifies_image: ClassVar[bool] = False

    @classmethod
    def supported_tasks(cls) -> tuple[str, ...]:
        """The tasks this method trains on, its default (``task``) first. A method serving several (the fusion
        methods: VQA, NLVR2, retrieval) takes the dataset's from :meth:`bind_task` and reports it as ``self.task``."""
        return (cls.task,)

    @classmethod
    def bind_task(cls, options: dict[str, Any], task_name: str) -> dict[str, Any]:
        """The method options of a run on a ``task_name`` dataset (one of :meth:`supported_tasks`): a method serving
        several tasks records the dataset's in its options, and refuses options that name another one. Default:
        the options as given."""
        return options

    @classmethod
    def tied_to_classes(cls, config: MethodConfig) -> bool:
        """True if what ``config`` trains belongs to the training classes (a classifier head, class-specific
        contexts): such a model cannot score other class names (no novel-class or cross-dataset evaluation)."""
        return False

    def __init__(self, backbone: Backbone, config: MethodConfig, classnames: Sequence[str],
                 template: str = "a photo of a {}.") -> None:  # fmt: skip
        super().__init__()
        missing = self.required_sites - backbone.sites
        if missing:
            reasons = "; ".join(f"{site}: {backbone.why_missing(site)}" for site in sorted(missing)
                                if backbone.why_missing(site))  # fmt: skip
            raise UnsupportedBackboneError(
                f"method {self.name!r} needs the site(s) {sorted(missing)} which the {backbone.family!r} backbone "
                f"does not offer (it offers {sorted(backbone.sites)})" + (f" ({reasons})" if reasons else "")
                + ". See `vlprompt methods` for supported pairs."
            )
        if not classnames:
            raise ValueError("a method needs at least one class name")
        check_template(template)
        if isinstance(backbone, DualEncoderBackbone):
            resolve_depths(config, backbone)
        self.backbone = backbone
        self.config = config
        self.classnames: list[str] = list(classnames)
        self.template = template
        self.registered_name = self.name  # the registry's name, e.g. "vpt_deep" rather than the class's "vpt"
        self._weights: dict[str, nn.Parameter] = {}  # backbone weights this method trains (by their model name)

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen towers keep eval behaviour (no attention dropout) while the prompts train, as in the released code.
        self.backbone.model.eval()
        return self

    # ----------------------------------------------------------------- class names
    def set_classes(self, classnames: Sequence[str], template: str | None = None) -> None:
        """Point the method at another label set (cross-dataset / base-to-novel evaluation). A refused change
        leaves the method as it was."""
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
            self.classnames, self.template = previous
            self._on_classes_changed()
            raise

    def _on_classes_changed(self) -> None:
        pass

    # ----------------------------------------------------------------- hooks the trainer calls
    def training_step(self, batch: Any) -> StepOutput:
        """One batch's named loss terms (and logits, for training accuracy)."""
        raise NotImplementedError(f"{type(self).__name__} does not train by gradient steps")

    def param_groups(self, base_lr: float) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups with their own learning rates; None: every prompt parameter at ``base_lr``."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Called with the 0-indexed epoch about to start (schedules inside a method's loss)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called with the 0-indexed epoch just finished, after its last step and before its state is saved."""

    def on_train_end(self) -> None:
        """Called once training has finished, before the final evaluation and save."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """State a method keeps while it trains beyond its prompt (PromptSRC's running prompt aggregate): saved with
        every epoch's resume state and handed back to :meth:`load_training_state` on ``--resume``."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned; an empty dict starts afresh (the trainer passes one at the
        start of every run that is not resumed, and a state saved before the method kept one is empty too)."""

    @property
    def cacheable_towers(self) -> frozenset[str]:
        """Towers whose features do not change while this method trains: computed once per run, not per step."""
        towers = set()
        if not self.modifies_text and not self.conditions_text_on_image:
            towers.add("text")
        if not self.modifies_image:
            towers.add("image")
        return frozenset(towers)

    def fit_features(self, train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                     val_labels: torch.Tensor) -> dict[str, float]:  # fmt: skip
        """Fit on frozen features (methods with ``fits_features``); returns what to log."""
        raise NotImplementedError(f"{type(self).__name__} is not fitted on features")

    # ----------------------------------------------------------------- trainable state
    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The method's own trainable parameters, plus the backbone weights it trains (``_train_weights``: heads,
        LoRA adapters, all of them) as ``backbone.model.<name>``; no other backbone parameter."""
        own = {n: p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad}
        own.update({f"backbone.model.{n}": p for n, p in self._weights.items()})
        return own

    def _train_weights(self, weights: dict[str, nn.Parameter]) -> None:
        """Train these weights of the backbone (by their name in ``backbone.model``) with the method's own."""
        for p in weights.values():
            p.requires_grad_(True)
        self._weights = dict(weights)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.prompt_parameters().values())

    def trainable_once_fitted(self, num_images: int) -> int | None:
        """The trainable count after a fit on ``num_images`` training images, for a method whose trained tensors are
        sized by its training set (Tip-Adapter-F's keys); None: ``num_trainable()`` already says."""
        return None

    def print_trainable_parameters(self) -> str:
        """Print (and return) trainable vs backbone parameter counts, as PEFT's model does."""
        trainable, frozen = self.num_trainable(), self.backbone.num_parameters()
        line = (f"trainable params: {trainable:,} || backbone params: {frozen:,} || "
                f"trainable%: {100.0 * trainable / max(frozen, 1):.4f}")  # fmt: skip
        print(line)
        return line

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

    # ----------------------------------------------------------------- saving and loading (PEFT-style)
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``prompt.safetensors`` (trained parameters only) and ``prompt_config.json`` into ``folder``."""
        from vlprompt.engine import checkpoint as ckpt

        return ckpt.save_prompt(folder, self)

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone: Backbone | None = None,
                        classnames: Sequence[str] | None = None, template: str | None = None) -> "PromptMethod":  # fmt: skip
        """Load a prompt saved by :meth:`save_pretrained` (or a run folder). ``backbone`` None: the backbone the
        prompt records is loaded. ``classnames`` / ``template`` point it at another label set."""
        from vlprompt.engine import checkpoint as ckpt

        if backbone is None:
            backbone = ckpt.recorded_backbone(folder)
        method = ckpt.load_prompt(folder, backbone, classnames, template)
        if cls is not PromptMethod and not isinstance(method, cls):
            raise ckpt.CheckpointError(f"{folder} holds a {type(method).__name__} ({method.registered_name}), "
                                       f"not a {cls.__name__}; load it with PromptMethod.from_pretrained")
        return method


class ClassificationMethod(PromptMethod):
    """A method on a dual encoder: class text features vs image features, scored by the backbone's family.

    Subclasses implement ``text_features`` and/or ``image_features`` and declare ``modifies_text`` /
    ``modifies_image``; the task caches an untouched tower instead of recomputing it every step.
    """

    # ----------------------------------------------------------------- features and logits
    def text_features(self) -> torch.Tensor:
        """Class text features ``(C, d)`` (unnormalised). Default: the dataset's hand-written template."""
        return self.backbone.encode_texts([self.template.format(c) for c in self.classnames])

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, d)`` (unnormalised). Default: the frozen image tower."""
        return self.backbone.encode_image(pixel_values)

    def logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return self.backbone.score(image_feats, text_feats)

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
        """The family's classification loss (CLIP: cross-entropy; SigLIP: per-class sigmoid)."""
        return self.backbone.loss(logits, labels)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.backbone.probabilities(logits)

    def training_step(self, batch: ClassificationBatch) -> StepOutput:
        logits = self(pixel_values=batch.pixel_values, image_feats=batch.image_feats, text_feats=batch.text_feats)
        return StepOutput({"main": self.loss(logits, batch.labels)}, logits=logits)


def set_lora_dropout_mode(model: nn.Module, mode: bool) -> None:
    """Put the dropout of LoRA adapters (``peft``'s ``lora_dropout``) in train or eval mode, leaving the model's
    own modules as they are: the adapters' dropout is part of what trains, the frozen model keeps eval behaviour."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lora_dropout" or ".lora_dropout." in name:
            module.train(mode)


# ----------------------------------------------------------------- prompt initialisation helpers
def placeholder_prefix_embedding(backbone, placeholder: str, n: int) -> torch.Tensor | None:
    """Embeddings of the first ``n`` placeholder words (the references' prompt init), or None if it has fewer."""
    prefix = placeholder.split("{}")[0].strip()
    if not prefix or n == 0:
        return None
    words = backbone.phrase_embeddings(prefix)
    return words[:n].clone() if words.shape[0] >= n else None


def seed_from_placeholder(rows: torch.Tensor, backbone, placeholder: str, enabled: bool = True) -> None:
    """Overwrite ``rows`` ``(n, d_t)`` in place with the placeholder's first ``n`` word embeddings (reference init).

    Left random when disabled or when the placeholder has fewer than ``n`` words before the class name.
    """
    words = placeholder_prefix_embedding(backbone, placeholder, rows.shape[0]) if enabled else None
    if words is not None:
        rows.copy_(words)


def phrase_embedding(backbone, phrase: str) -> torch.Tensor:
    """Word embeddings ``(n, d_t)`` of a phrase's tokens: CoOp's "init from a phrase"."""
    try:
        return backbone.phrase_embeddings(phrase)
    except ValueError as err:
        raise MethodConfigError(f"the init phrase {phrase!r} has no tokens") from err


def class_prompts(method: ClassificationMethod, placeholder: str = "{}.", n_replaced: int = 0):
    """The method's class sentences built by its backbone (``backbone.class_prompts``), config errors named."""
    try:
        return method.backbone.class_prompts(method.classnames, placeholder, n_replaced)
    except ValueError as err:
        raise MethodConfigError(str(err)) from None


def prompts_or_none(tokens: Sequence[torch.Tensor] | torch.Tensor, enabled: bool) -> DeepPrompts | None:
    """``DeepPrompts`` of per-layer tokens, or None for zero-size prompts (the bare model)."""
    return DeepPrompts(list(tokens)) if enabled else None
