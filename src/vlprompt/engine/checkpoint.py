"""Prompt checkpoints: trained parameters only (safetensors) plus a JSON config, PEFT-style.

A run folder holds ``prompt.safetensors`` + ``prompt_config.json`` (the final prompt, kilobytes: what
``PromptMethod.save_pretrained`` writes), ``metrics.jsonl``, ``results.json`` (the final metrics), ``run_config.json``
(the resolved run options) and ``checkpoint-last/`` (prompt, optimiser and scheduler state after
the last finished epoch) so ``--resume`` can continue an interrupted run. Every file is written atomically.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import vlprompt
from vlprompt.fileio import temp_file_beside, user_file_mode

PROMPT_FILE = "prompt.safetensors"
CONFIG_FILE = "prompt_config.json"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
RESULTS_FILE = "results.json"
RESUME_DIR = "checkpoint-last"


class CheckpointError(ValueError):
    """A prompt checkpoint is missing, corrupt, or does not fit the backbone / method it is loaded onto."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, user_file_mode())  # safetensors writes a fresh private file: give it the user's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prompt_config(method) -> dict[str, Any]:
    return {
        "method": method.registered_name,
        "task": method.task,
        "method_config": method.config.to_dict(),
        "classnames": list(method.classnames),
        "template": method.template,
        "backbone": method.backbone.identity,
        "trainable_parameters": method.num_trainable(),
        "vlprompt_version": vlprompt.__version__,
    }


def save_prompt(folder: str | Path, method) -> Path:
    """Write the method's trained parameters and its config into ``folder`` (no run results: those live in the
    run folder's results.json and metrics.jsonl)."""
    folder = Path(folder)
    atomic_save_tensors(folder / PROMPT_FILE, method.prompt_state_dict(), metadata={"method": method.name})
    atomic_write_json(folder / CONFIG_FILE, prompt_config(method))
    return folder


def recorded_backbone(folder: str | Path, model: str | None = None):
    """The backbone a saved prompt was trained on (or ``model`` instead); the error says how to point at a moved
    model."""
    from vlprompt.backbones import load_backbone

    if model:
        return load_backbone(model)
    recorded = read_prompt_config(folder).get("backbone", {}).get("name_or_path")
    if not recorded:
        raise CheckpointError(f"{folder}/{CONFIG_FILE} records no backbone; pass the model it was trained on.")
    try:
        return load_backbone(recorded)
    except ValueError as err:
        raise type(err)(f"{err} (the model this prompt was trained on, as recorded in its {CONFIG_FILE}; if it "
                        "moved, pass --model <its folder> / backbone=load_backbone(<its folder>))") from err


# what every prompt_config.json holds (prompt_config writes more); a file without them cannot be loaded
REQUIRED_CONFIG_KEYS = ("method", "method_config", "classnames", "template")


def read_prompt_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass the run folder written by `vlprompt train` (it holds "
                              "prompt.safetensors + prompt_config.json)")
    if not path.exists():
        hint = " (training did not finish: resume it with --resume)" if (folder / RESUME_DIR).exists() else ""
        raise CheckpointError(
            f"no prompt checkpoint in {folder}: {CONFIG_FILE} is missing{hint}. "
            "Pass the run folder written by `vlprompt train` (it holds prompt.safetensors + prompt_config.json)."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    lacking = [key for key in REQUIRED_CONFIG_KEYS if key not in config] if isinstance(config, dict) else None
    if lacking is None or lacking:
        what = f"lacks {lacking}" if lacking else f"holds a JSON {type(config).__name__}, not an object"
        raise CheckpointError(f"{path} {what}; the checkpoint is corrupt or not vlprompt's: train the run again, "
                              "or restore the folder from a copy.")
    if not isinstance(config["classnames"], list) or not all(isinstance(c, str) for c in config["classnames"]):
        raise CheckpointError(f"{path}: classnames must be a list of names, got {str(config['classnames'])[:80]}; "
                              "the checkpoint is corrupt.")
    if "task" not in config:  # written by versions that named only detection: the method knows its task
        from vlprompt.methods import method_class

        with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):  # an unknown method: named later
            config["task"] = config["method_config"].get("task") or method_class(config["method"]).task
    return config


def check_backbone(saved: dict[str, Any], backbone) -> None:
    """Refuse a prompt trained on another architecture, naming what differs."""
    from vlprompt.assets import model_name_for_users

    current = backbone.identity
    trained_on = model_name_for_users(saved.get("name_or_path"))
    if saved.get("family") != current["family"]:
        raise CheckpointError(
            f"this prompt was trained on a {saved.get('family')!r} backbone but the loaded backbone is "
            f"{current['family']!r}; load it with --model {trained_on!r} (or leave --model out)."
        )
    if saved.get("config_hash") != current["config_hash"]:
        diffs = _arch_differences(saved.get("arch", {}), current["arch"])
        raise CheckpointError(
            f"this prompt was trained on backbone {trained_on!r} whose architecture differs from "
            f"{model_name_for_users(current['name_or_path'])!r}: {diffs or 'config hash differs'}. Load it onto the "
            f"backbone it was trained on (--model {trained_on!r}, or leave --model out)."
        )


def _arch_differences(saved: dict, current: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _arch_differences(a, b, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{key} {a} (checkpoint) vs {b} (loaded)")
    return "; ".join(out)


def load_prompt_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / PROMPT_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the run folder is incomplete.")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} could not be read ({err}); the checkpoint is corrupt.") from err


def load_prompt(folder: str | Path, backbone, classnames: list[str] | None = None, template: str | None = None):
    """Rebuild the method saved in ``folder`` on ``backbone`` (checked to be the same architecture).

    ``classnames`` / ``template`` re-point the prompt at another label set (cross-dataset evaluation).
    """
    from vlprompt.methods import get_prompt_model

    config = read_prompt_config(folder)
    check_backbone(config.get("backbone", {}), backbone)
    from vlprompt.methods import method_class

    saved_version = config.get("vlprompt_version")
    method_config = method_class(config["method"]).config_class.from_dict(config["method_config"], saved_version)
    method = get_prompt_model(backbone, config["method"], config["classnames"], config["template"], method_config)
    try:
        method.load_prompt_state_dict(load_prompt_tensors(folder))
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from err
    if classnames is not None:
        method.set_classes(classnames, template)
    return method
