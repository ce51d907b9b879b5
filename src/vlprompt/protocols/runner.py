"""The field's evaluation protocols over methods x datasets x shots x seeds, resumable.

Each (protocol, dataset, method, shots, seed) run writes its own folder with a ``result.json`` written last and
atomically: a finished run is skipped when the bench is started again, an interrupted one is redone from scratch
(its partial run folder is overwritten). Results go to ``results.csv`` (one row per evaluation) and are summarised
by :mod:`vlprompt.protocols.report`.

``precision`` (fp32, bf16, fp16 on a GPU) applies to every run's training and evaluation. Runs of another precision
than fp32 get their own folders (``..._seed1_bf16``) and result files (``results_bf16.csv``), so one output folder
can hold the same bench in several precisions without mixing them.

Detection datasets (``toydet:<name>``, ``coco:<folder>``; ``toydet:suite`` names the toy suite's six sets) run the
few-shot protocol as ODinW reports it: shots 1, 3, 5, 10 images per category and ``all`` (the whole training
split), COCO mAP@[.5:.95] per dataset and averaged over datasets; their rows record ``mAP`` (with AP50 and AP75) where
classification rows record ``accuracy``.

Two ways to use several processes (docs/scaling.md): ``--workers N`` trains N independent runs at once, each in
its own process (on a GPU machine worker k uses GPU k mod the number of GPUs); a bench started by ``torchrun`` or
``accelerate launch`` trains every run with all the job's processes, and only the main process writes files.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.api import DataOptions, RunOptions, evaluate_checkpoint, train
from vlprompt.engine.trainer import TrainConfig
from vlprompt.recipes import AUTO, Recipe, RecipeSet, choose_recipe, epochs_by_shots_mapping
from vlprompt.methods import canonical_method_name
from vlprompt.options import OptionError, check_options, opt

PROTOCOLS = ("fewshot", "base2novel", "crossdataset", "domain", "full")
# The "full" protocol trains on a dataset's whole training split (the fusion-encoder tasks: VQA, NLVR2, retrieval);
# its jobs record this in place of a shot count. So do few-shot jobs of the shot count "all" (detection's full set):
# results.csv holds 0 there, reports and run folders say "all".
WHOLE_SPLIT = 0
ALL_SHOTS = "all"  # how --shots (and shots: in a config) names the whole training split
# The fusion-encoder tasks (no bench protocol yet), by their dataset scheme, as messages name them.
FUSION_TASK_NAMES = {"vqa": ("a", "VQA"), "nlvr2": ("an", "NLVR2"), "retrieval": ("a", "retrieval")}
DEFAULT_SHOTS = (1, 2, 4, 8, 16)  # the few-shot protocol's shot counts, as the papers report them
# Detection's (ODinW, as GLIP reports it): images per category, and the whole training split.
DETECTION_SHOTS = (1, 3, 5, 10, ALL_SHOTS)
CSV_FIELDS = [
    "protocol", "train_dataset", "eval_dataset", "subset", "method", "shots", "seed", "accuracy", "n",
    "trainable_parameters", "train_time_s", "precision",
]
# A detection bench's table: COCO box AP (percent) in place of accuracy.
DETECTION_SCORES = ("mAP", "AP50", "AP75")
DETECTION_CSV_FIELDS = [name for field_name in CSV_FIELDS
                        for name in (DETECTION_SCORES if field_name == "accuracy" else (field_name,))]  # fmt: skip


def shot_count(shots: int | str) -> int:
    """A shot count as jobs record it: ``"all"`` (the whole training split) is :data:`WHOLE_SPLIT`."""
    return WHOLE_SPLIT if shots == ALL_SHOTS else int(shots)


def shots_label(shots: int) -> str:
    """A job's shot count as people read it: ``all`` for the whole training split."""
    return ALL_SHOTS if int(shots) == WHOLE_SPLIT else str(int(shots))


def shots_order(shots: int) -> tuple[bool, int]:
    """Sort key of shot counts: the whole training split after every count."""
    return (int(shots) == WHOLE_SPLIT, int(shots))


def score(row: dict[str, Any]) -> float:
    """A row's headline score: COCO mAP@[.5:.95] of a detection run, accuracy of any other."""
    return float(row["mAP"] if "mAP" in row else row["accuracy"])


def is_detection_rows(rows: Sequence[dict[str, Any]]) -> bool:
    return any("mAP" in row for row in rows)


def shot_independent(method: str) -> bool:
    """A method with nothing to learn (zero-shot) gives the same result at every shot count: run once per seed."""
    from vlprompt.methods import METHODS

    spec = METHODS.get(method)
    return spec is not None and not spec.method_class.learns


@dataclass
class BenchConfig:
    methods: list[str]
    datasets: list[str]
    protocols: list[Literal["fewshot", "base2novel", "crossdataset", "domain", "full"]] = opt(["fewshot"])
    # images per class (per category for detection), or "all": the whole training split. None: the few-shot
    # protocol's own, DEFAULT_SHOTS (classification) or DETECTION_SHOTS (detection datasets)
    shots: list[int | Literal["all"]] | None = opt(None, min=1)
    seeds: list[int] = opt([1, 2, 3])
    model: str = "embedded"
    data_root: str | None = None
    output: str = "bench"
    b2n_shots: int = opt(16, min=1)
    # crossdataset: source dataset -> targets (default: every other dataset); domain: source -> shifted variants
    cross_source: str | None = None
    domain_targets: dict[str, list[str]] = field(default_factory=dict)
    # The named recipe under the settings below (vlprompt.recipes): "auto" is the model's own recipe (the embedded
    # models carry "toy"), else "field"; a name ("field", "toy") or a recipe file. Resolved once, here.
    recipe: str = AUTO
    # Per-method and all-method settings of this bench; they win over the recipe's.
    recipes: dict[str, Recipe] = field(default_factory=dict)
    default_train: dict[str, Any] = field(default_factory=dict)
    # Epochs per shot count for every method (a recipe's own epochs / epochs_by_shots take precedence).
    default_epochs_by_shots: dict[Any, Any] = field(default_factory=dict)  # YAML may give "16": converted below
    # of every run's training and evaluation; part of the run folders' and files' names
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Runs trained at once, each in its own process with threads_per_worker torch threads. Small models are
    # launch-bound: on 2 CPU cores two 1-thread runs finish more work per second than one 2-thread run.
    # Not part of a run's settings: results are the same up to float summation order.
    workers: int = opt(1, min=1)
    threads_per_worker: int | None = opt(None, min=1)  # default: torch's thread count divided among the workers
    recipe_source: str = field(default="", init=False)  # how the recipe was chosen, for the log

    def __post_init__(self) -> None:
        try:
            check_options(self, prefix="bench.")
        except OptionError as err:
            raise ValueError(str(err)) from None
        self.methods = [canonical_method_name(m) for m in self.methods]
        self.datasets = expand_datasets(self.datasets)
        for name in ("methods", "datasets", "protocols", "shots", "seeds"):
            refuse_duplicates(name, getattr(self, name) or [])
        self.default_epochs_by_shots = epochs_by_shots_mapping(self.default_epochs_by_shots, "default_epochs_by_shots")
        self.recipes = {_recipe_method(k): v if isinstance(v, Recipe) else Recipe(**v)
                        for k, v in self.recipes.items()}  # fmt: skip
        choice = choose_recipe(self.recipe, self.model)
        self._apply_recipe(choice.recipe)
        self.recipe, self.recipe_source = choice.recipe.name, choice.why
        recipe_trains = [r.train for r in self.recipes.values()]
        if any("precision" in t for t in [self.default_train, *recipe_trains]):
            raise ValueError(
                "set the bench's precision with `precision:` (or --precision), not in default_train or a recipe's "
                "train: it applies to every run and names their folders, so results of different precisions stay apart"
            )
        if not self.datasets:
            raise ValueError("the bench needs at least one dataset")
        self._check_fusion_protocol()
        detection = self._check_detection()
        if self.shots is None:
            self.shots = list(DETECTION_SHOTS if detection else DEFAULT_SHOTS)
        if "crossdataset" in self.protocols and not cross_targets(self):
            raise ValueError("crossdataset needs a source and at least one target dataset: give two or more "
                             "--datasets")
        if "domain" in self.protocols and not self.domain_targets:
            self.domain_targets = default_domain_targets(self.datasets)
            if not self.domain_targets:
                raise ValueError(
                    "the domain protocol needs its targets: set domain_targets, e.g. --set "
                    "'domain_targets={imagenet: [imagenetv2, imagenet_sketch]}' (defaults exist only for imagenet "
                    "and toy:shapes among --datasets)"
                )


    def _check_fusion_protocol(self) -> None:
        """Fusion-encoder datasets (VQA, NLVR2, retrieval: no classes to sample shots of) run under the ``full``
        protocol, which runs nothing else; both sides are refused with the fix."""
        from vlprompt.engine.api import dataset_task

        fusion = [d for d in self.datasets if dataset_task(d) in FUSION_TASK_NAMES]
        others = [d for d in self.datasets if d not in fusion]
        if "full" in self.protocols:
            if others:
                raise ValueError(f"the full protocol trains fusion-encoder tasks (vqa:, nlvr2:, retrieval:, toy:vqa, "
                                 f"toy:nlvr2, toy:retrieval); {others[0]} is not one: bench it under another protocol "
                                 "in its own bench folder")  # fmt: skip
            if len(self.protocols) > 1:
                raise ValueError("the full protocol runs alone: bench classification protocols in another bench folder")
            not_fusion = [m for m in self.methods if not set(supported_tasks(m)) & set(FUSION_TASK_NAMES)]
            if not_fusion:
                raise ValueError(f"{not_fusion[0]} is not a fusion-encoder method; the full protocol runs "
                                 "fusion_head, apt_native, deep_prompt_native, lora_native and full_native")  # fmt: skip
            return
        if fusion:
            article, task = FUSION_TASK_NAMES[dataset_task(fusion[0])]
            raise ValueError(f"{fusion[0]} is {article} {task} dataset, which trains on its whole training split: "
                             "run it with --protocols full")  # fmt: skip
        fusion_methods = [m for m in self.methods if set(supported_tasks(m)) <= set(FUSION_TASK_NAMES)]
        if fusion_methods:
            raise ValueError(f"{fusion_methods[0]} is a fusion-encoder method: bench it on vqa:, nlvr2: or retrieval: "
                             "datasets (or toy:vqa, toy:nlvr2, toy:retrieval) with --protocols full")  # fmt: skip

    def _check_detection(self) -> bool:
        """Whether this is a detection bench. Detection datasets run with detection methods under the few-shot
        protocol only, classification datasets with the other methods; a mix is refused with the fix."""
        from vlprompt.engine.api import dataset_task

        detection = [d for d in self.datasets if dataset_task(d) == "detection"]
        detection_methods = [m for m in self.methods if "detection" in supported_tasks(m)]
        if not detection:
            if detection_methods:
                raise ValueError(f"{detection_methods[0]} is a detection method but {self.datasets[0]} is a "
                                 "classification dataset: bench detection methods on detection datasets "
                                 "(toydet:suite, toydet:<name>, coco:<folder>)")  # fmt: skip
            return False
        classification = [d for d in self.datasets if d not in detection]
        if classification:
            raise ValueError(f"{classification[0]} is a classification dataset and {detection[0]} a detection dataset: "
                             "bench them separately, each with its own --output")  # fmt: skip
        others = [m for m in self.methods if m not in detection_methods]
        if others:
            names = ", ".join(detection_method_names())
            raise ValueError(f"{others[0]} is not a detection method, so it cannot run on {detection[0]}: bench "
                             f"detection datasets with detection methods ({names})")  # fmt: skip
        not_fewshot = [p for p in self.protocols if p != "fewshot"]
        if not_fewshot:
            raise ValueError(f"detection datasets run the few-shot protocol only (ODinW's: --shots 1 3 5 10 all); "
                             f"drop --protocols {not_fewshot[0]}")  # fmt: skip
        return True

    def _apply_recipe(self, recipe: RecipeSet) -> None:
        """Put ``recipe`` under this bench's own settings: what the bench sets for every method (default_train,
        default_epochs_by_shots) also wins over the recipe's per-method values."""
        user_keys = set(self.default_train)
        drop_by_shots = "epochs" in user_keys or bool(self.default_epochs_by_shots)
        merged: dict[str, Recipe] = {}
        for method in self.methods:
            base = recipe.for_method(method).without(user_keys, drop_by_shots)
            merged[method] = base.under(self.recipes[method]) if method in self.recipes else base
        self.recipes = merged
        self.default_train = {**recipe.train, **self.default_train}
        recipe_by_shots = {} if "epochs" in user_keys else recipe.epochs_by_shots
        self.default_epochs_by_shots = {**recipe_by_shots, **self.default_epochs_by_shots}


def expand_datasets(datasets: Sequence[str]) -> list[str]:
    """``toydet:suite`` replaced by the toy detection suite's sets, in the suite's order."""
    from vlprompt.specs import DatasetSpec, SpecError
    from vlprompt.toyworld.detection_sets import SUITE_NAME, suite_dataset_names

    out: list[str] = []
    for dataset in datasets:
        try:
            spec = DatasetSpec.parse(str(dataset))
        except SpecError:  # the loaders name the problem with its fix
            out.append(dataset)
            continue
        if spec.scheme == "toydet" and spec.name.strip().lower() == SUITE_NAME:
            out += suite_dataset_names()
        else:
            out.append(dataset)
    return out


def detection_method_names() -> list[str]:
    from vlprompt.methods import METHODS

    return [name for name in METHODS if "detection" in supported_tasks(name)]


def refuse_duplicates(name: str, values: Sequence[Any]) -> None:
    """A value listed twice would run the same jobs twice and count them twice in the summary (a std of 0 over
    "2 seeds"). Methods come here by canonical name, so an alias and its method are one value."""
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{name} lists {value!r} more than once: give each of the {name} once")
        seen.add(value)


def _recipe_method(name: str) -> str:
    """The canonical name of a method that ``recipes:`` names; a typo says where it was written."""
    from vlprompt.methods import MethodConfigError

    try:
        return canonical_method_name(name)
    except MethodConfigError as err:
        raise ValueError(f"recipes: names {err}") from None


def cross_targets(config: BenchConfig) -> list[str]:
    """The cross-dataset protocol's targets other than its source (cross_source, else the first dataset)."""
    source = config.cross_source or config.datasets[0]
    return [dataset for dataset in config.datasets if dataset != source]


def default_domain_targets(datasets: Sequence[str]) -> dict[str, list[str]]:
    """The field's domain-generalisation targets of the sources among ``datasets``: ImageNet -> V2 / Sketch / A / R,
    and toy:shapes -> its five shifted variants."""
    from vlprompt.toyworld.suite import SUITE

    out: dict[str, list[str]] = {}
    for dataset in datasets:
        key = dataset.strip().lower().replace("-", "_")
        if key == "imagenet":
            out[dataset] = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
        elif key in ("toy:shapes", "toy_shapes"):
            out[dataset] = [f"toy:{name}" for name, spec in SUITE.items() if spec.source == "shapes"]
    return out


def supported_tasks(method: str) -> tuple[str, ...]:
    from vlprompt.methods import method_class

    return method_class(method).supported_tasks()


def job_epochs(config: BenchConfig, recipe: Recipe, shots: int) -> int | None:
    """Epochs of a job: recipe by shots > recipe's train > bench default by shots > default_train (None: engine's)."""
    if shots in recipe.epochs_by_shots:
        return recipe.epochs_by_shots[shots]
    if "epochs" in recipe.train:
        return int(recipe.train["epochs"])
    if shots in config.default_epochs_by_shots:
        return config.default_epochs_by_shots[shots]
    return config.default_train.get("epochs")


@dataclass(frozen=True)
class Job:
    protocol: str
    dataset: str
    method: str
    shots: int
    seed: int
    subsample: str = "all"
    evals: tuple[tuple[str, str], ...] = ()  # (eval dataset, subset) pairs evaluated with the trained prompt
    precision: str = "fp32"

    @property
    def key(self) -> str:
        safe = self.dataset.replace(":", "_").replace("/", "_")
        amount = "all" if self.protocol == "full" or self.shots == WHOLE_SPLIT else f"shots{self.shots}"
        run = f"{amount}_seed{self.seed}{precision_suffix(self.precision)}"
        return f"{self.protocol}/{safe}/{self.method}/{run}"


def precision_suffix(precision: str) -> str:
    """"" for fp32 (the names every earlier bench wrote), "_bf16" / "_fp16" otherwise."""
    return "" if precision == "fp32" else f"_{precision}"


def results_csv_path(config: BenchConfig) -> Path:
    return Path(config.output) / f"results{precision_suffix(config.precision)}.csv"


def bench_precisions(folder: Path) -> dict[str, str]:
    """Precision -> bench_config file name of each bench ``folder`` holds (bench_config.json is fp32's)."""
    from vlprompt.engine.trainer import PRECISIONS

    names = {precision: f"bench_config{precision_suffix(precision)}.json" for precision in PRECISIONS}
    return {precision: name for precision, name in names.items() if (folder / name).is_file()}


def finished_rows(config: BenchConfig) -> list[dict[str, Any]]:
    """The rows of the bench already in ``config.output`` (--report-only), refusing a table with none."""
    path, folder = results_csv_path(config), Path(config.output)
    if not path.is_file():
        raise ValueError(f"{folder} has bench_config{precision_suffix(config.precision)}.json but no {path.name}: "
                         "the bench finished no run; run it without --report-only")
    rows = read_csv(path)
    if not rows:
        raise ValueError(f"{path.name} in {folder} has no finished run: run the bench first")
    return rows


def plan_jobs(config: BenchConfig) -> list[Job]:
    jobs: list[Job] = []
    tied = {method: tied_to_classes(config, method) for method in config.methods}
    for protocol in config.protocols:
        for method in config.methods:
            for seed in config.seeds:
                jobs.extend(_protocol_jobs(config, protocol, method, seed, tied[method]))
    return [dataclasses.replace(job, precision=config.precision) for job in jobs]


def tied_to_classes(config: BenchConfig, method: str) -> bool:
    """Whether ``method`` under this bench's recipe can only score its training classes (then base-to-novel
    evaluates base classes only and cross-dataset only the source, as papers report a linear probe)."""
    from vlprompt.methods import METHODS, make_config

    if method not in METHODS:
        return False
    recipe = config.recipes.get(method, Recipe())
    return METHODS[method].method_class.tied_to_classes(make_config(method, recipe.method_options))


def _protocol_jobs(config: BenchConfig, protocol: str, method: str, seed: int, tied: bool) -> Iterable[Job]:
    """``tied``: the method can only score its training classes (:func:`tied_to_classes`)."""
    if protocol == "fewshot":
        counts = [shot_count(k) for k in config.shots]
        shot_list = [counts[-1]] if shot_independent(method) else counts
        for dataset in config.datasets:
            for shots in shot_list:
                yield Job(protocol, dataset, method, shots, seed, evals=((dataset, "all"),))
    elif protocol == "base2novel":
        for dataset in config.datasets:
            evals = ((dataset, "base"),) if tied else ((dataset, "base"), (dataset, "novel"))
            yield Job(protocol, dataset, method, config.b2n_shots, seed, subsample="base", evals=evals)
    elif protocol == "crossdataset":
        source = config.cross_source or config.datasets[0]
        targets = ((source, "all"),) if tied else tuple((d, "all") for d in config.datasets)
        yield Job(protocol, source, method, config.b2n_shots, seed, evals=targets)
    elif protocol == "full":
        for dataset in config.datasets:
            yield Job(protocol, dataset, method, WHOLE_SPLIT, seed, evals=((dataset, "all"),))
    elif protocol == "domain":
        for source, targets in config.domain_targets.items():
            evals = ((source, "all"),) + tuple((t, "all") for t in targets)
            yield Job(protocol, source, method, config.b2n_shots, seed, evals=evals)


def _run_options(config: BenchConfig, job: Job, run_dir: Path) -> RunOptions:
    recipe = config.recipes.get(job.method, Recipe())
    train_values = {**config.default_train, **recipe.train, "seed": job.seed, "precision": job.precision}
    epochs = job_epochs(config, recipe, job.shots)
    if epochs is not None:
        train_values["epochs"] = epochs
    return RunOptions(
        model=config.model,
        method=job.method,
        method_options=copy.deepcopy(recipe.method_options),
        data=DataOptions(
            dataset=job.dataset, root=config.data_root,
            shots=None if job.protocol == "full" or job.shots == WHOLE_SPLIT else job.shots,
            seed=job.seed, subsample=job.subsample,
        ),
        train=TrainConfig(**train_values),
        output=str(run_dir),
    )


def run_job(config: BenchConfig, job: Job) -> list[dict[str, Any]]:
    """Train one job and evaluate it on its targets; returns one CSV row per evaluation."""
    run_dir = Path(config.output) / "runs" / job.key
    options = _run_options(config, job, run_dir)
    start = time.perf_counter()
    train(options, overwrite=True, progress=False, log=lambda _: None)
    train_time = time.perf_counter() - start
    rows = _evaluate_job(config, job, run_dir, job.evals, train_time)
    settings = job_settings(options, [dataset for dataset, _ in job.evals])
    if writes_files():
        ckpt.atomic_write_json(run_dir / "result.json", {"job": asdict(job), "settings": settings,
                                                         "rows": rows})  # fmt: skip
    return rows


def writes_files() -> bool:
    """False in the processes of a distributed bench other than the main one: they train and evaluate, not write."""
    from vlprompt.engine.distributed import launched_rank

    return launched_rank() == 0


def _evaluate_job(config: BenchConfig, job: Job, run_dir: Path, evals: Sequence[tuple[str, str]],
                  train_time: float) -> list[dict[str, Any]]:
    """One CSV row per (dataset, subset) in ``evals``, from the prompt saved in ``run_dir``."""
    saved = ckpt.read_prompt_config(run_dir)
    rows = []
    for eval_dataset, subset in evals:
        data = DataOptions(dataset=eval_dataset, root=config.data_root, subsample=subset)
        result = evaluate_checkpoint(run_dir, data, split="test", model=config.model, precision=job.precision)
        # detection: COCO box AP; every other task's headline score is its "accuracy"
        scores = {k: result[k] for k in DETECTION_SCORES} if "mAP" in result else {"accuracy": result["accuracy"]}
        rows.append(
            {
                "protocol": job.protocol,
                "train_dataset": job.dataset,
                "eval_dataset": eval_dataset,
                "subset": subset,
                "method": job.method,
                "shots": job.shots,
                "seed": job.seed,
                **scores,
                "n": result["n"],
                "trainable_parameters": saved["trainable_parameters"],
                "train_time_s": round(train_time, 3),
                "precision": job.precision,
            }
        )
    return rows


def _reuse_job(config: BenchConfig, job: Job, stored: dict[str, Any], result_file: Path,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of a finished run for this job's evaluation targets; targets added since it ran (a longer
    cross-dataset or domain list) are evaluated on its saved prompt, without retraining, and stored with it."""
    rows = list(stored["rows"])
    have = {(r["eval_dataset"], r["subset"]) for r in rows}
    missing = [target for target in job.evals if target not in have]
    if missing:
        train_time = rows[0]["train_time_s"] if rows else 0.0
        rows += _evaluate_job(config, job, result_file.parent, missing, train_time)
        datasets = list(dict.fromkeys(r["eval_dataset"] for r in rows))
        settings = {**stored["settings"], "data": {**stored["settings"].get("data", {}),
                                                   **_toy_fingerprints(datasets)}} if stored.get("settings") else None
        if writes_files():
            ckpt.atomic_write_json(result_file, {**stored, "job": asdict(job), "settings": settings, "rows": rows})
        log(f"{job.key}: evaluated the finished run on {len(missing)} new target(s): "
            + ", ".join(f"{d}[{sub}]" for d, sub in missing))
    wanted = set(job.evals)
    return [row for row in rows if (row["eval_dataset"], row["subset"]) in wanted]


# Training options that cannot change a run's result (how evaluation is batched, data loading workers).
# (compile changes float rounding only)
_RESULT_NEUTRAL = ("eval_batch_size", "num_workers", "validate_every", "cache_images", "image_cache_gib", "compile")


def job_settings(options: RunOptions, eval_datasets: Sequence[str] = ()) -> dict[str, Any]:
    """What a finished run was trained with, as stored beside its result and compared when it is reused."""
    train_values = {k: v for k, v in asdict(options.train).items() if k not in _RESULT_NEUTRAL}
    model = options.model
    if model == "embedded" or model.startswith("embedded:"):  # the same name across package versions
        from vlprompt.assets import embedded_weights_digest

        model = f"{model}@{embedded_weights_digest(model)}"
    return {"model": model, "method_options": options.method_options, "train": train_values,
            "data": _toy_fingerprints([options.data.dataset, *eval_datasets])}


def _toy_fingerprints(datasets: Sequence[str]) -> dict[str, str]:
    """Digest of each procedural toy dataset (their content changes with the package version; real datasets' do not)."""
    from vlprompt.specs import TOY_FUSION_SETS
    from vlprompt.toyworld.detection_sets import DETECTION_SUITE, detection_set_fingerprint
    from vlprompt.toyworld.fusion_sets import fusion_set_fingerprint
    from vlprompt.toyworld.suite import toy_fingerprint

    out = {}
    for name in dict.fromkeys(datasets):
        prefix, sep, arg = name.partition(":")
        if sep and prefix.strip().lower() == "toy":  # as vlprompt.data.datasets dispatches it
            toy_set = arg.strip().lower()
            out[name] = fusion_set_fingerprint(toy_set) if toy_set in TOY_FUSION_SETS else toy_fingerprint(arg)
        elif sep and prefix.strip().lower() == "toydet" and arg.strip().lower() in DETECTION_SUITE:
            out[name] = detection_set_fingerprint(arg)
    return out


def _check_reusable(config: BenchConfig, job: Job, stored: dict[str, Any], result_file: Path) -> None:
    """A finished run is reused only if it was trained as this bench would train it now."""
    stored_dataset = stored.get("job", {}).get("dataset", job.dataset)
    if stored_dataset != job.dataset:  # two dataset names that map to one folder name
        raise ValueError(
            f"{result_file.parent} holds a run on {stored_dataset!r}, not {job.dataset!r} (their run folder names "
            "coincide): bench them with separate --output folders."
        )
    before = stored.get("settings")
    if before is None:  # written before settings were stored: nothing to compare
        return
    evaluated = [dataset for dataset, _ in job.evals if dataset in before.get("data", {})]
    now = json.loads(json.dumps(job_settings(_run_options(config, job, result_file.parent), evaluated)))
    if "data" not in before:  # stored before dataset digests were: nothing to compare
        now.pop("data")
    else:  # targets the run was not evaluated on yet have no stored digest: they are evaluated on reuse
        before = {**before, "data": {k: v for k, v in before["data"].items() if k in now["data"]}}
    if before != now:
        parts = ("train", "method_options", "data")
        changed = [f"{part}.{k}: {before[part].get(k)!r} -> {now[part].get(k)!r}"
                   for part in parts if part in now for k in sorted(set(before[part]) | set(now[part]))
                   if before[part].get(k) != now[part].get(k)]
        if before["model"] != now["model"]:
            changed.insert(0, f"model: {before['model']!r} -> {now['model']!r}")
        raise ValueError(
            f"{result_file.parent} was trained with other settings than this bench asks for ({'; '.join(changed)}). "
            "Results of different recipes must not be mixed in one table: use another --output, or delete that "
            "run folder to retrain it."
        )


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every planned job not already finished; rewrite results.csv from all finished jobs."""
    from vlprompt.engine.distributed import launched_world_size

    if config.workers > 1 and launched_world_size() > 1:
        raise ValueError(f"--workers {config.workers} in a bench started with {launched_world_size()} processes: "
                         "either launch one process and spread runs with --workers, or launch several processes "
                         "(torchrun) and train each run with all of them (--workers 1).")
    if not writes_files():
        log = _silent
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder: give a folder for the bench")
    log(f"recipe: {config.recipe} ({config.recipe_source}; pick another with --recipe)")
    shots_line = _shots_note(config)
    if shots_line:
        log(shots_line)
    jobs = plan_jobs(config)
    check_same_task_as_folder(config, jobs)
    check_jobs(config, jobs)
    finished_runs = _finished_runs(config, jobs)  # every reuse check passes before anything is written
    output.mkdir(parents=True, exist_ok=True)
    if writes_files():
        ckpt.atomic_write_json(output / f"bench_config{precision_suffix(config.precision)}.json",
                               _config_json(config))
    rows_by_job: dict[int, list[dict[str, Any]]] = {}
    pending: list[tuple[int, Job]] = []
    for i, job in enumerate(jobs, 1):
        if i in finished_runs:
            stored, result_file = finished_runs[i]
            rows_by_job[i] = [{"precision": job.precision, **row}
                              for row in _reuse_job(config, job, stored, result_file, log)]
        else:
            pending.append((i, job))
    done = len(rows_by_job)

    def finished(i: int, job: Job, job_rows: list[dict[str, Any]], seconds: float) -> None:
        rows_by_job[i] = job_rows
        accs = ", ".join(f"{r['eval_dataset']}[{r['subset']}] {'mAP ' if 'mAP' in r else ''}{score(r):.1f}"
                         for r in job_rows)  # fmt: skip
        log(f"[{i}/{len(jobs)}] {job.key}: {accs} ({seconds:.1f}s)")

    def failed(i: int, job: Job) -> None:  # the error line that ends the bench may not name the run
        log(f"[{i}/{len(jobs)}] {job.key}: failed")

    try:
        with _terminate_unwinds():
            if config.workers == 1 or len(pending) <= 1:
                for i, job in pending:
                    try:
                        result = _timed_job(config, job)
                    except Exception:
                        failed(i, job)
                        raise
                    finished(i, job, *result)
            else:
                _run_parallel(config, pending, finished, failed)
    finally:  # a failed or interrupted bench still tables every run that finished
        rows = [row for i in sorted(rows_by_job) for row in rows_by_job[i]]  # plan order, however runs finished
        rows = with_earlier_rows(results_csv_path(config), rows)
        if writes_files() and rows:  # no finished run: no empty table that --report-only would take for a bench
            write_csv(results_csv_path(config), rows)
    if done:
        log(f"{done} of {len(jobs)} runs were already finished and were reused")
    return rows


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM (``kill``, a job scheduler's stop) unwinds the bench as Ctrl-C does, so the runs that finished are
    still written to results.csv; by default SIGTERM ends the process without running any ``finally``."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shots_note(config: BenchConfig) -> str:
    """A line saying that the protocols other than fewshot train at b2n_shots, when the bench sets shots (a user
    asking base2novel --shots 4 would otherwise read 16-shot results as 4-shot ones); "" when it need not be said."""
    asked = [p for p in config.protocols if p != "fewshot"]
    if not asked or list(config.shots) == list(DEFAULT_SHOTS):
        return ""
    return (f"{', '.join(asked)} train at b2n_shots={config.b2n_shots} (change with --set b2n_shots=N); --shots "
            "applies to fewshot only")


def _finished_runs(config: BenchConfig, jobs: Sequence[Job]) -> dict[int, tuple[dict[str, Any], Path]]:
    """Plan index (from 1) -> (stored result, its file) of every job already finished, each checked reusable."""
    found = {}
    for i, job in enumerate(jobs, 1):
        result_file = Path(config.output) / "runs" / job.key / "result.json"
        if result_file.exists():
            stored = json.loads(result_file.read_text())
            _check_reusable(config, job, stored, result_file)
            found[i] = (stored, result_file)
    return found


ROW_KEY = ("protocol", "train_dataset", "eval_dataset", "subset", "method", "shots", "seed", "precision")


def with_earlier_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` followed by the rows of an earlier results.csv that this bench did not produce (a rerun with fewer
    methods, datasets or seeds): the folder's table keeps every finished run."""
    if not path.exists():
        return rows

    def key(row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(k, "fp32" if k == "precision" else "")) for k in ROW_KEY)

    current = {key(row) for row in rows}
    return rows + [row for row in read_csv(path) if key(row) not in current]


def check_same_task_as_folder(config: BenchConfig, jobs: Sequence[Job]) -> None:
    """A bench folder's table holds one task's scores: detection rows (mAP) and accuracy rows do not mix."""
    from vlprompt.engine.api import dataset_task

    path = results_csv_path(config)
    if not jobs or not path.is_file():
        return
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    detection = dataset_task(jobs[0].dataset) == "detection"
    if header and ("mAP" in header) != detection:
        held, asked = ("detection", "classification") if "mAP" in header else ("classification", "detection")
        raise ValueError(f"{config.output} holds a {held} bench ({path.name}); give this {asked} bench its own "
                         "--output")


def check_jobs(config: BenchConfig, jobs: Sequence[Job]) -> None:
    """Every recipe and dataset of the plan, checked before the first run: a typo must not surface hours in."""
    from vlprompt.methods import make_config

    for method in dict.fromkeys(job.method for job in jobs):
        try:
            make_config(method, config.recipes.get(method, Recipe()).method_options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe of {method}: {err}") from err
    check_train_options(config, list(dict.fromkeys(job.method for job in jobs)))
    for job in jobs:  # what is left: options that clash only at a job's own epochs (warmup_epochs >= epochs)
        try:
            _run_options(config, job, Path(config.output))
        except ValueError as err:
            raise ValueError(f"{job.key}: {err}") from None
    for dataset in dict.fromkeys(d for job in jobs for d in (job.dataset, *(e for e, _ in job.evals))):
        load_bench_dataset(dataset, config.data_root)  # names the dataset and the fix on a typo or a missing folder


def load_bench_dataset(dataset: str, data_root: str | None) -> None:
    """Read (and, for a procedural toy set, write on first use) a dataset with its task's loader."""
    from vlprompt.data import load_dataset
    from vlprompt.engine.api import dataset_task, load_task_data

    from vlprompt.data.coco import SPLITS, DetectionSplits

    task = dataset_task(dataset)
    if task == "classification":
        load_dataset(dataset, data_root)
        return
    splits = load_task_data(task, DataOptions(dataset=dataset, root=data_root), shots=False)
    if isinstance(splits, DetectionSplits):  # its image files are checked where a split is used: a bench uses each
        for split in SPLITS:
            splits.split(split)


def check_train_options(config: BenchConfig, methods: Sequence[str]) -> None:
    """Training options checked where they were set, default_train first and then each method's recipe on top of
    it, so that a message names default_train.lr or recipes.coop.train.lrr rather than the merged train.lr."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    sources = {"default_train": config.default_train}
    sources.update({f"recipes.{method}.train": config.recipes.get(method, Recipe()).train for method in methods})
    for where, values in sources.items():
        unknown = [f"{where}.{key}" for key in sorted(set(values) - set(known))]
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; the options are: {', '.join(known)}")
        try:
            TrainConfig(**{**config.default_train, **values})
        except ValueError as err:
            raise ValueError(re.sub(r"\btrain\.", f"{where}.", str(err))) from None


def _run_parallel(config: BenchConfig, pending: list[tuple[int, Job]],
                  finished: Callable[[int, Job, list[dict[str, Any]], float], None],
                  failed: Callable[[int, Job], None] = lambda i, job: None) -> None:
    """Run jobs in ``config.workers`` processes. A failed job stops the bench once the running ones end; Ctrl-C or
    SIGTERM ends the workers at once (finished runs are kept either way, so rerunning resumes)."""
    import multiprocessing
    import os

    import torch
    from transformers.utils import logging as hf_logging

    from vlprompt.protocols.workers import run_in_workers

    threads = config.threads_per_worker or max(1, torch.get_num_threads() // config.workers)
    gpus = visible_gpus()
    # a spawned worker starts with transformers' default logging: give it the caller's (the CLI quiets it)
    hf_state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    # Procedural datasets are written on first use: write each once here, not racing in several workers.
    for name in dict.fromkeys(d for _, job in pending for d in (job.dataset, *(e for e, _ in job.evals))):
        load_bench_dataset(name, config.data_root)
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool state, which can deadlock torch
    context = multiprocessing.get_context("spawn")
    started = context.Value("i", 0)  # workers number themselves in start order: worker k takes GPU k mod #GPUs

    def job_finished(item: tuple[int, Job], value: tuple[list[dict[str, Any]], float]) -> None:
        finished(*item, *value)

    run_in_workers(config.workers, context, _init_worker, (threads, *hf_state, started, gpus, os.getpid()),
                   _timed_job, [((i, job), (config, job)) for i, job in pending], job_finished,
                   describe=lambda item: item[1].key, failed=lambda item: failed(*item))


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (none without CUDA)."""
    import os

    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _silent(message: str) -> None:
    """The log of a distributed bench's processes other than the main one."""


def _die_with(parent_pid: int) -> None:
    """End this worker when the bench process that started it ends (killed, or stopped with Ctrl-C): an orphaned
    worker would go on training into the run folders and hold their locks against the rerun that resumes them. Linux
    only (prctl); elsewhere a worker ends after its current run."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # no usable libc: the worker ends after its current run
        return
    if os.getppid() != parent_pid:  # the bench already ended between the spawn and the prctl
        os._exit(1)


def _init_worker(threads: int, hf_verbosity: int, hf_progress_bars: bool, started=None,
                 gpus: Sequence[str] = (), parent_pid: int | None = None) -> None:  # fmt: skip
    import os
    import warnings

    if parent_pid is not None:
        _die_with(parent_pid)
    if started is not None:
        with started.get_lock():
            index = started.value
            started.value += 1
        if gpus:  # before this worker touches CUDA: it then sees one GPU, its own
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity(hf_verbosity)
    if not hf_progress_bars:
        hf_logging.disable_progress_bar()
    if hf_verbosity >= hf_logging.ERROR:
        warnings.filterwarnings("ignore", module="transformers")


def _timed_job(config: BenchConfig, job: Job) -> tuple[list[dict[str, Any]], float]:
    start = time.perf_counter()
    job_rows = run_job(config, job)
    return job_rows, time.perf_counter() - start


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    fields = DETECTION_CSV_FIELDS if is_detection_rows(rows) else CSV_FIELDS
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields})
    ckpt.atomic_write_bytes(path, buffer.getvalue().encode())


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("accuracy", *DETECTION_SCORES, "train_time_s"):
            if key in row:
                row[key] = float(row[key])
        for key in ("shots", "seed", "n", "trainable_parameters"):
            row[key] = int(row[key])
        row["precision"] = row.get("precision") or "fp32"  # files written before the column existed
    return rows


def _config_json(config: BenchConfig) -> dict[str, Any]:
    out = asdict(config)
    out["recipes"] = {k: asdict(v) if isinstance(v, Recipe) else v for k, v in config.recipes.items()}
    return out


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)
