"""High-level jobs shared by the CLI, the benchmarks and users' scripts: train, evaluate, predict."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlprompt.assets import model_name_for_users
from vlprompt.backbones import load_backbone
from vlprompt.data import DatasetError, DatasetSplits, ImageDataset, build_transform, few_shot, load_dataset, subsample_classes
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.trainer import TrainConfig, Trainer, check_precision, make_accelerator, seed_everything
from vlprompt.methods import METHODS, canonical_method_name, get_prompt_model, make_config, method_class
from vlprompt.options import OptionError, check_keys
from vlprompt.recipes import AUTO, choose_recipe, describe_train
from vlprompt.specs import PATH_SCHEMES, DatasetSpec, SpecError
from vlprompt.tasks import Task, task_class
from vlprompt.tasks.base import TASKS
from vlprompt.tasks.classification import transform_config  # noqa: F401 - part of this module's API

@dataclass
class DataOptions:
    dataset: str = "toy:shapes"  # the embedded toy suite: runs with no download
    root: str | None = None  # folder holding the datasets; toy:<name> datasets default to the toy cache folder
    shots: int | None = None  # images per class for training; None = the full train split
    seed: int = 1  # few-shot sampling seed
    subsample: str = "all"  # "all" | "base" | "novel" (base-to-novel protocol)
    cache_dir: str | None = None  # few-shot split cache; default: vlprompt's cache folder (default_split_cache)
    categories: list[str] | None = None  # detection: train/evaluate on these category names only (default: all)


@dataclass
class RunOptions:
    model: str = "embedded"  # the shipped toy CLIP (vlprompt/assets): no download
    method: str = "coop"
    method_options: dict[str, Any] = field(default_factory=dict)
    data: DataOptions = field(default_factory=DataOptions)
    # Engine options. A dict holds only what the user sets: the recipe (below) fills in the rest. A TrainConfig is
    # taken as complete: no recipe applies.
    train: TrainConfig | dict[str, Any] = field(default_factory=dict)
    output: str = "runs/default"
    # "auto": the recipe the model carries (the embedded models: "toy"), else "field" (the papers' settings); or a
    # recipe name or file (vlprompt.recipes).
    recipe: str = AUTO


def check_train_keys(values: dict[str, Any], where: str) -> None:
    """Refuse engine options that do not exist, naming the closest one and every option."""
    try:
        check_keys(values, TrainConfig, "train option")
    except OptionError as err:
        raise ValueError(f"{where}: {err.problems[0]}") from None


def resolve_recipe(options: RunOptions) -> tuple[RunOptions, str]:
    """``options`` with the recipe's engine and method options under the user's, and a line saying which recipe
    it is and what it sets. Options whose ``train`` is already a TrainConfig are returned as they are."""
    if isinstance(options.train, TrainConfig):
        if options.recipe != AUTO:  # resolved before (the CLI resolves, then trains): nothing left to do
            return options, f"recipe: {options.recipe}: {describe_train(asdict(options.train))}"
        # recorded as "none": the run's settings are exactly the ones given
        return (dataclasses.replace(options, recipe="none"),
                f"recipe: none (a complete TrainConfig was given): {describe_train(asdict(options.train))}")
    if not isinstance(options.train, dict):
        raise ValueError(f"train must be a mapping of engine options or a TrainConfig (got {options.train!r})")
    if not isinstance(options.method_options, dict):
        raise ValueError(f"method_options must be a mapping (got {options.method_options!r})")
    choice = choose_recipe(options.recipe, options.model)
    method = canonical_method_name(options.method)
    recipe_values = choice.recipe.train_values(method, options.data.shots)
    where = f"recipe {choice.recipe.name} ({choice.why})"
    check_train_keys(recipe_values, where)
    check_train_keys(options.train, "your train options (--config train:, --set train.*, flags)")
    try:
        TrainConfig(**recipe_values)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    train_config = TrainConfig(**{**recipe_values, **options.train})
    method_options = {**choice.recipe.for_method(method).method_options, **options.method_options}
    resolved = dataclasses.replace(options, train=train_config, method_options=method_options,
                                   recipe=choice.recipe.name)  # fmt: skip
    what = describe_train(asdict(train_config))
    if not method_class(method).learns:
        what = "nothing to train"
    elif method_class(method).fits_features and not method_class(method).trains_after_fit:
        what = "a closed-form fit on frozen image features"
    line = f"recipe: {choice.recipe.name} ({choice.why}; pick another with --recipe): {what}"
    return resolved, line


def recorded_data(data: DataOptions) -> dict[str, Any]:
    """``data`` as a run records it: the data root and a dataset given by a relative path (imagefolder:, coco:, and
    the vqa:, nlvr2:, retrieval: folders) made absolute, resolved as the loaders resolve them (the working folder
    first, then the data root), so that `vlprompt eval` from another folder reads the same images."""
    values = asdict(data)
    root = Path(data.root).expanduser().resolve() if data.root else None
    if root is not None:
        values["root"] = str(root)
    spec = DatasetSpec.parse(data.dataset)
    if spec.scheme in PATH_SCHEMES and spec.name and not Path(spec.name).expanduser().is_absolute():
        path = Path(spec.name).expanduser()
        if not path.exists() and root is not None and (root / path).exists():
            path = root / path
        if path.exists():
            values["dataset"] = f"{spec.scheme}:{path.resolve()}"
    return values


def load_splits(options: DataOptions) -> DatasetSplits:
    splits = load_dataset(options.dataset, options.root)
    splits = subsample_classes(splits, options.subsample)
    if options.shots is not None:
        cache = options.cache_dir or default_split_cache(options.root)
        splits = few_shot(splits, options.shots, options.seed, cache_dir=cache)
    return splits


def default_split_cache(root: str | None) -> Path:
    """Where few-shot splits of datasets under ``root`` are cached: in vlprompt's cache folder (never in the data
    folder, which may be read-only or shared), one folder per data root."""
    import hashlib

    from vlprompt.fileio import cache_root

    resolved = str(Path(root).expanduser().resolve()) if root else str(_toy_root().resolve())
    return cache_root() / "splits" / hashlib.sha256(resolved.encode()).hexdigest()[:12]


def _toy_root() -> Path:
    from vlprompt.toyworld.suite import default_toy_root

    return default_toy_root()


def dataset_task(dataset: str) -> str:
    """The task a dataset name is for ("classification", "detection", "vqa", "nlvr2", "retrieval"), from its
    scheme."""
    try:
        return DatasetSpec.parse(dataset).task
    except SpecError as err:
        raise DatasetError(str(err)) from None


def _a(word: str) -> str:
    """``word`` with its article, as it is read aloud ("a vqa", "an nlvr2", "an image")."""
    return f"{'an' if word[:1] in 'aeiou' or word == 'nlvr2' else 'a'} {word}"


def check_method_fits_dataset(method: str, dataset: str, method_options: dict[str, Any] | None = None) -> str:
    """The task ``method`` runs on ``dataset`` (the dataset's, when the method serves it), refusing a dataset of
    another task with the fix, and ``method_options`` that name another task (``PromptMethod.bind_task``)."""
    cls = method_class(method)
    tasks = [t for t in cls.supported_tasks() if t in TASKS]
    if not tasks:  # a method written ahead of its task (the fusion-encoder methods before the VQA task)
        task = cls.supported_tasks()[0]
        raise DatasetError(f"{canonical_method_name(method)!r} is a {task} method, and vlprompt has no {task} task to "
                           "train or score it yet; `vlprompt params` counts its parameters")  # fmt: skip
    data_task = dataset_task(dataset)
    if data_task not in tasks:
        same_task = sorted(name for name in METHODS if data_task in method_class(name).supported_tasks())
        forms = [f"{_a(t)} dataset ({task_class(t).dataset_forms})" for t in tasks]
        listed = forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + f" or {forms[-1]}"
        raise DatasetError(f"{dataset!r} is {_a(data_task)} dataset but {canonical_method_name(method)!r} is "
                           f"{_a(tasks[0])} method; use {_a(data_task)} method ({', '.join(same_task)}) or {listed}.")  # fmt: skip
    if method_options is not None:
        cls.bind_task(dict(method_options), data_task)  # refuses options naming another task, before any loading
    return data_task


def check_backbone_kind(method: str, backbone) -> None:
    """Refuse a method written for another kind of model (a CLIP method on a detector), naming both."""
    wanted = method_class(method).backbone_kind
    if wanted != backbone.kind:
        raise DatasetError(
            f"method {canonical_method_name(method)!r} works on {wanted.replace('_', ' ')} models, but "
            f"{model_name_for_users(backbone.name_or_path) or backbone.family!r} is a {backbone.kind.replace('_', ' ')} "
            "model; see `vlprompt methods` for the pairs that work."
        )


def load_task_data(task: str, data: DataOptions, shots: bool = True):
    """The splits of ``data`` for ``task`` (few-shot sampled when ``shots`` and ``data.shots`` are set)."""
    if not shots:
        data = DataOptions(**{**asdict(data), "shots": None})
    return task_class(task).load_data(data)


def make_task(task: str, splits, backbone, augment: bool = True, few_shot: bool = False) -> Task:
    return task_class(task)(splits, backbone, augment, few_shot=few_shot)


def train(options: RunOptions, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict[str, Any]:
    """Train ``options.method`` on ``options.data`` and write the run folder; returns the final test metrics.

    The recipe (``options.recipe``) fills in what ``options`` leaves unset (:func:`resolve_recipe`)."""
    name = canonical_method_name(options.method)  # fail on a typo before any loading
    options, _ = resolve_recipe(options)
    check_precision(options.train.precision)  # and on fp16 without a GPU
    task_name = check_method_fits_dataset(name, options.data.dataset, options.method_options)
    # the dataset's task picks what the method builds for it (the fusion methods' head), recorded in its options
    options = dataclasses.replace(options, method_options=method_class(name).bind_task(dict(options.method_options),
                                                                                       task_name))  # fmt: skip
    splits = load_task_data(task_name, options.data)  # a dataset error before the model loads
    backbone = load_backbone(options.model)
    check_backbone_kind(name, backbone)
    task = make_task(task_name, splits, backbone, options.train.augment, few_shot=options.data.shots is not None)
    seed_everything(options.train.seed)  # prompt initialisation is part of the seeded run
    method_config = make_config(name, options.method_options, backbone)
    method = get_prompt_model(backbone, name, task.classnames, task.template, method_config)
    run_info = {
        "model": options.model,
        "method": name,
        "method_options": method.config.to_dict(),  # as the method resolved them (e.g. n_ctx of an init phrase)
        "recipe": options.recipe,
        "data": recorded_data(options.data),
        **task.run_info(),
    }
    trainer = Trainer(options.train, options.output, run_info=run_info, progress=progress, log=log)
    return trainer.fit(method, task, resume=resume, overwrite=overwrite)


def evaluate_checkpoint(
    run_dir: str | Path,
    data: DataOptions,
    split: str = "test",
    model: str | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate a saved prompt on any dataset / split (cross-dataset and domain-shift evaluation).

    ``precision`` "bf16" (or "fp16" on a GPU) runs the forward passes under autocast, as training does.
    """
    check_precision(precision)
    saved = ckpt.read_prompt_config(run_dir)
    task_name = saved.get("task", "classification")  # prompts of 0.1.0 name only detection
    data_task = dataset_task(data.dataset)
    if data_task != task_name:
        raise DatasetError(f"{data.dataset!r} is {_a(data_task)} dataset, but {run_dir} holds {_a(task_name)} prompt "
                           f"({saved.get('method')}); evaluate it on {_a(task_name)} dataset: --dataset "
                           f"{task_class(task_name).dataset_forms}.")  # fmt: skip
    splits = load_task_data(task_name, data, shots=False)
    backbone = ckpt.recorded_backbone(run_dir, model)
    ckpt.check_backbone(saved.get("backbone", {}), backbone)  # another architecture: say which, before any work
    task = make_task(task_name, splits, backbone, augment=False)
    method = ckpt.load_prompt(run_dir, backbone, task.classnames, task.template)
    accelerator = make_accelerator(precision)
    method = method.to(accelerator.device)
    return task.evaluate_split(method, split, accelerator, batch_size)


def predict(
    run_dir: str | Path,
    images: list[str | Path],
    k: int = 5,
    model: str | None = None,
    classnames: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels and probabilities for image files, with the prompt saved in ``run_dir``."""
    saved = ckpt.read_prompt_config(run_dir)
    task = saved.get("task", "classification")  # prompts of 0.1.0 name only detection
    if task != "classification":
        raise ValueError(f"{run_dir} holds {_a(task)} prompt; score it with `vlprompt eval {run_dir} --dataset "
                         f"{task_class(task).dataset_forms}`.")  # fmt: skip
    backbone = ckpt.recorded_backbone(run_dir, model)
    return predict_images(ckpt.load_prompt(run_dir, backbone, classnames), images, k)


@torch.no_grad()
def predict_images(method, images: list[str | Path], k: int = 5) -> list[dict[str, Any]]:
    """Top-k labels and probabilities (softmax for CLIP, per-class sigmoid for SigLIP) of a classification prompt
    model for image files."""
    from vlprompt.data import Sample

    if method.task != "classification":
        raise ValueError(f"{method.registered_name} is a {method.task} method; predict_images scores classification")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (--k) must be an integer >= 1: the number of top labels to show (got {k!r})")
    method.eval()
    samples = [Sample(path=Path(p).resolve(), label=0, classname="") for p in images]
    for sample in samples:
        if not sample.path.exists():
            raise FileNotFoundError(f"image {sample.path} does not exist")
        if sample.path.is_dir():
            raise ValueError(f"{sample.path} is a folder; pass image files (e.g. {sample.path}/*.png)")
    dataset = ImageDataset(samples, build_transform(transform_config(method.backbone), train=False))
    text_feats = None if method.fits_features or method.conditions_text_on_image else method.text_features()
    device = method.backbone.device
    out = []
    k = min(k, len(method.classnames))
    for sample, (pixels, _) in zip(samples, dataset):
        logits = method(pixel_values=pixels.unsqueeze(0).to(device), text_feats=text_feats)
        top = method.probabilities(logits)[0].topk(k)
        labels = [{"label": method.classnames[i], "probability": float(p)}
                  for p, i in zip(top.values.tolist(), top.indices.tolist())]  # fmt: skip
        out.append({"image": str(sample.path), "top": labels})
    return out
