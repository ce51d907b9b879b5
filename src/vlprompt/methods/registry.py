"""The method registry: each method module registers its names where the method is defined (``register_method``).

A registered name is a method class plus defaults layered over its config's own (named presets such as
``vpt_shallow`` / ``vpt_deep`` share one class). ``get_prompt_model`` builds a prompt model from a name, as PEFT's
``get_peft_model`` does; a user's own method registers the same way (see tests/test_matrix.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlprompt.backbones.base import Backbone
from vlprompt.methods.base import ALL_LAYERS, MethodConfig, MethodConfigError, PromptMethod, resolve_depths
from vlprompt.recipes import Recipe


@dataclass(frozen=True)
class MethodSpec:
    """A registered name: a method class plus defaults layered over its config's own."""

    method_class: type[PromptMethod]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    # How the method's paper trained it on CLIP ViT-B/16 (the ``field`` recipe, vlprompt.recipes); None: the
    # engine's defaults.
    released: Recipe | None = None


METHODS: dict[str, MethodSpec] = {}
ALIASES: dict[str, str] = {}


def register_method(name: str, method_class: type[PromptMethod], defaults: dict[str, Any] | None = None,
                    summary: str = "", aliases: Sequence[str] = (),
                    released: Recipe | None = None) -> type[PromptMethod]:  # fmt: skip
    """Register ``method_class`` under ``name`` (with preset ``defaults`` and the paper's ``released`` training
    settings), checking it is a complete method."""
    if not (isinstance(method_class, type) and issubclass(method_class, PromptMethod)):
        raise TypeError(f"{method_class!r} is not a PromptMethod subclass")
    config_class = method_class.config_class
    if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, MethodConfig)):
        raise TypeError(f"{method_class.__name__}.config_class must be a MethodConfig dataclass")
    if not method_class.name:
        raise TypeError(f"{method_class.__name__} needs a class attribute `name`")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(defaults or {}) - known)
    if unknown:
        raise TypeError(f"preset {name!r} sets {unknown}, which {config_class.__name__} does not have")
    key = name.strip().lower()
    if released is not None and not isinstance(released, Recipe):
        raise TypeError(f"released= of {name!r} must be a vlprompt.recipes.Recipe")
    METHODS[key] = MethodSpec(method_class, dict(defaults or {}), summary, released)
    for alias in aliases:
        ALIASES[alias.lower()] = key
    return method_class


def canonical_method_name(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise MethodConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return key


def method_class(name: str) -> type[PromptMethod]:
    return METHODS[canonical_method_name(name)].method_class


def method_task(name: str) -> str:
    """The task a registered method trains on ("classification", "detection")."""
    return method_class(name).task


def is_detection_method(name: str) -> bool:
    return method_task(name) == "detection"


def unsupported_reason(method_class: type[PromptMethod], family: type[Backbone]) -> str:
    """Why a method cannot run on a backbone family ("" when it can): another kind of model, or missing sites
    (with the family's own reason for a site where it declares one)."""
    info = family.info
    if method_class.backbone_kind != info.kind:
        return f"a {method_class.backbone_kind.replace('_', ' ')} method"
    missing = sorted(method_class.required_sites - info.sites)
    if not missing:
        return ""
    reasons = [info.missing[site] for site in missing if site in info.missing]
    return f"needs {missing}" + (f": {'; '.join(reasons)}" if reasons else "")


def depth_fields(config_class: type[MethodConfig]) -> dict[str, str]:
    """Config fields that are prompt depths, with the tower whose layer count bounds each (declared by ``opt``)."""
    return {f.name: f.metadata["tower"] for f in dataclasses.fields(config_class) if "tower" in f.metadata}


def make_config(name: str, options: dict[str, Any] | None = None, backbone: Backbone | None = None) -> MethodConfig:
    """The validated config of a registered method: its defaults, preset defaults, then ``options``.

    Default depths are resolved against ``backbone``: ``"all"`` becomes the tower's layer count, and defaults deeper
    than the backbone (ViT-B's 12, MaPLe's 9, ...) are capped to it so presets run on smaller models. A depth the
    user asks for is never changed: the method resolves ``"all"`` and refuses one that is too deep, naming the limit.
    """
    spec = METHODS[canonical_method_name(name)]
    config_class = spec.method_class.config_class
    options = dict(options or {})
    values = {**spec.defaults, **options}
    own_defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for key, tower in depth_fields(config_class).items():
        if key in options:
            continue  # the user's own depth: resolved and checked below
        value = values.get(key, own_defaults[key])
        if backbone is None:
            if value == ALL_LAYERS:
                values[key] = own_defaults[key]  # no backbone to count layers on: the config's own default
            continue
        limit = backbone.layers(tower)
        if value == ALL_LAYERS or (isinstance(value, int) and not isinstance(value, bool) and value > limit):
            values[key] = limit
    config = config_class.from_dict(values)
    if backbone is not None and backbone.kind == spec.method_class.backbone_kind and depth_fields(config_class):
        resolve_depths(config, backbone)  # the user's "all" becomes a count; too deep is refused here, early
    return config


def get_prompt_model(
    backbone: Backbone,
    name: str,
    classnames: Sequence[str],
    template: str | None = None,
    config: MethodConfig | dict[str, Any] | None = None,
) -> PromptMethod:
    """Wrap a frozen backbone with a method (PEFT's ``get_peft_model`` for prompts).

    ``config``: a method config, or a dict of options over the registered defaults. ``template`` None: the method's
    own default (``"a photo of a {}."`` for classification methods, the bare name for detection methods, whose
    category phrases are the names).
    """
    canonical = canonical_method_name(name)
    spec = METHODS[canonical]
    cls = spec.method_class
    if cls.backbone_kind != backbone.kind:
        raise MethodConfigError(
            f"method {canonical!r} works on {cls.backbone_kind.replace('_', ' ')} models, but "
            f"{backbone.name_or_path or backbone.family!r} is a {backbone.kind.replace('_', ' ')} "
            "model. See `vlprompt methods` for supported pairs."
        )
    if not isinstance(config, MethodConfig):
        config = make_config(canonical, config, backbone)
    elif not isinstance(config, cls.config_class):
        raise MethodConfigError(f"{type(config).__name__} is not a config for method {name!r}")
    method = cls(backbone, config, classnames) if template is None else cls(backbone, config, classnames, template)
    method.registered_name = canonical
    return method
