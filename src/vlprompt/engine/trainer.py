"""The one trainer: ``Trainer(config, run_dir).fit(method, task)`` for every method and task, on ``accelerate``
(the same code on CPU, one GPU, several GPUs, fp32 or mixed precision).

The trainer owns optimisation (optimiser, warm-up + cosine schedule, gradient clipping, precision), the run folder
(never overwritten by accident, crash-safe resume state, metrics), divergence checks and the final save. The task
(``vlprompt.tasks``) owns data, batches, metrics and evaluation; the method owns its loss (``training_step``) and
the hooks declared on ``PromptMethod``. The step the trainer runs per batch is :func:`run_training_step`, which the
benchmarks time.
"""
from __future__ import annotations

import errno
import json
import math
import random
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlprompt.data.errors import DatasetError
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine import distributed, speed
from vlprompt.fileio import FolderBusyError, exclusive_folder
from vlprompt.options import OptionError, check_options, opt
from vlprompt.tasks.batches import StepOutput

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What the file system answers when a run folder cannot take more writes (full disk, quota, read-only, permissions).
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that would be overwritten, ...)."""


@dataclass
class TrainConfig:
    epochs: int = opt(10, min=1)
    batch_size: int = opt(32, min=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = opt(0.002, gt=0)
    momentum: float = opt(0.9, min=0)
    weight_decay: float = opt(5e-4, min=0)
    # Epochs at a constant warmup_lr before the cosine schedule (CoOp's recipe). None: 1, or 0 for a 1-epoch run.
    warmup_epochs: int | None = opt(None, min=0)
    warmup_lr: float = opt(1e-5, gt=0)
    grad_clip: float | None = opt(None, gt=0)  # max gradient norm; None = no clipping
    augment: bool = True  # random resized crop + flip on training images
    eval_batch_size: int = opt(64, min=1)
    num_workers: int = opt(0, min=0)  # loader worker processes per training process (0: load in the training loop)
    # Decode the training images once and augment from memory: None (auto) does so for a few-shot set whose decoded
    # images fit in image_cache_gib; True always; False never.
    cache_images: bool | None = None
    image_cache_gib: float = opt(4.0, gt=0)
    seed: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # torch.compile of the towers' repeated blocks (engine/speed.py): "none", "default", "max-autotune" or
    # "reduce-overhead" (CUDA graphs, GPU only). Changes float rounding only.
    compile: Literal["none", "default", "max-autotune", "reduce-overhead"] = "none"
    validate_every: int = opt(1, min=1)  # epochs

    def __post_init__(self) -> None:
        try:
            check_options(self, prefix="train.")
        except OptionError as err:
            raise ValueError(str(err)) from None
        if self.warmup_epochs is None:
            self.warmup_epochs = 1 if self.epochs > 1 else 0
        if not math.isfinite(self.lr):
            raise ValueError(f"invalid options: train.lr={self.lr} (must be a finite number)")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"invalid options: train.warmup_epochs={self.warmup_epochs} (must be < epochs, "
                             f"{self.epochs})")


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
    # Without cpu=True, accelerate joins processes started by torchrun only when it finds a GPU backend: CPU
    # processes would each train the whole job alone.
    cpu_job = not torch.cuda.is_available() and distributed.launched_world_size() > 1
    return Accelerator(mixed_precision=mixed, cpu=cpu_job)


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
    params = method.param_groups(config.lr) or list(method.prompt_parameters().values())
    # One fused kernel for the whole update on a GPU (a step of small prompts is launch-bound there).
    fused = {"fused": True} if all(p.is_cuda for p in method.prompt_parameters().values()) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               **fused)  # fmt: skip
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)


# ---------------------------------------------------------------------------------------------- the step
NAN_WORD = re.compile(r"\bnan\b", re.IGNORECASE)


class NonFiniteLoss(RuntimeError):
    """A training step's loss (or the parameters it produced) is not finite."""


class TrainingStepModule(nn.Module):
    """Runs ``method.training_step(batch)`` as a module's forward, so accelerate's wrappers (mixed-precision
    autocast, data-parallel gradient synchronisation) apply to the whole step, whatever the method computes."""

    def __init__(self, method) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch) -> StepOutput:
        return self.method.training_step(batch)


def prepare_training(method, config: TrainConfig, accelerator):
    """The step module and optimiser (prepared by ``accelerator``: mixed-precision loss scaling): what
    :func:`run_training_step` takes. The module is not wrapped in DistributedDataParallel: the trainer sums the
    prompt gradients itself (``distributed.sum_gradients``), weighting each process by its share of the batch,
    and a frozen backbone's buffers need no broadcast every step."""
    optimizer = accelerator.prepare(build_optimizer(method, config))
    return TrainingStepModule(method), optimizer


class OtherProcessFailed(RuntimeError):
    """Another process of the job failed in this step; its own error is in its log."""


def run_training_step(step_module, optimizer, batch, accelerator, params: list[torch.Tensor],
                      grad_clip: float | None = None, share: float = 1.0,
                      failure: BaseException | None = None) -> StepOutput | None:  # fmt: skip
    """One optimisation step: the method's loss terms under autocast, a finite-loss check, backward, optional
    gradient clipping, the optimiser step. Raises :class:`NonFiniteLoss` on a non-finite loss.

    In a job of several processes ``batch`` is this process's slice of the global batch (``None``: an empty
    slice), ``share`` its weight (its fraction of the global batch's loss normaliser: images, or boxes for
    detection) and ``failure`` an error this process met while loading the slice. The gradients summed over
    processes are then those of the global batch's loss, and every process takes the same decision: a non-finite
    loss or an error in any process stops all of them at this step, none waits for the others forever."""
    several = distributed.world_size() > 1
    if failure is not None and not several:
        raise failure
    output = None
    speed.begin_step(step_module.method)  # CUDA graphs of the previous step may be overwritten from here on
    if batch is not None and failure is None:
        try:
            with accelerator.autocast():
                output = step_module(batch)
                loss = output.loss
        except ValueError as err:  # e.g. the detector's matcher refuses non-finite boxes before any loss exists
            if NAN_WORD.search(str(err)) or not all(torch.isfinite(p).all() for p in params):
                failure = NonFiniteLoss("nan")
            else:
                failure = err
            if not several:
                raise failure from err
        except Exception as err:  # shared below, so the other processes stop too
            if not several:
                raise
            failure, output = err, None
    if not several and not torch.isfinite(loss):
        raise NonFiniteLoss(str(loss.item()))
    optimizer.zero_grad(set_to_none=True)
    if output is not None:
        accelerator.backward(loss if share == 1.0 else loss * share)
    if several:
        local = loss.detach().float() * share if output is not None else torch.zeros((), device=accelerator.device)
        failed = torch.tensor(0.0 if failure is None else 1.0, device=local.device)
        global_loss, failures = distributed.sum_gradients(params, torch.stack([local, failed])).tolist()
        if failure is not None:
            raise failure
        if failures:
            raise OtherProcessFailed(f"{int(failures)} other process(es) of this job failed in this step")
        if not math.isfinite(global_loss):  # one process's NaN reaches every process through the sum
            raise NonFiniteLoss(str(global_loss))
    if grad_clip is not None:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return output


def __getattr__(name: str):
    # evaluate / image_features_of moved to the classification task; kept importable from here.
    if name in ("evaluate", "image_features_of"):
        from vlprompt.tasks import classification

        return getattr(classification, name)
    raise AttributeError(name)


def _silent(message: str) -> None:
    """The log of a process other than the main one."""


def send_to_device(raw: Any, device: torch.device) -> Any:
    from accelerate.utils import send_to_device as accelerate_send

    return accelerate_send(raw, device, non_blocking=device.type == "cuda")


def _named_terms(output: StepOutput | None) -> dict[str, torch.Tensor]:
    """The loss and, when a method names several, each term (``loss_<name>``); nothing for an empty slice."""
    if output is None:
        return {}
    return {"loss": output.loss, **{f"loss_{name}": value for name, value in output.losses.items()}}


def _epoch_means(terms: dict[str, list[torch.Tensor]], steps: int, device: torch.device) -> dict[str, float]:
    """Per-step values summed over processes (each already weighted by its share), averaged over the epoch."""
    names = sorted(set().union(*distributed.gather_objects(sorted(terms))))  # a process may have had only empty slices
    zeros = torch.zeros(steps, device=device)
    per_step = torch.stack([torch.stack(terms[name]) if name in terms else zeros for name in names])  # (terms, steps)
    totals = distributed.sum_over_processes(per_step).mean(dim=1).tolist()
    return dict(zip(names, totals))


def task_class_name(name: str) -> str:
    from vlprompt.tasks import task_class

    return task_class(name).__name__


# ---------------------------------------------------------------------------------------------- training
class EvaluationDataError(DatasetError):
    """A dataset error met in the evaluation after training (a corrupt test image): the trained epochs are kept in
    ``run_dir``'s resume state, so a resume (``vlprompt train --resume``) evaluates them once the data is fixed."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class Trainer:
    """Trains any method on any task into a run folder (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_info = run_info or {}
        self.progress = progress
        self.log = log
        self.accelerator = make_accelerator(config.precision)
        if config.compile == "reduce-overhead" and self.accelerator.device.type != "cuda":
            raise TrainingError("train.compile=reduce-overhead records CUDA graphs and needs a GPU (this run is on "
                                f"{self.accelerator.device.type}); use train.compile=default or none.")
        self.history: list[dict[str, Any]] = []
        if not self.accelerator.is_main_process:  # one job, one voice: only the main process logs
            self.log = _silent

    # ---------------------------------------------------------------- public
    def fit(self, method, task, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train ``method`` on ``task``, evaluate it, save it; returns the final metrics.

        In a job of several processes every process calls ``fit``; only the main one locks and writes the run
        folder, and all return the same metrics."""
        if method.task != task.name:
            raise TrainingError(f"{method.registered_name!r} is a {method.task} method but the task is {task.name}; "
                                f"train it on a {method.task} task ({task_class_name(method.task)}).")  # fmt: skip
        self.history = []  # a Trainer may fit several runs; each run folder gets its own history
        task.configure(self.config)  # augmentation and loader workers follow the run's options
        task.check_before_training(method)
        self._check_compilable(method)
        with ExitStack() as stack:
            distributed.run_on_main(lambda: self._claim_run_dir(stack, resume, overwrite), (Exception,))
            try:
                final = self._fit_locked(method, task, resume)
            except OSError as err:
                if err.errno not in WRITE_FAILURES:
                    raise
                raise TrainingError(
                    f"cannot write {err.filename or self.run_dir}: {err.strerror}. Every finished epoch up to the "
                    f"last saved one is kept in {self.run_dir / ckpt.RESUME_DIR}: free space (or fix the folder's "
                    "permissions) and rerun with --resume."
                ) from None
            distributed.barrier()  # every process returns once the run folder is complete
            return final

    def _compiles(self, method) -> bool:
        """Whether this run compiles the method's towers (only gradient-step training does)."""
        return self.config.compile != "none" and not method.fits_features and bool(method.num_trainable())

    def _check_compilable(self, method) -> None:
        if not self._compiles(method):
            return
        try:
            speed.tower_layers(method.backbone, "image")
        except ValueError as err:
            raise TrainingError(f"train.compile={self.config.compile}: {err}; use train.compile=none.") from None

    def _claim_run_dir(self, stack: ExitStack, resume: bool, overwrite: bool) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise TrainingError(f"the output {self.run_dir} is a file, not a folder: pass a folder path as --output.")
        try:  # one writer per run folder; the lock goes with the process if it dies
            stack.enter_context(exclusive_folder(self.run_dir))
        except FolderBusyError as err:
            raise TrainingError(str(err)) from None
        except OSError as err:  # e.g. a read-only parent folder or a full disk
            raise TrainingError(f"cannot write the run folder {self.run_dir}: {err.strerror or err}; choose a "
                                "writable --output.") from None
        self._prepare_run_dir(resume, overwrite)

    def _fit_locked(self, method, task, resume: bool) -> dict[str, Any]:
        seed_everything(self.config.seed)
        method = method.to(self.accelerator.device)
        if self._compiles(method):
            speed.compile_towers(method, self.config.compile)
        if method.fits_features:
            record = {"epoch": 1, **task.fit_features(method, self.accelerator, self.config.eval_batch_size)}
            # Every process fitted the same features; the main one's fit is the run's, bit for bit, everywhere.
            if distributed.world_size() > 1:
                method.load_prompt_state_dict(distributed.broadcast_from_main(
                    {k: v.cpu() for k, v in method.prompt_state_dict().items()}))  # fmt: skip
            if not method.trains_after_fit:
                return self._finish(method, task, record)
            self.log("fitted on the training features (" + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k != "epoch") + "); training from this fit")  # fmt: skip
            return self._fit_steps(method, task, resume)
        if method.num_trainable() == 0:  # zero-shot, or zero-size prompts: nothing to train, evaluate only
            return self._finish(method, task, {"epoch": 0})
        return self._fit_steps(method, task, resume)

    # ---------------------------------------------------------------- run folder
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        self._stored_run_config: dict[str, Any] | None = None
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
            for name in (ckpt.PROMPT_FILE, ckpt.CONFIG_FILE, ckpt.METRICS_FILE, ckpt.RESULTS_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            for suffix in ("", ".tmp", ".old"):
                shutil.rmtree(self.run_dir / (ckpt.RESUME_DIR + suffix), ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stored_file = self.run_dir / ckpt.RUN_CONFIG_FILE
        if resume and stored_file.exists():
            # The record changes only once the resumed state is read (_record_resume): a refused resume leaves it.
            self._stored_run_config = json.loads(stored_file.read_text())
            return
        self._write_run_config({})

    def _write_run_config(self, extra: dict[str, Any]) -> None:
        # "processes" is how the run was launched, not what it trains: a resume may use another number.
        ckpt.atomic_write_json(self.run_dir / ckpt.RUN_CONFIG_FILE, {
            "train": asdict(self.config), **self.run_info, "processes": distributed.world_size(), **extra})

    def _record_resume(self, epochs_done: int) -> None:
        """Check a resume against the epochs already trained and record in run_config.json what it changed, so the
        record never states settings the saved epochs were not trained with."""
        cfg = self.config
        if epochs_done > cfg.epochs:
            raise TrainingError(f"{self.run_dir} already trained {epochs_done} epochs, more than --epochs "
                                f"{cfg.epochs}: resume with --epochs {epochs_done} or more, or --overwrite to start "
                                "over.")  # fmt: skip
        stored = self._stored_run_config
        if stored is None:  # a run folder without a record (written before records existed, or by hand)
            self._write_run_config({})
            return
        before, now = stored.get("train", {}), json.loads(json.dumps(asdict(cfg)))
        changed = {k: [before.get(k), now[k]] for k in sorted(now) if k in before and before[k] != now[k]}
        if changed and epochs_done == cfg.epochs:
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise TrainingError(f"{self.run_dir} finished its {epochs_done} epochs; resuming it with other settings "
                                f"({shown}) would train nothing. Use --overwrite or another --output to train with "
                                f"them, or --epochs above {epochs_done} to continue it.")  # fmt: skip
        resumes = list(stored.get("resumes", []))
        if changed:
            resumes.append({"after_epoch": epochs_done, "changed": changed})
        self._write_run_config({"resumes": resumes} if resumes else {})

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
            for key in sorted(set(self.run_info) | set(stored) - {"train", "processes"})
            if key in stored and stored.get(key) != current.get(key)  # a key a later version added is no change
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

    def _train_loader(self, task, dataset, batches: distributed.GlobalBatches) -> DataLoader:
        """This process's slices of the global batches, images read with per-image seeded augmentation; workers
        (``num_workers``) stay alive across epochs and batches land in pinned memory when a GPU takes them."""
        workers = self.config.num_workers
        return DataLoader(distributed.ItemSeeded(dataset), batch_sampler=batches,
                          num_workers=workers, persistent_workers=workers > 0,
                          multiprocessing_context=distributed.loader_worker_context(workers),
                          pin_memory=self.accelerator.device.type == "cuda",
                          collate_fn=distributed.EmptyAwareCollate(task.collate_fn))  # fmt: skip

    # ---------------------------------------------------------------- gradient steps
    def _fit_steps(self, method, task, resume: bool) -> dict[str, Any]:
        cfg = self.config
        device = self.accelerator.device
        step_module, optimizer = prepare_training(method, cfg, self.accelerator)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        start_epoch = self._load_resume_state(method, optimizer, scheduler) if resume else 0
        if start_epoch == 0:  # a fresh run starts from an empty training state, even on a method fitted before
            method.load_training_state({})
        params = list(method.prompt_parameters().values())
        task.prepare_training(method, self.accelerator, cfg.eval_batch_size)  # after configure(): cfg.augment
        dataset = task.train_dataset()
        n_train, processes = len(dataset), distributed.world_size()
        if min(cfg.batch_size, n_train) < processes:
            raise TrainingError(f"{processes} processes but a step has only {min(cfg.batch_size, n_train)} training "
                                f"images (--batch-size {cfg.batch_size}, {n_train} images): every process needs at "
                                "least one; raise --batch-size or start fewer processes.")  # fmt: skip
        batches = distributed.GlobalBatches(n_train, cfg.batch_size, cfg.seed)
        loader = self._train_loader(task, dataset, batches)
        step = 0
        for epoch in range(start_epoch, cfg.epochs):
            seed_everything(cfg.seed * 1000 + epoch)  # draws of the method itself (e.g. dropout): same after a resume
            method.on_epoch_start(epoch)
            method.train()
            task.start_epoch()
            epoch_start = time.perf_counter()
            batches.set_epoch(epoch)
            shares = batches.shares(task.loss_weight)
            # Detached, weighted by this process's share of each batch, summed over processes at the epoch's end:
            # the epoch's mean of the global batches' losses, read once, not synced every step.
            terms: dict[str, list[torch.Tensor]] = {}  # loss terms, then "log:<name>" for logged scalars
            batches_of_epoch = iter(loader)
            for step in self._progress(range(len(shares)), epoch):
                batch, failure = None, None
                try:  # a loading error (e.g. a corrupt image) is shared with the other processes in the step
                    raw = next(batches_of_epoch)
                    if raw is not None:
                        batch = task.make_batch(send_to_device(raw, device))
                except Exception as err:  # noqa: BLE001 - re-raised by run_training_step
                    failure = err
                try:
                    output = run_training_step(step_module, optimizer, batch, self.accelerator, params, cfg.grad_clip,
                                               share=shares[step], failure=failure)  # fmt: skip
                except NonFiniteLoss as err:
                    raise TrainingError(self._divergence_message(f"loss became {err}", epoch, step)) from None
                except OtherProcessFailed as err:
                    raise TrainingError(f"{err} (epoch {epoch + 1}, step {step + 1}); its error is in its output. "
                                        f"The state after the last finished epoch is kept in "
                                        f"{self.run_dir / ckpt.RESUME_DIR}.") from None  # fmt: skip
                values = _named_terms(output)
                if output is not None:
                    values.update({f"log:{name}": torch.tensor(float(v)) for name, v in output.logs.items()})
                    task.record_step(output, batch)
                zero = torch.zeros((), device=device)
                for name, value in values.items():
                    terms.setdefault(name, [zero] * step).append(value.detach().float().to(device) * shares[step])
                for name in terms:  # a term this process's (empty) slice did not produce
                    if len(terms[name]) == step:
                        terms[name].append(zero)
            scheduler.step()
            method.on_epoch_end(epoch)
            if not all(torch.isfinite(p).all() for p in params):
                # The epoch's last step is not followed by a loss check; a diverged prompt must not become the
                # resume point, or every --resume would fail the same way.
                raise TrainingError(self._divergence_message("the prompt parameters became non-finite", epoch, step))
            means = _epoch_means(terms, len(shares), device)
            losses = {k: v for k, v in means.items() if not k.startswith("log:")}
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                      "train_loss": losses["loss"]}  # fmt: skip
            if len(losses) > 2:  # several named terms: each one's mean too
                record.update({k: v for k, v in losses.items() if k != "loss"})
            record.update({k.removeprefix("log:"): v for k, v in means.items() if k.startswith("log:")})
            record.update(task.epoch_metrics())
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            if (epoch + 1) % cfg.validate_every == 0:
                record.update(task.validate(method, self.accelerator, cfg.eval_batch_size))
            self.history.append(record)
            self._save_resume_state(method, optimizer, scheduler, epoch + 1)
            if self.accelerator.is_main_process:
                self._write_metrics()
            self.log(f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f}" + "".join(
                f" {k.replace('_', ' ')} {record[k]:.2f}" for k in record
                if k.startswith(("train_acc", "val_"))))  # fmt: skip
        method.on_train_end()
        return self._finish(method, task, None)

    def _progress(self, loader, epoch: int):
        if not self.progress:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not self.accelerator.is_main_process)

    def _finish(self, method, task, record: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.config
        try:
            if record is not None:
                record.update(task.validate(method, self.accelerator, cfg.eval_batch_size))
                self.history.append(record)
            final = task.final_metrics(method, self.accelerator, cfg.eval_batch_size, self.log)
        except DatasetError as err:  # e.g. a corrupt test image, met only now: the training is not lost
            if not (self._resume_folder() / "state.json").exists():
                raise
            raise EvaluationDataError(str(err), self.run_dir) from err
        self.history.append(final)
        if self.accelerator.is_main_process:
            ckpt.save_prompt(self.run_dir, method)
            ckpt.atomic_write_json(self.run_dir / ckpt.RESULTS_FILE, {"final_metrics": final})
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
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "method": {k: v.detach().cpu() for k, v in method.training_state().items()}},
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

    def _read_resume_state(self) -> dict[str, Any] | None:
        """The saved state (prompt, optimiser, scheduler, history), or None to start from scratch."""
        folder = self._resume_folder()
        state_file = folder / "state.json"
        if not state_file.exists():
            if (self.run_dir / ckpt.PROMPT_FILE).exists():
                raise TrainingError(f"{self.run_dir} holds a finished run; nothing to resume.")
            self.log(f"no resumable state in {folder}; starting from scratch")
            self._record_resume(0)
            return None
        try:
            state = json.loads(state_file.read_text())
            epochs_done = int(state["epochs_done"])
        except (ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"{state_file} is corrupt ({type(err).__name__}: {err}); the run cannot be resumed "
                                "from it: --overwrite starts it over.") from None  # fmt: skip
        self._record_resume(epochs_done)
        return {"state": state, "prompt": ckpt.load_prompt_tensors(folder),
                "trainer": torch.load(folder / "trainer_state.pt", weights_only=False)}  # fmt: skip

    def _load_resume_state(self, method, optimizer, scheduler) -> int:
        # The main process reads the files and hands them to the others: on several nodes the run folder may
        # exist on the main node only, and every process must resume from the same epoch.
        saved = distributed.run_on_main(self._read_resume_state, (Exception,))
        if saved is None:
            return 0
        state, trainer_state = saved["state"], saved["trainer"]
        method.load_prompt_state_dict(saved["prompt"])
        method.load_training_state(trainer_state.get("method", {}))  # none in a state saved before methods kept one
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
