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
from vlprompt.data.datasets import open_image
from vlprompt.data.drawing import draw_detections
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.trainer import (
    TrainConfig,
    Trainer,
    TrainingError,
    check_precision,
    make_accelerator,
    seed_everything,
)
from vlprompt.methods import METHODS, canonical_method_name, get_prompt_model, make_config, method_class
from vlprompt.options import OptionError, check_keys
from vlprompt.recipes import AUTO, choose_recipe, describe_train
from vlprompt.specs import PATH_SCHEMES, DatasetSpec, SpecError
from vlprompt.tasks import Task, task_class
from vlprompt.tasks.base import TASKS
from vlprompt.tasks.detection import DEFAULT_SCORE_THRESHOLD
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
    try:
        method = get_prompt_model(backbone, name, task.classnames, task.template, method_config)
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError when memory runs out
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise TrainingError(f"building {name} with {options.method_options or 'its default options'} needs more "
                            "memory than this machine has: lower its sizes (prompt counts, rank, layers)") from None
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
    k: int | None = None,
    model: str | None = None,
    classnames: list[str] | None = None,
    *,
    threshold: float | None = None,
    max_boxes: int | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Predictions for image files with the prompt saved in ``run_dir``, one dict per image.

    A classification run: the top ``k`` (default 5) labels and probabilities (:func:`predict_images`).
    A detection run: the boxes whose category score is at least ``threshold`` (default
    ``DEFAULT_SCORE_THRESHOLD``, 0.3), best first, at most ``max_boxes`` per image (:func:`predict_detections`);
    with ``output``, also a PNG per image with its boxes drawn and labelled, ``<output>/<image stem>.png``, its path
    under the result's ``"output"``. An existing PNG there is replaced only with ``overwrite``; an input image never.
    ``classnames`` re-points the prompt at other labels (category phrases, for a detection run)."""
    saved = ckpt.read_prompt_config(run_dir)
    task = saved.get("task", "classification")  # prompts of 0.1.0 name only detection
    what = f"{run_dir} holds {_a(task)} prompt ({saved.get('method')})"
    if task == "classification":
        given = [name for name, value in (("threshold", threshold), ("max_boxes", max_boxes), ("output", output),
                                          ("overwrite", overwrite or None)) if value is not None]  # fmt: skip
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ValueError(f"{', '.join(given)} ({flags}) appl{'ies' if len(given) == 1 else 'y'} to detection runs "
                             f"and {what}; it predicts top labels: leave {'it' if len(given) == 1 else 'them'} "
                             "out (k / --k sets how many labels)")  # fmt: skip
        backbone = ckpt.recorded_backbone(run_dir, model)
        return predict_images(ckpt.load_prompt(run_dir, backbone, classnames), images, 5 if k is None else k)
    if task != "detection":
        raise ValueError(f"{what}; score it with `vlprompt eval {run_dir} --dataset "
                         f"{task_class(task).dataset_forms}`.")  # fmt: skip
    if k is not None:
        raise ValueError(f"k (--k) applies to classification runs and {what}; it predicts boxes: leave --k out "
                         "(threshold / --threshold and max_boxes / --max-boxes choose the boxes kept)")
    threshold = _check_box_options(threshold, max_boxes)
    paths = image_paths(images)
    targets = prediction_png_paths(paths, output, overwrite) if output is not None else None
    for path in paths:  # a corrupt image is named before the model loads and before any PNG is written
        open_image(path, fix="pass an image file that opens (PNG, JPEG, ...)")
    backbone = ckpt.recorded_backbone(run_dir, model)
    method = ckpt.load_prompt(run_dir, backbone, classnames)
    results = []
    for i, (image, result) in enumerate(_detect_each(method, paths, threshold, max_boxes)):
        if targets is not None:
            write_png(draw_detections(image, result["detections"]), targets[i])
            result["output"] = str(targets[i])
        results.append(result)
    return results


def image_paths(images: list[str | Path]) -> list[Path]:
    """``images`` as absolute paths, refusing a missing file or a folder (naming it)."""
    if isinstance(images, (str, Path)):
        images = [images]
    if not images:
        raise ValueError("no images given; pass one or more image files")
    paths = [Path(p).expanduser().resolve() for p in images]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"image {path} does not exist")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; pass image files (e.g. {path}/*.png)")
    return paths


def _check_box_options(threshold: float | None, max_boxes: int | None) -> float:
    """The score threshold to use (the default when None), refusing values outside their ranges."""
    if threshold is None:
        threshold = DEFAULT_SCORE_THRESHOLD
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold (--threshold) must be a number from 0 to 1 (got {threshold!r}): a box is kept "
                         f"when its category score (0..1) is at least that; default {DEFAULT_SCORE_THRESHOLD}")
    if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1):
        raise ValueError(f"max_boxes (--max-boxes) must be an integer >= 1: the most boxes kept per image, best "
                         f"first (got {max_boxes!r})")  # fmt: skip
    return float(threshold)


def prediction_png_paths(images: list[Path], output: str | Path, overwrite: bool = False) -> list[Path]:
    """Where the drawn images go: ``<output>/<image stem>.png`` (``<stem>_2.png``, ... for repeated names), checked
    before anything runs: never an input image, an existing file only with ``overwrite``."""
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} is a file; pass a folder for the drawn images (--output DIR)")
    inputs = {path.resolve() for path in images}
    taken: set[str] = set()
    targets = []
    for path in images:
        name, n = f"{path.stem}.png", 1
        while name in taken:
            n += 1
            name = f"{path.stem}_{n}.png"
        taken.add(name)
        target = folder / name
        if target.resolve() in inputs:
            raise ValueError(f"{target} is an input image and would be overwritten; write the drawn images to "
                             "another folder (--output DIR)")  # fmt: skip
        if target.is_dir():
            raise ValueError(f"{target} is a folder; pass another --output for the drawn images")
        if target.exists() and not overwrite:
            raise ValueError(f"{target} exists (an earlier prediction?); pass --overwrite to replace it, or another "
                             "--output")  # fmt: skip
        targets.append(target)
    return targets


def write_png(image, path: Path) -> None:
    """Save ``image`` as a PNG atomically (a temporary file beside it, then a rename), with the user's file mode."""
    import os

    from vlprompt.fileio import temp_file_beside

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path, ".png")
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise ValueError(f"cannot write {err.filename or path}: {err.strerror or err}; choose a writable folder "
                         "(--output DIR)") from None  # fmt: skip


@torch.no_grad()
def predict_detections(method, images: list[str | Path], threshold: float = DEFAULT_SCORE_THRESHOLD,
                       max_boxes: int | None = None) -> list[dict[str, Any]]:
    """The boxes a detection prompt model finds in image files: per image ``{"image", "width", "height",
    "detections", "best"}``; ``detections`` are ``{"label", "category_index", "score", "box"}``, best first, one per
    detector query (its highest-scoring category) with a score of at least ``threshold``, at most ``max_boxes``;
    ``box`` is ``[x0, y0, x1, y1]`` in the image's pixels (as a viewer shows it: EXIF orientation applied).
    ``best`` is the top detection whatever its score (None without queries), to see what a threshold left out."""
    threshold = _check_box_options(threshold, max_boxes)
    return [result for _, result in _detect_each(method, image_paths(images), threshold, max_boxes)]


def _detect_each(method, paths: list[Path], threshold: float, max_boxes: int | None):
    """``(image, result)`` per path (see :func:`predict_detections`)."""
    from vlprompt.data.coco import detection_pixels
    from vlprompt.tasks.detection import detections_in_image

    if method.task != "detection":
        raise ValueError(f"{method.registered_name} is {_a(method.task)} method; predict_detections finds boxes of "
                         "detection methods (predict_images scores classification)")  # fmt: skip
    was_training = method.training
    method.eval()
    device = method.backbone.device
    try:
        for path in paths:
            image = open_image(path)  # upright as viewers show it; the boxes are in these pixels
            pixels = detection_pixels(image, method.backbone.image_config).unsqueeze(0).to(device)
            mask = torch.ones(1, *pixels.shape[-2:], dtype=torch.long, device=device)
            with torch.no_grad():
                scores, boxes = method.predict(pixels, mask)
            scores, boxes = scores[0].float().cpu(), boxes[0].float().cpu()
            args = (scores, boxes, method.classnames, image.width, image.height)
            best = detections_in_image(*args, threshold=0.0, max_boxes=1)
            result = {"image": str(path), "width": image.width, "height": image.height,
                      "detections": detections_in_image(*args, threshold=threshold, max_boxes=max_boxes),
                      "best": best[0] if best else None}  # fmt: skip
            yield image, result
    finally:
        method.train(was_training)


@torch.no_grad()
def predict_images(method, images: list[str | Path], k: int = 5) -> list[dict[str, Any]]:
    """Top-k labels and probabilities (softmax for CLIP, per-class sigmoid for SigLIP) of a classification prompt
    model for image files."""
    from vlprompt.data import Sample

    if method.task != "classification":
        raise ValueError(f"{method.registered_name} is {_a(method.task)} method; predict_images scores classification "
                         "(predict_detections finds the boxes of detection methods)")  # fmt: skip
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
