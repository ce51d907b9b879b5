"""Reading and writing checkpoints of the research trainers (Dassl-based: CoOp, CoCoOp, MaPLe, IVLP, VPT).

A Dassl trainer saves ``torch.save({"state_dict": ..., "epoch": ..., "optimizer": ..., "scheduler": ...,
"val_result": ...}, "<registered name>/model.pth.tar-<epoch>")``. The state dict is either the prompt learner's own
(CoOp, CoCoOp: ``ctx``, ``meta_net.*``, ``token_prefix``, ``token_suffix``) or the whole custom CLIP's (MaPLe, IVLP,
VPT: ``prompt_learner.*``, prompts inside ``image_encoder`` / ``text_encoder``, and every frozen CLIP weight).
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

# What a Dassl checkpoint file holds beside the state dict: trainer state that no prompt needs.
TRAINER_STATE_KEYS = ("epoch", "optimizer", "scheduler", "val_result")
# Prefixes of the frozen CLIP weights in a whole-model state dict (MaPLe, IVLP, VPT), and its temperature.
FROZEN_PREFIXES = ("image_encoder.", "text_encoder.", "logit_scale", "prompt_learner.ZS_image_encoder.")


class ReferenceError(ValueError):
    """A checkpoint cannot be read as the layout asked for; the message names what differs and the fix."""


@dataclass
class ImportReport:
    """Where every key of a checkpoint went."""

    repository: str  # the --from name
    source: str  # the trainer it names: repository and file
    method: str
    options: dict[str, Any]
    used: dict[str, str] = field(default_factory=dict)  # their key -> vlprompt tensor name
    recomputed: dict[str, str] = field(default_factory=dict)  # their buffer -> how vlprompt recomputes it
    frozen: list[str] = field(default_factory=list)  # frozen CLIP weights (the backbone comes from --model)
    trainer_state: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # behaviour options switched on, class counts, checks

    def summary(self) -> str:
        lines = [f"read a {self.source} checkpoint as vlprompt method {self.method!r} with options {self.options}",
                 f"  {len(self.used)} tensor(s) used: " + ", ".join(f"{k} -> {v}" for k, v in self.used.items())]
        if self.recomputed:
            lines.append(f"  {len(self.recomputed)} buffer(s) recomputed: " + "; ".join(
                f"{k} ({v})" for k, v in self.recomputed.items()))  # fmt: skip
        if self.frozen:
            lines.append(f"  {len(self.frozen)} frozen CLIP weight(s) not read (the backbone comes from --model)")
        if self.trainer_state:
            lines.append(f"  trainer state not needed: {', '.join(self.trainer_state)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ReferenceLayout:
    """One trainer's checkpoint layout. Subclasses name the vlprompt ``method`` it becomes and implement
    ``options`` (the method options the tensors imply), ``to_vlprompt`` and ``from_vlprompt``."""

    repository: ClassVar[str] = ""  # e.g. "CoOp (KaiyangZhou/CoOp, trainers/coop.py)"
    method: ClassVar[str] = ""
    # The Dassl name the trainer registers its model under: the checkpoint's folder name.
    registered_name: ClassVar[str] = ""
    whole_model: ClassVar[bool] = False  # the state dict is the whole custom CLIP's (frozen weights included)
    # Several registered models, one file each (DPT): their state dicts are read together, each key prefixed with
    # "<registered name>.". Empty: one file.
    files: ClassVar[tuple[str, ...]] = ()
    # Registered method names this layout writes (empty: ``method`` only), e.g. VPT-shallow as a one-layer VPT.
    exports: ClassVar[tuple[str, ...]] = ()
    # Buffers the released code recomputes from the class names (deleted by its own load_model).
    recomputed: ClassVar[dict[str, str]] = {}

    def claims(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` has this layout's defining keys (used to name the right ``--from`` on a mismatch)."""
        raise NotImplementedError

    def known_keys(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Every key this layout reads or recomputes, for the deep layers ``state`` holds."""
        raise NotImplementedError

    def is_prompt(self, key: str) -> bool:
        """Whether ``key`` of a whole-model state dict is learned (not a frozen CLIP weight)."""
        return True

    def options(self, state: dict[str, torch.Tensor], backbone) -> dict[str, Any]:
        raise NotImplementedError

    def template(self, options: dict[str, Any]) -> str | None:
        """The class-name template the released forward uses with these options (None: the dataset's)."""
        return None

    def to_vlprompt(self, state: dict[str, torch.Tensor], options: dict[str, Any]) -> dict[str, Any]:
        """Their key -> (vlprompt tensor name, tensor), or a list of them when one of their tensors holds several
        of vlprompt's (DPT's stacked CAVPT tokens), for every tensor the method uses."""
        raise NotImplementedError

    def from_vlprompt(self, method) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def notes(self, options: dict[str, Any]) -> list[str]:
        return []

    def recompute_buffers(self, method) -> dict[str, torch.Tensor]:
        """The buffers the released code would hold for ``method``'s class names (written on export)."""
        return {}

    def accepts(self, method) -> bool:
        """Whether ``method`` can be written in this layout (its registered name is one the layout exports)."""
        return method.registered_name in (self.exports or (self.method,))

    def check_exportable(self, method) -> None:
        """Refuse a prompt whose options the released code cannot reproduce, naming the option."""

    def export_notes(self, method) -> list[str]:
        """What a user must set in the released code for this prompt (options its files do not record)."""
        return []


# ----------------------------------------------------------------------------------------------- reading
class TrainerObject:
    """Stands in for a Python object of the trainer's pickled beside the tensors (Dassl's warm-up scheduler keeps
    its successor scheduler): its state is kept as data, no code of the file runs, and no prompt needs it."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
MAX_TRAINER_CLASSES = 32  # distinct trainer classes a checkpoint may pickle before the reader gives up


def _load_safely(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code from the file runs); classes of the trainer it meets are
    read as :class:`TrainerObject` stand-ins instead of failing the whole file."""
    stand_ins: list[tuple[type, str]] = []
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older ones load plainly
    while True:
        try:
            if allow is None:
                return torch.load(path, map_location="cpu", weights_only=True)
            with allow(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = UNSUPPORTED_GLOBAL.search(str(err))
            name = found.group(1) if found else None
            if (allow is None or name is None or len(stand_ins) >= MAX_TRAINER_CLASSES
                    or any(n == name for _, n in stand_ins)):  # fmt: skip
                raise
            stand_ins.append((type(name.rsplit(".", 1)[-1], (TrainerObject,), {}), name))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a Dassl checkpoint file (or of a bare state dict), and the trainer-state keys beside it."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.is_dir():
            found = sorted(p.name for p in path.glob("model*.pth.tar*"))
            hint = f" It is a folder{': pass one of its files, e.g. ' + found[-1] if found else ''}."
        raise ReferenceError(f"{path} is not a checkpoint file.{hint} Released trainers save "
                             "<output>/<name>/model.pth.tar-<epoch> (or model-best.pth.tar).")  # fmt: skip
    try:
        loaded = _load_safely(path)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user-facing fault
        raise ReferenceError(f"{path} cannot be read as a torch checkpoint ({type(err).__name__}): is it a "
                             "model.pth.tar file saved by the trainer?") from None
    if not isinstance(loaded, dict):
        raise ReferenceError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dictionary")
    if "state_dict" in loaded:
        state, extra = loaded["state_dict"], sorted(k for k in loaded if k != "state_dict")
    else:
        state, extra = loaded, []
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReferenceError(f"{path}: its state_dict is not a mapping of names to tensors")
    # DataParallel-wrapped models save every key under "module."
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state), extra


def _epoch_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.glob("model*.pth.tar*") if p.is_file()}


def _epoch_of(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def read_files(path: str | Path, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The state dicts of a trainer that saves several models (``<output>/<name>/model.pth.tar-<epoch>`` each),
    merged with ``<name>.`` prefixes; ``path`` is the output folder or one of those files. Returns the state, the
    trainer-state keys and the file name read (the same epoch for every model)."""
    path = Path(path)
    if path.is_file():
        folder, wanted = path.parent.parent, path.name
    elif path.is_dir():
        folder, wanted = path, None
    else:
        raise ReferenceError(f"{path} does not exist: pass the trainer's output folder (holding {', '.join(names)})")
    missing = [name for name in names if not (folder / name).is_dir()]
    if missing:
        raise ReferenceError(f"{folder} lacks {', '.join(missing)}: this trainer saves one model per folder "
                             f"({', '.join(names)}); pass its output folder")  # fmt: skip
    available = [set(_epoch_files(folder / name)) for name in names]
    common = set.intersection(*available)
    if wanted is None:
        if not common:
            raise ReferenceError(f"{folder}: no checkpoint file name is present for every model ({', '.join(names)})")
        wanted = max(common, key=_epoch_of)  # the last epoch saved for all of them
    elif wanted not in common:
        raise ReferenceError(f"{wanted} is not present for every model in {folder} ({', '.join(names)})")
    state: dict[str, torch.Tensor] = {}
    extra: set[str] = set()
    for name in names:
        own, trainer = read_checkpoint(folder / name / wanted)
        state.update({f"{name}.{key}": tensor for key, tensor in own.items()})
        extra.update(trainer)
    return state, sorted(extra), wanted


def _looks_like(state: dict[str, torch.Tensor]) -> str | None:
    from vlprompt.interop.layouts import LAYOUTS

    matches = [name for name, layout in LAYOUTS.items() if layout.claims(state)]
    return matches[0] if len(matches) == 1 else None


def from_reference(path: str | Path, repository: str, backbone, classnames: Sequence[str],
                   template: str | None = None, options: dict[str, Any] | None = None) -> tuple[Any, ImportReport]:  # fmt: skip
    """Build the vlprompt method of a released ``repository``'s checkpoint file on ``backbone`` for ``classnames``;
    returns it with the report of where every key went. ``options`` add method options the checkpoint does not
    record (CoOp's ``class_position``)."""
    from vlprompt.interop.layouts import LAYOUTS
    from vlprompt.methods import MethodConfigError, get_prompt_model

    if repository not in LAYOUTS:
        raise ReferenceError(f"unknown repository {repository!r}; vlprompt reads {', '.join(sorted(LAYOUTS))}")
    layout = LAYOUTS[repository]
    if layout.files:
        state, trainer_state, _ = read_files(path, layout.files)
    else:
        state, trainer_state = read_checkpoint(path)
    frozen = [k for k in state if layout.whole_model and k.startswith(FROZEN_PREFIXES) and not layout.is_prompt(k)]
    own = {k: v for k, v in state.items() if k not in set(frozen)}
    unknown = sorted(set(own) - set(layout.known_keys(own)))
    if unknown or not layout.claims(own):
        other = _looks_like(state)
        hint = f" It looks like a {other} checkpoint: use --from {other}." if other and other != repository else ""
        shown = ", ".join(unknown[:6]) + (" ..." if len(unknown) > 6 else "")
        raise ReferenceError(f"{path} is not a {repository} checkpoint as its trainer saves it"
                             + (f" (keys it does not have: {shown})" if unknown else " (its prompt keys are missing)")
                             + "." + hint)  # fmt: skip
    _check_frozen_shapes(state, frozen, backbone, path)
    implied = layout.options(own, backbone)
    clash = sorted(k for k in (options or {}) if k in implied and options[k] != implied[k])
    if clash:
        raise ReferenceError(f"{path} fixes {', '.join(f'{k}={implied[k]!r}' for k in clash)} by its tensors; drop "
                             "those options")  # fmt: skip
    options = {**implied, **(options or {})}
    try:
        tensors = {key: value if isinstance(value, list) else [value]
                   for key, value in layout.to_vlprompt(own, options).items()}  # fmt: skip
    except KeyError as err:
        raise ReferenceError(f"{path} lacks {err.args[0]}, which a {repository} checkpoint holds beside the keys it "
                             "has: the file is incomplete or of another layout") from None
    except RuntimeError as err:  # e.g. per-layer prompts of different sizes cannot be stacked
        raise ReferenceError(f"{path}: its per-layer tensors do not agree in shape ({str(err).splitlines()[0]}); the "
                             f"{repository} trainer saves every layer's prompt with the same shape") from None
    template = layout.template(options) or template or "a photo of a {}."
    try:
        method = get_prompt_model(backbone, layout.method, list(classnames), template, dict(options))
    except MethodConfigError as err:
        if "exceeds" in str(err):  # more prompted layers than this backbone has
            raise ReferenceError(f"{path} holds a {layout.method} with {options}, which this backbone cannot carry "
                                 f"({err}): pass the CLIP it was trained on as --model") from None
        raise ReferenceError(f"{err} (check the method options you set)") from None
    wanted = method.prompt_parameters()
    theirs = {ours: (key, t) for key, pairs in tensors.items() for ours, t in pairs}
    missing = sorted(set(wanted) - set(theirs))
    if missing:  # a layout bug, never a user fault
        raise ReferenceError(f"{repository} layout left {missing} unset")
    for name, param in wanted.items():
        key, tensor = theirs[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ReferenceError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but vlprompt's {layout.method} on this backbone "
                f"needs {tuple(param.shape)} for {name}: the checkpoint comes from another CLIP (width "
                f"{backbone.text_width} text / {backbone.vision_width} image here, {backbone.text_layers} / "
                f"{backbone.vision_layers} layers) or another class count.")
    method.load_prompt_state_dict({name: tensor.float() for name, (_, tensor) in theirs.items()})
    report = ImportReport(repository=repository, source=layout.repository, method=layout.method, options=options,
                          used={key: ", ".join(dict.fromkeys(ours for ours, _ in pairs)) for key, pairs in tensors.items()},
                          recomputed={k: layout.recomputed[k] for k in own if k in layout.recomputed},
                          frozen=frozen, trainer_state=trainer_state, notes=layout.notes(options))  # fmt: skip
    report.notes += _check_recomputed(layout, own, method)
    return method, report


def _check_frozen_shapes(state, frozen: list[str], backbone, path) -> None:
    """A whole-model checkpoint names its CLIP's widths: refuse one of another architecture, naming what differs."""
    checks = {"image_encoder.conv1.weight": ("image width", 0, backbone.vision_width),
              "text_encoder.positional_embedding": ("text width", 1, backbone.text_width)}
    for key, (what, dim, ours) in checks.items():
        if key in frozen and state[key].dim() > dim and state[key].shape[dim] != ours:
            raise ReferenceError(f"{path} was trained on a CLIP of {what} {state[key].shape[dim]}; this backbone has "
                                 f"{ours}: pass the CLIP it was trained on as --model.")  # fmt: skip
    key = "image_encoder.conv1.weight"
    if key in frozen and state[key].dim() == 4 and state[key].shape[-1] != backbone.patch_size:
        raise ReferenceError(f"{path} was trained on a CLIP with {state[key].shape[-1]}-pixel patches; this backbone "
                             f"has {backbone.patch_size}: pass the CLIP it was trained on as --model.")  # fmt: skip


def _check_recomputed(layout: ReferenceLayout, own: dict[str, torch.Tensor], method) -> list[str]:
    """Compare the checkpoint's class-name buffers with this backbone's own: a difference means another CLIP,
    other class names (or order) or another init phrase; the released loaders drop these buffers, so it is a note."""
    ours = layout.recompute_buffers(method)
    notes = []
    for key, theirs in own.items():
        if key not in ours:
            continue
        mine = ours[key]
        if theirs.shape[0] != mine.shape[0]:
            notes.append(f"{key}: the checkpoint holds {theirs.shape[0]} classes, you gave {mine.shape[0]} class "
                         "names (the prompt is class-independent: it scores yours)")  # fmt: skip
            continue
        limit = min(theirs.shape[1], mine.shape[1])
        differs = (theirs[:, :limit].float() - mine[:, :limit].float()).abs().amax().item()
        if differs > 1e-2:
            notes.append(f"{key} differs from this backbone's embeddings of your class names (max {differs:.3g}): "
                         "another CLIP, other class names or order, or another init phrase than the checkpoint's")
    return notes


# ----------------------------------------------------------------------------------------------- writing
def to_reference(method, repository: str, epoch: int = 0) -> dict[str, Any]:
    """``method`` as the ``repository``'s trainer saves it: ``{"state_dict": ..., "epoch": ..., ...}``."""
    from vlprompt.interop.layouts import LAYOUTS

    if repository not in LAYOUTS:
        raise ReferenceError(f"unknown repository {repository!r}; vlprompt writes {', '.join(sorted(LAYOUTS))}")
    layout = LAYOUTS[repository]
    if not layout.accepts(method):
        raise ReferenceError(f"a {method.registered_name} prompt cannot be written as a {repository} checkpoint "
                             f"(that layout holds {layout.method}); choose --to {_layout_for(method)}")  # fmt: skip
    layout.check_exportable(method)
    state = {k: v.detach().cpu().clone() for k, v in layout.from_vlprompt(method).items()}
    state.update({k: v.detach().cpu().clone() for k, v in layout.recompute_buffers(method).items()})
    return {"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None}


def _layout_for(method) -> str:
    from vlprompt.interop.layouts import LAYOUTS

    names = [name for name, layout in LAYOUTS.items() if layout.method == method.registered_name]
    return " or ".join(names) if names else "(no released layout holds this method)"


def save_reference(method, repository: str, path: str | Path, epoch: int = 0) -> Path:
    """Write ``method`` to ``path`` in the repository's layout (atomically). A trainer that saves several models
    (DPT) gets ``path`` as its output folder: ``<path>/<name>/model.pth.tar-<epoch>`` for each."""
    from vlprompt.interop.layouts import LAYOUTS

    checkpoint = to_reference(method, repository, epoch)
    path = Path(path)
    files = LAYOUTS[repository].files
    if not files:
        _write_torch(path, checkpoint)
        return path
    for name in files:
        own = {k[len(name) + 1:]: v for k, v in checkpoint["state_dict"].items() if k.startswith(name + ".")}
        _write_torch(path / name / f"model.pth.tar-{epoch}", {**checkpoint, "state_dict": own})
    return path


def _write_torch(path: Path, obj: Any) -> None:
    import io

    from vlprompt.engine.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
