"""Training and evaluation on ``accelerate``: the same code on CPU, one GPU, several GPUs, fp32 or mixed precision.

What the engine saves work on: a tower the method leaves untouched is computed once (class text features for
image-side methods; image features for text-side methods when training augmentation is off), never per step.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from vlprompt.engine import checkpoint as ckpt

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that would be overwritten, ...)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Epochs at a constant warmup_lr before the cosine schedule (CoOp's recipe). None: 1, or 0 for a 1-epoch run.
    warmup_epochs: int | None = None
    warmup_lr: float = 1e-5
    grad_clip: float | None = None  # max gradient norm; None = no clipping
    augment: bool = True  # random resized crop + flip on training images
    eval_batch_size: int = 64
    num_workers: int = 0
    seed: int = 1
    precision: str = "fp32"
    validate_every: int = 1  # epochs

    def __post_init__(self) -> None:
        self._check_types()
        problems = []
        if self.warmup_epochs is None:
            self.warmup_epochs = 1 if self.epochs > 1 else 0
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append("batch sizes must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr})")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            problems.append(f"warmup_epochs must be in [0, epochs) (got {self.warmup_epochs} of {self.epochs})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append("grad_clip must be > 0 or null")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))

    def _check_types(self) -> None:
        """A quoted number from a config file ("1e-3") would otherwise fail later, far from its cause."""
        wrong = []
        for name in ("epochs", "batch_size", "eval_batch_size", "num_workers", "seed", "validate_every",
                     "warmup_epochs"):  # fmt: skip
            value = getattr(self, name)
            if not is_integer(value) and not (name == "warmup_epochs" and value is None):
                wrong.append(f"{name}={value!r} (an integer)")
        for name in ("lr", "momentum", "weight_decay", "warmup_lr", "grad_clip"):
            value = getattr(self, name)
            if is_number(value):
                setattr(self, name, float(value))
            elif not (name == "grad_clip" and value is None):
                wrong.append(f"{name}={value!r} (a number)")
        if wrong:
            raise ValueError("invalid training options, wrong type: " + "; ".join(wrong) + " - write numbers "
                             "unquoted, e.g. lr: 0.001 or lr: 1e-3")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_precision(precision: str) -> None:
    """Fail early, with the fix, on a precision this machine cannot run (fp16 autocast needs a GPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    if precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError(
            "fp16 mixed precision needs a GPU (no CUDA device here); on a CPU use --precision bf16 (bfloat16 "
            "autocast) or fp32."
        )


def make_accelerator(precision: str = "fp32"):
    """An ``Accelerator`` whose ``autocast()`` runs forward passes in ``precision`` ("bf16"/"fp16": autocast of
    matrix multiplies; parameters, gradients and optimiser state stay fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_precision(precision)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # accelerate keeps one process-wide state and refuses an Accelerator of another mixed precision than the first
    # one; runs of different precisions in one process (scripts, the protocol runner, tests) get a fresh state.
    # PartialState (devices, process group) is kept.
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Per-epoch multiplier: constant warm-up (CoOp/Dassl style) then cosine decay to zero."""
    cosine_epochs = config.epochs - config.warmup_epochs

    def factor(epoch: int) -> float:
        if epoch < config.warmup_epochs:
            return config.warmup_lr / config.lr
        t = epoch - config.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * t / max(cosine_epochs, 1)))

    return factor


def build_optimizer(method, config: TrainConfig) -> torch.optim.Optimizer:
    groups = method.param_groups(config.lr) if hasattr(method, "param_groups") else None
    params = groups or [p for p in method.prompt_parameters().values()]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def image_features_of(method, loader: Iterable, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features and labels of a whole loader (frozen or prompted image tower, no gradient)."""
    feats, labels = [], []
    device = _device_of(method, accelerator)
    for pixels, y in loader:
        with _autocast(accelerator):
            feats.append(method.image_features(pixels.to(device)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def _device_of(method, accelerator) -> torch.device:
    # Evaluation loaders are not passed through accelerator.prepare (no sharding of the test set), so their
    # batches arrive on the CPU and go to the method's device here.
    if accelerator is not None:
        return accelerator.device
    first = next(iter(method.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _autocast(accelerator):
    if accelerator is None:
        return torch.autocast("cpu", enabled=False)
    return accelerator.autocast()


@torch.no_grad()
def evaluate(method, loader: Iterable, accelerator=None, num_classes: int | None = None) -> dict[str, Any]:
    """Top-1 accuracy (and per-class accuracy) of ``method`` on a loader of ``(pixels, labels)``."""
    was_training = method.training
    method.eval()
    text_feats = None
    if not getattr(method, "fits_features", False) and not getattr(method, "conditions_text_on_image", False):
        with _autocast(accelerator):
            text_feats = method.text_features()  # class features once per evaluation, not per batch
    correct = total = 0
    n_classes = num_classes or len(method.classnames)
    per_class_correct = torch.zeros(n_classes)
    per_class_total = torch.zeros(n_classes)
    device = _device_of(method, accelerator)
    for pixels, labels in loader:
        with _autocast(accelerator):
            logits = method(pixel_values=pixels.to(device), text_feats=text_feats)
        pred = logits.argmax(-1).cpu()
        labels = labels.cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
        per_class_total += torch.bincount(labels, minlength=n_classes).float()
        per_class_correct += torch.bincount(labels[pred == labels], minlength=n_classes).float()
    method.train(was_training)
    if total == 0:
        raise ValueError("evaluation split is empty")
    per_class = (per_class_correct / per_class_total.clamp(min=1)).tolist()
    return {"accuracy": 100.0 * correct / total, "n": total, "per_class_accuracy": [100.0 * a for a in per_class]}


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainData:
    """Datasets the trainer needs; ``*_eval`` use the deterministic eval transform."""

    train: torch.utils.data.Dataset
    train_eval: torch.utils.data.Dataset  # train images without augmentation (feature caching, linear probe)
    val: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


class Trainer:
    def __init__(
        self,
        method,
        data: TrainData,
        config: TrainConfig,
        run_dir: str | Path,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.method = method
        self.data = data
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_info = run_info or {}
        self.progress = progress
        self.log = log
        self.accelerator = make_accelerator(config.precision)
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- public
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        self._prepare_run_dir(resume, overwrite)
        seed_everything(self.config.seed)
        method = self.method.to(self.accelerator.device)
        if getattr(method, "fits_features", False):
            result = self._fit_features(method)
        elif method.num_trainable() == 0:  # zero-shot, or zero-size prompts: nothing to train, evaluate only
            result = self._finish(method, {"epoch": 0})
        else:
            result = self._fit_sgd(method, resume)
        return result

    # ---------------------------------------------------------------- run folder
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        finished = (self.run_dir / ckpt.PROMPT_FILE).exists()
        started = any((self.run_dir / name).exists()
                      for name in (ckpt.RESUME_DIR, ckpt.RESUME_DIR + ".old", ckpt.METRICS_FILE))
        if (finished or started) and not (resume or overwrite):
            raise TrainingError(
                f"{self.run_dir} already holds a {'finished' if finished else 'started'} run. Use --resume to "
                "continue it, --overwrite to replace it, or --output to write somewhere else."
            )
        if resume and not overwrite and (finished or started):
            self._check_resumable_as_configured()
        if overwrite and not resume:
            for name in (ckpt.PROMPT_FILE, ckpt.CONFIG_FILE, ckpt.METRICS_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            for suffix in ("", ".tmp", ".old"):
                shutil.rmtree(self.run_dir / (ckpt.RESUME_DIR + suffix), ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(
            self.run_dir / ckpt.RUN_CONFIG_FILE, {"train": asdict(self.config), **self.run_info}
        )

    def _divergence_message(self, what: str, epoch: int, step: int) -> str:
        cfg = self.config
        if step == 0 and epoch > 0:  # the first step from the saved state already fails: that state has diverged
            return (f"{what} at epoch {epoch + 1}, step 1, before any step of this epoch: the prompt saved after "
                    f"epoch {epoch} has most likely diverged, and --resume from it would fail the same way. Start over "
                    f"with --overwrite and a lower learning rate (now {cfg.lr}) or --set train.grad_clip=1.0.")
        fixes = [f"lower the learning rate (now {cfg.lr}) and --resume", "set --set train.grad_clip=1.0"]
        if cfg.precision != "fp32":
            fixes.append("use --precision fp32")
        return (f"{what} at epoch {epoch + 1}, step {step + 1}. The state after the last finished epoch (if any) is "
                f"kept in {self.run_dir / ckpt.RESUME_DIR}: " + ", or ".join(fixes) + " (--overwrite starts over).")

    def _check_resumable_as_configured(self) -> None:
        """Refuse to resume a run of another model, method, dataset, shots or seed: its saved epochs would be passed
        off as training on the new options. The schedule (epochs, lr, ...) may change, e.g. after a divergence."""
        stored_file = self.run_dir / ckpt.RUN_CONFIG_FILE
        if not stored_file.exists():
            return
        stored = json.loads(stored_file.read_text())
        current = json.loads(json.dumps({"train": asdict(self.config), **self.run_info}))
        differences = [
            f"{key}: {stored.get(key)!r} there, {current.get(key)!r} now"
            for key in sorted(set(self.run_info) | set(stored) - {"train"})
            if stored.get(key) != current.get(key)
        ]
        if stored.get("train", {}).get("seed") != current["train"]["seed"]:
            differences.append(f"train.seed: {stored.get('train', {}).get('seed')!r} there, "
                               f"{current['train']['seed']!r} now")
        if differences:
            raise TrainingError(
                f"cannot --resume {self.run_dir}: it holds a run with other settings ("
                + "; ".join(differences)
                + "). Resume it with its own settings, or use --output for a new run (--overwrite replaces it)."
            )

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history)
        ckpt.atomic_write_bytes(self.run_dir / ckpt.METRICS_FILE, lines.encode())

    def _loader(self, dataset, batch_size: int, shuffle: bool, epoch: int = 0) -> DataLoader:
        generator = torch.Generator()
        generator.manual_seed(self.config.seed * 1000 + epoch)  # per-epoch order is the same after a resume
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.config.num_workers,
            generator=generator,
            drop_last=False,
        )

    # ---------------------------------------------------------------- linear probe
    def _fit_features(self, method) -> dict[str, Any]:
        start = time.perf_counter()
        train_f, train_y = image_features_of(
            method, self._loader(self.data.train_eval, self.config.eval_batch_size, False), self.accelerator
        )
        if self.data.val is not None and len(self.data.val):
            val_f, val_y = image_features_of(
                method, self._loader(self.data.val, self.config.eval_batch_size, False), self.accelerator
            )
        else:
            val_f, val_y = train_f[:0], train_y[:0]
        info = method.fit(train_f, train_y, val_f, val_y)
        record = {"epoch": 1, "train_time_s": time.perf_counter() - start, **info}
        return self._finish(method, record)

    # ---------------------------------------------------------------- SGD
    def _fit_sgd(self, method, resume: bool) -> dict[str, Any]:
        cfg = self.config
        optimizer = build_optimizer(method, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        start_epoch = 0
        if resume:
            start_epoch = self._load_resume_state(method, optimizer, scheduler)
        method, optimizer = self.accelerator.prepare(method, optimizer)
        core = self.accelerator.unwrap_model(method)

        text_feats = None
        if not core.modifies_text and not getattr(core, "conditions_text_on_image", False):
            with torch.no_grad(), self.accelerator.autocast():
                text_feats = core.text_features().detach()
        cached_images = not core.modifies_image and not cfg.augment
        train_set = self.data.train
        if cached_images:
            feats, labels = image_features_of(
                core, self._loader(self.data.train_eval, cfg.eval_batch_size, False), self.accelerator
            )
            train_set = TensorDataset(feats, labels)

        for epoch in range(start_epoch, cfg.epochs):
            seed_everything(cfg.seed * 1000 + epoch)  # augmentation draws: identical after a resume
            if hasattr(core, "set_epoch"):  # methods whose loss follows a schedule (DPT's guidance warm-up)
                core.set_epoch(epoch)
            method.train()
            epoch_start = time.perf_counter()
            loader = self.accelerator.prepare(self._loader(train_set, cfg.batch_size, True, epoch))
            losses, correct, seen = [], 0, 0
            for step, (inputs, labels) in enumerate(self._progress(loader, epoch)):
                with self.accelerator.autocast():
                    if cached_images:
                        logits = method(image_feats=inputs, text_feats=text_feats)
                    else:
                        logits = method(pixel_values=inputs, text_feats=text_feats)
                    loss = core.loss(logits, labels)
                if not torch.isfinite(loss):
                    raise TrainingError(self._divergence_message(f"loss became {loss.item()}", epoch, step))
                optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                if cfg.grad_clip is not None:
                    self.accelerator.clip_grad_norm_(list(core.prompt_parameters().values()), cfg.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                correct += int((logits.argmax(-1) == labels).sum())
                seen += len(labels)
            scheduler.step()
            if not all(torch.isfinite(p).all() for p in core.prompt_parameters().values()):
                # The epoch's last step is not followed by a loss check; a diverged prompt must not become the
                # resume point, or every --resume would fail the same way.
                raise TrainingError(self._divergence_message("the prompt parameters became non-finite", epoch, step))
            record = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": float(np.mean(losses)),
                "train_accuracy": 100.0 * correct / max(seen, 1),
                "epoch_time_s": time.perf_counter() - epoch_start,
            }
            if self.data.val is not None and len(self.data.val) and (epoch + 1) % cfg.validate_every == 0:
                record["val_accuracy"] = self._evaluate(core, self.data.val)["accuracy"]
            self.history.append(record)
            self._save_resume_state(core, optimizer, scheduler, epoch + 1)
            self._write_metrics()
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
                f"train acc {record['train_accuracy']:.2f}"
                + (f" val acc {record['val_accuracy']:.2f}" if "val_accuracy" in record else "")
            )
        # Mixed precision: prepare() wrapped the method's forward in autocast; give the caller its plain method
        # back (the final evaluation still autocasts, through self.accelerator).
        core = self.accelerator.unwrap_model(method, keep_fp32_wrapper=False)
        return self._finish(core, None)

    def _progress(self, loader, epoch: int):
        if not self.progress:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not self.accelerator.is_main_process)

    def _evaluate(self, method, dataset) -> dict[str, Any]:
        return evaluate(method, self._loader(dataset, self.config.eval_batch_size, False), self.accelerator)

    def _finish(self, method, record: dict[str, Any] | None) -> dict[str, Any]:
        if record is not None:
            if self.data.val is not None and len(self.data.val):
                record["val_accuracy"] = self._evaluate(method, self.data.val)["accuracy"]
            self.history.append(record)
        final: dict[str, Any] = {"split": "test"}
        if self.data.test is not None and len(self.data.test):
            result = self._evaluate(method, self.data.test)
            final.update(accuracy=result["accuracy"], n=result["n"])
        self.history.append(final)
        if self.accelerator.is_main_process:
            ckpt.save_prompt(self.run_dir, method, extra={"final_metrics": final})
            self._write_metrics()
        return final

    # ---------------------------------------------------------------- resume
    def _save_resume_state(self, method, optimizer, scheduler, epochs_done: int) -> None:
        if not self.accelerator.is_main_process:
            return
        # The three files are one state: they are written to a fresh folder that then replaces the previous one, so a
        # crash at any point leaves either the previous epoch's complete state or this one's (see _resume_folder).
        folder = self.run_dir / ckpt.RESUME_DIR
        staging, previous = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        ckpt.atomic_save_tensors(staging / ckpt.PROMPT_FILE, method.prompt_state_dict())
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   staging / "trainer_state.pt")
        ckpt.atomic_write_json(staging / "state.json", {"epochs_done": epochs_done, "history": self.history})
        if folder.exists():
            shutil.rmtree(previous, ignore_errors=True)
            folder.rename(previous)
        staging.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)

    def _resume_folder(self) -> Path:
        folder = self.run_dir / ckpt.RESUME_DIR
        previous = folder.with_name(folder.name + ".old")
        if not (folder / "state.json").exists() and (previous / "state.json").exists():
            return previous  # a crash between the two renames of _save_resume_state
        return folder

    def _load_resume_state(self, method, optimizer, scheduler) -> int:
        folder = self._resume_folder()
        state_file = folder / "state.json"
        if not state_file.exists():
            if (self.run_dir / ckpt.PROMPT_FILE).exists():
                raise TrainingError(f"{self.run_dir} holds a finished run; nothing to resume.")
            self.log(f"no resumable state in {folder}; starting from scratch")
            return 0
        state = json.loads(state_file.read_text())
        method.load_prompt_state_dict(ckpt.load_prompt_tensors(folder))
        trainer_state = torch.load(folder / "trainer_state.pt", weights_only=False)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        # The optimiser's moments come from the checkpoint, but its hyper-parameters from this run's options:
        # resuming with a lower learning rate after a divergence must actually use it.
        for group, hyper in zip(optimizer.param_groups, configured):
            group.update(hyper)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        factor = lr_lambda(self.config)(scheduler.last_epoch)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor
        self.history = state["history"]
        self.log(f"resuming {self.run_dir} after epoch {state['epochs_done']}")
        return int(state["epochs_done"])
