"""The ``vlprompt`` command line: demo, train, eval, predict, bench, pretrain-toy, pretrain-toy-vilt,
pretrain-toy-detector, params, methods.

Options come from flags or a YAML file (``--config``); ``--set key=value`` overrides either (dotted keys, YAML
values), e.g. ``--set train.lr=0.01 --set method_options.n_ctx=4``. Precedence: defaults < YAML < flags < --set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from vlprompt.options import OptionError, check_keys, yaml_problem

EPILOG = """examples:
  vlprompt demo                                   # the main job on the embedded default (no download)
  vlprompt methods --model random:vit-b-16        # which method runs on which backbone, trainable parameters
  vlprompt params --model openai/clip-vit-base-patch16 --methods coop vpt_deep
  vlprompt train --model ./clip-vit-b16 --method coop --dataset eurosat --data-root DATA --shots 16 \\
                 --seed 1 --output runs/coop-eurosat-16s1
  vlprompt eval runs/coop-eurosat-16s1 --dataset oxford_pets --data-root DATA     # cross-dataset
  vlprompt predict runs/coop-eurosat-16s1 img1.jpg img2.png --k 3
  vlprompt predict runs/sdpt-det img1.jpg --threshold 0.4   # a detection run: boxes drawn in runs/sdpt-det/predictions
models: embedded (the shipped toy CLIP, no download; the default of train, bench and demo), a local folder
written by save_pretrained, a Hugging Face hub id, or random:<preset> (a real architecture with random weights:
tiny, vit-b-16, vit-b-32, grounding-dino-micro, ...; for tests, parameter counts and benchmarks)."""


# vlprompt.tasks.detection.DEFAULT_SCORE_THRESHOLD (a test checks they agree), named here so that building the
# parser imports no torch; where `predict` writes a detection run's drawn images by default (under the run folder)
DEFAULT_THRESHOLD = 0.3
PREDICTIONS_DIR = "predictions"
# vlprompt.protocols.runner.PROTOCOLS, named here so that building the parser imports no torch
PROTOCOL_CHOICES = ("fewshot", "base2novel", "crossdataset", "domain", "full")
RECIPE_HELP = ("training recipe: auto (the default: the model's own, e.g. toy for the embedded model, else field), "
               "field (the papers' settings for CLIP ViT-B/16), toy, or a recipe file (.json/.yaml); options you "
               "set win over it")


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def shots_value(text: str) -> int | str:
    """argparse type of a bench shot count: an integer, or ``all`` (the whole training split)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'all'") from None


class CLIError(Exception):
    """A user error the CLI reports in one line, without a traceback."""


# ------------------------------------------------------------------------------------------- config plumbing
class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; ML configs write learning rates that way, so read it as YAML 1.2
    and Python do: a float."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def parse_set(assignments: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise CLIError(f"--set expects key=value, got {item!r} (e.g. --set train.lr=0.01)")
        key, raw = item.split("=", 1)
        try:
            value = read_yaml(raw)
        except yaml.YAMLError as err:
            raise CLIError(f"--set {item!r}: value is not valid YAML ({yaml_problem(err)})") from None
        _assign(out, key.strip(), value)
    return out


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if keys[0] == "method" and len(keys) > 1:  # --set method.n_ctx=4 is shorthand for method_options.n_ctx
        keys = ["method_options"] + keys[1:]
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise CLIError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.exists():
        raise CLIError(f"config file {path} does not exist")
    if file.is_dir():
        raise CLIError(f"config file {path} is a folder; pass a YAML file (e.g. configs/coop_fewshot.yaml)")
    try:
        data = read_yaml(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise CLIError(f"config file {path} is not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping (model:, method:, data:, train:, ...)")
    return data


def build_run_options(tree: dict[str, Any]):
    """RunOptions of a config tree; ``train`` stays the mapping the user gave (the recipe fills in the rest)."""
    from vlprompt.engine.api import DataOptions, RunOptions

    known = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(tree) - known)
    if unknown:
        raise CLIError(f"unknown config key(s) {unknown}; top-level keys are {sorted(known)}")
    values = dict(tree)
    check_sections(values, "the config")
    try:
        check_keys(values.get("data", {}), DataOptions, "data option")
    except OptionError as err:
        raise CLIError(err.problems[0]) from None
    values["data"] = DataOptions(**values.get("data", {}))
    values["train"] = dict(values.get("train") or {})
    values["method_options"] = values.get("method_options") or {}
    return RunOptions(**values)


def _flag_tree(args: argparse.Namespace) -> dict[str, Any]:
    """The options given as flags (only those actually passed), as a config tree."""
    tree: dict[str, Any] = {}
    mapping = {
        "model": "model",
        "method": "method",
        "output": "output",
        "dataset": "data.dataset",
        "data_root": "data.root",
        "shots": "data.shots",
        "seed": "data.seed",
        "subsample": "data.subsample",
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "optimizer": "train.optimizer",
        "precision": "train.precision",
        "recipe": "recipe",
    }
    for attr, dotted in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            _assign(tree, dotted, value)
    if getattr(args, "seed", None) is not None:
        _assign(tree, "train.seed", args.seed)  # one seed drives both sampling and training, as in the papers
    if getattr(args, "no_augment", False):
        _assign(tree, "train.augment", False)
    return tree


# Sections of a run config that hold options, and the top-level keys that name one thing (a text).
RUN_SECTIONS = ("data", "train", "method_options")
RUN_NAMES = ("model", "method", "output", "recipe")


def check_sections(tree: dict[str, Any], where: str) -> None:
    """Refuse a section that is not a mapping, or a name that is not a text, before anything is merged into it (a
    flag would otherwise replace it silently)."""
    for part in RUN_SECTIONS:
        if part in tree and not isinstance(tree[part] or {}, dict):
            raise CLIError(f"{part}: in {where} must be a mapping of options (got {tree[part]!r}), e.g. "
                           f"{part}: {{{'dataset: toy:shapes' if part == 'data' else 'key: value'}}}")  # fmt: skip
    for name in RUN_NAMES:
        if name in tree and not isinstance(tree[name], str):
            raise CLIError(f"{name}: in {where} must be one name or path (got {tree[name]!r})")


def resolved_tree(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "config", None):
        tree = load_yaml(args.config)
        check_sections(tree, f"config file {args.config}")
    else:
        tree = {}
    overrides = parse_set(getattr(args, "set", None) or [])
    check_sections(overrides, "--set")
    return deep_merge(deep_merge(tree, _flag_tree(args)), overrides)


# ------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from vlprompt.data import DatasetError
    from vlprompt.engine.api import resolve_recipe, train
    from vlprompt.engine.distributed import launched_rank, launched_world_size
    from vlprompt.engine.trainer import EvaluationDataError

    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --output and --overwrite replaces it: pass one of them")
    options, recipe_line = resolve_recipe(build_run_options(resolved_tree(args)))
    speak = launched_rank() == 0  # a job of several processes (torchrun, accelerate launch) reports once
    processes = launched_world_size()
    if speak:
        print(f"training {options.method} on {options.data.dataset} with {options.model} -> {options.output}"
              + (f" ({processes} processes, global batch {options.train.batch_size})" if processes > 1 else ""))
        print(recipe_line)
    try:
        result = train(options, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except EvaluationDataError as err:
        raise DatasetError(f"{err} The trained epochs are kept in {err.run_dir}: once the data is fixed, rerun with "
                           f"--resume{' (without --overwrite)' if args.overwrite else ''} to evaluate them.") from err
    if speak:
        print(json.dumps({"output": options.output, **result}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vlprompt.engine.api import DataOptions, evaluate_checkpoint

    tree = resolved_tree(args)
    # A training config may be reused as it is: eval reads its data: and model: (and train.precision) and leaves the
    # rest; options typed for this command that eval cannot use are refused rather than ignored.
    unknown = sorted(set(tree) - {*RUN_SECTIONS, *RUN_NAMES})
    if unknown:
        raise CLIError(f"unknown config key(s) {unknown} for eval; it reads data:, model: and train.precision")
    typed = parse_set(args.set or [])
    unused = sorted({f"{k}.*" if isinstance(v, dict) else k for k, v in typed.items() if k not in ("data", "model", "train")}
                    | {f"train.{k}" for k in typed.get("train", {}) if k != "precision"}
                    | {f"data.{k}" for k in typed.get("data", {}) if k in ("shots", "seed")})  # fmt: skip
    if unused:
        raise CLIError(f"eval does not use --set {', '.join(unused)}: the prompt in {args.run_dir} keeps the method "
                       "and training it was trained with, and eval scores whole splits (no few-shot sampling)")
    data_values = {k: v for k, v in tree.get("data", {}).items() if k not in ("shots", "seed")}  # of a train config
    if "dataset" not in data_values:  # the run's own dataset (and its data root, unless one is given)
        recorded = _recorded_data(Path(args.run_dir))
        data_values = {**{k: recorded[k] for k in ("dataset", "root") if recorded.get(k) is not None}, **data_values}
    try:
        check_keys(data_values, DataOptions, "data option")
    except OptionError as err:
        raise CLIError(err.problems[0]) from None
    data = DataOptions(**data_values)
    result = evaluate_checkpoint(  # --model / --precision, else the config's model: and train.precision
        args.run_dir, data, split=args.split, model=tree.get("model"), batch_size=args.batch_size,
        precision=tree.get("train", {}).get("precision") or "fp32",
    )
    from vlprompt.engine.distributed import launched_rank

    if launched_rank() == 0:  # an evaluation started with several processes (sharded) reports once
        print(json.dumps({"run": str(args.run_dir), **result}))
    return 0


def _recorded_data(run_dir: Path) -> dict[str, Any]:
    run_config = run_dir / "run_config.json"
    if not run_dir.is_dir():
        raise CLIError(f"run folder {run_dir} does not exist; pass a folder written by `vlprompt train`")
    if not run_config.is_file():
        what = "prompt_config.json" if (run_dir / "prompt_config.json").is_file() else "no run files"
        raise CLIError(f"{run_dir} is not a run folder of `vlprompt train` (it has {what} but no run_config.json); "
                       "pass a run folder, or --dataset to evaluate a saved prompt folder")  # fmt: skip
    return json.loads(run_config.read_text()).get("data", {})


def cmd_predict(args: argparse.Namespace) -> int:
    from vlprompt.engine.api import predict
    from vlprompt.engine.checkpoint import read_prompt_config

    if not Path(args.run_dir).is_dir():
        raise CLIError(f"run folder {args.run_dir} does not exist; pass a folder written by `vlprompt train`")
    if read_prompt_config(args.run_dir).get("task", "classification") != "detection":
        # detection-only flags given here are refused by predict, naming them
        items = predict(args.run_dir, args.images, k=args.k, model=args.model, threshold=args.threshold,
                        max_boxes=args.max_boxes, output=args.output, overwrite=args.overwrite or None)  # fmt: skip
        for item in items:
            tops = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in item["top"])
            print(f"{item['image']}: {tops}")
        return 0
    output = Path(args.output) if args.output else Path(args.run_dir) / PREDICTIONS_DIR
    items = predict(args.run_dir, args.images, k=args.k, model=args.model, threshold=args.threshold,
                    max_boxes=args.max_boxes, output=output, overwrite=args.overwrite)  # fmt: skip
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    for item in items:
        for det in item["detections"]:
            box = ", ".join(f"{v:.1f}" for v in det["box"])
            print(f"{item['image']}: {det['label']} {det['score']:.3f} box [{box}]")
        if item["detections"]:
            drawn = f"{len(item['detections'])} box{'es' if len(item['detections']) != 1 else ''} drawn"
        else:
            best = item["best"]
            below = f" (the best: {best['label']} {best['score']:.3f}; a lower --threshold keeps it)" if best else ""
            drawn = f"no box scores {threshold} or more{below}; copied unchanged"
        print(f"{item['image']}: {drawn} in {item['output']}")
    return 0


def _import_classes(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The class names (and the dataset's template) an imported prompt scores: exactly one of --dataset,
    --classnames, --classnames-file."""
    given = [flag for flag, value in (("--dataset", args.dataset), ("--classnames", args.classnames),
                                      ("--classnames-file", args.classnames_file)) if value]  # fmt: skip
    if len(given) != 1:
        raise CLIError("name the classes the prompt scores with exactly one of --dataset NAME, --classnames a,b,c or "
                       "--classnames-file FILE (one name per line), in the order it was trained with"
                       + (f"; got {' and '.join(given)}" if given else ""))  # fmt: skip
    if args.dataset:
        from vlprompt.engine.api import DataOptions, load_splits

        splits = load_splits(DataOptions(dataset=args.dataset, root=args.data_root))
        return list(splits.classnames), splits.template
    if args.classnames:
        names = [name.strip() for name in args.classnames.split(",")]
    else:
        path = Path(args.classnames_file)
        if not path.is_file():
            raise CLIError(f"--classnames-file {path} does not exist")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names or not all(names):
        raise CLIError("the class names must be non-empty (a comma-separated list, or one per line in the file)")
    return names, None


def cmd_import(args: argparse.Namespace) -> int:
    from vlprompt.backbones import load_backbone
    from vlprompt.engine.checkpoint import CONFIG_FILE, atomic_write_json
    from vlprompt.interop import from_reference

    import shutil

    from vlprompt.engine.checkpoint import METRICS_FILE, PROMPT_FILE, RESUME_DIR, RUN_CONFIG_FILE
    from vlprompt.fileio import FolderBusyError, exclusive_folder

    typed = parse_set(args.set or [])
    if set(typed) - {"method_options"}:
        raise CLIError(f"import reads method options only (--set method.<option>=VALUE), not "
                       f"{sorted(set(typed) - {'method_options'})}")  # fmt: skip
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} is a file; pass a folder")
    # A finished or started training run (or an earlier import) is never mixed with an imported prompt.
    held = [name for name in (CONFIG_FILE, PROMPT_FILE, RUN_CONFIG_FILE, METRICS_FILE, RESUME_DIR)
            if (output / name).exists()]  # fmt: skip
    if held and not args.overwrite:
        raise CLIError(f"{output} already holds a prompt or a run ({', '.join(held)}); pass --overwrite to replace "
                       "it, or another --output")  # fmt: skip
    classnames, template = _import_classes(args)
    backbone = load_backbone(args.model)
    method, report = from_reference(args.checkpoint, args.repository, backbone, classnames,
                                    args.template or template, typed.get("method_options", {}))  # fmt: skip
    try:
        with exclusive_folder(output):
            for name in held:  # --overwrite: the previous prompt or run goes, as `train --overwrite` does
                target = output / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            method.save_pretrained(output)
            atomic_write_json(output / "import_report.json", {"checkpoint": str(Path(args.checkpoint).resolve()),
                                                              **report.to_dict()})  # fmt: skip
    except FolderBusyError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"cannot write {err.filename or output}: {err.strerror or err}; choose a writable "
                       "--output") from None
    print(report.summary())
    print(f"wrote {output} (and import_report.json): evaluate it with `vlprompt eval {output} --dataset ...`")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import vlprompt
    from vlprompt.interop import save_reference

    from vlprompt.interop.layouts import LAYOUTS

    output = Path(args.output)
    files = LAYOUTS[args.repository].files
    if files:  # a trainer saving several models: --output is its output folder, one subfolder per model
        if output.exists() and not output.is_dir():
            raise CLIError(f"--output {output} is a file; {args.repository} checkpoints are a folder holding "
                           f"{', '.join(files)}")  # fmt: skip
        taken = [str(output / name / f"model.pth.tar-{args.epoch}") for name in files
                 if (output / name / f"model.pth.tar-{args.epoch}").exists()]  # fmt: skip
        if taken and not args.overwrite:
            raise CLIError(f"{taken[0]} exists; pass --overwrite to replace it")
    elif output.is_dir():
        raise CLIError(f"--output {output} is a folder; pass the file to write, e.g. {output}/model.pth.tar-5")
    elif output.exists() and not args.overwrite:
        raise CLIError(f"{output} exists; pass --overwrite to replace it")
    method = vlprompt.PromptMethod.from_pretrained(args.run_dir, backbone=_export_backbone(args))
    try:
        save_reference(method, args.repository, output, epoch=args.epoch)
    except OSError as err:
        raise CLIError(f"cannot write {err.filename or output}: {err.strerror or err}; choose a writable "
                       "--output") from None
    print(f"wrote {output}: a {args.repository} checkpoint of the {method.registered_name} prompt in {args.run_dir} "
          f"({len(method.classnames)} classes)")
    for note in LAYOUTS[args.repository].export_notes(method):
        print(f"  note: {note}")
    return 0


def _export_backbone(args: argparse.Namespace):
    from vlprompt.engine.checkpoint import recorded_backbone

    return recorded_backbone(args.run_dir, args.model)


def _method_rows(backbone, names: Sequence[str], num_classes: int, overrides: dict[str, Any], shots: int = 16):
    from vlprompt.backbones import UnsupportedBackboneError
    from vlprompt.methods import METHODS, get_prompt_model, make_config
    from vlprompt.methods.registry import unsupported_reason
    from vlprompt.tasks.batches import FIXED_TASK_LABELS

    classnames = [f"class {i}" for i in range(num_classes)]
    total = backbone.num_parameters()
    for name in names:
        spec = METHODS[name]
        why_not = unsupported_reason(spec.method_class, type(backbone))
        if why_not:
            yield name, None, f"unsupported: {why_not}"
            continue
        try:
            config = make_config(name, overrides.get(name, {}), backbone)
            # a head with fixed outputs (NLVR2, retrieval: --set method.task=...) is built with its task's labels
            labels = FIXED_TASK_LABELS.get(config.to_dict().get("task"), classnames)
            method = get_prompt_model(backbone, name, list(labels), config=config)
        except UnsupportedBackboneError as err:
            yield name, None, str(err)
            continue
        count = method.num_trainable()
        fitted = method.trainable_once_fitted(shots * num_classes)
        if backbone.has_lora():  # the next method is counted on the backbone as loaded
            backbone.remove_lora()
        if fitted is not None:  # sized by the training set: counted for --shots x --num-classes images
            yield name, fitted, f"{100.0 * fitted / total:.4f}%  (fitted on {shots} shots x {num_classes} classes)"
            continue
        yield name, count, f"{100.0 * count / total:.4f}%"


def cmd_params(args: argparse.Namespace) -> int:
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import METHODS, canonical_method_name

    names = [canonical_method_name(n) for n in (args.methods or list(METHODS))]
    typed = parse_set(args.set or [])
    if set(typed) - {"method_options"}:
        raise CLIError(f"params reads method options only (--set method.<option>=VALUE), not "
                       f"{sorted(set(typed) - {'method_options'})}")  # fmt: skip
    overrides = typed.get("method_options", {})
    if overrides and not args.methods:
        raise CLIError("--set method.* needs --methods: each method has its own options (e.g. --methods coop cocoop "
                       "--set method.n_ctx=4)")  # fmt: skip
    per_method = {n: overrides for n in names}
    backbone = load_backbone(args.model)
    total = backbone.num_parameters()
    print(f"backbone {args.model}: {total:,} parameters; {args.num_classes} classes")
    print(f"{'method':<22} {'trainable':>12} {'% of backbone':>14}")
    for name, count, share in _method_rows(backbone, names, args.num_classes, per_method, args.shots):
        print(f"{name:<22} {'None' if count is None else format(count, ','):>12} {share:>14}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from vlprompt.backbones import BACKBONES, load_backbone
    from vlprompt.methods import METHODS
    from vlprompt.methods.registry import unsupported_reason

    families = sorted(BACKBONES)
    print("method x backbone (yes = the family's adapter offers every site the method needs)")
    print(f"{'method':<22} " + " ".join(f"{f:>17}" for f in families) + "  summary")
    refused: dict[tuple[str, str], str] = {}
    for name, spec in METHODS.items():
        cells = []
        for family in families:
            why_not = unsupported_reason(spec.method_class, BACKBONES[family])
            cells.append("no" if why_not else "yes")
            same_kind = spec.method_class.backbone_kind == BACKBONES[family].info.kind
            if why_not and same_kind:  # a method of this kind of model that this family cannot carry: say why
                refused[(name, family)] = why_not
        print(f"{name:<22} " + " ".join(f"{c:>17}" for c in cells) + f"  {spec.summary}")
    for (name, family), why_not in refused.items():
        print(f"  {name} on {family}: {why_not}")
    print()
    backbone = load_backbone(args.model)
    total = backbone.num_parameters()
    print(f"trainable parameters on {args.model} ({total:,} parameters, {args.num_classes} classes):")
    for name, count, share in _method_rows(backbone, list(METHODS), args.num_classes, {}):
        print(f"  {name:<22} {'None' if count is None else format(count, ','):>12} {share:>12}")
    return 0


def _recorded_bench_settings(args: argparse.Namespace, tree: dict[str, Any]) -> dict[str, Any]:
    """What the bench in --output ran with (its bench_config*.json): ``--report-only`` needs nothing else."""
    from vlprompt.protocols.runner import bench_precisions, precision_suffix

    output = Path(args.output or tree.get("output") or "bench")
    precision = args.precision or tree.get("precision") or "fp32"
    path = output / f"bench_config{precision_suffix(precision)}.json"
    held = bench_precisions(output)
    if not path.is_file() and held:  # a bench of other precisions: say which, not that there is none
        listed = ", ".join(f"{p} ({name})" for p, name in held.items())
        raise CLIError(f"--report-only: {output} holds no {precision} bench ({path.name}) but {listed}: drop "
                       "--precision or change it to one of those")  # fmt: skip
    if not path.is_file():
        raise CLIError(f"--report-only: {path} does not exist, so {output} holds no bench; pass the folder a bench "
                       "wrote as --output.")  # fmt: skip
    stored = json.loads(path.read_text())
    keys = ("methods", "datasets", "protocols", "shots", "seeds", "precision", "model", "recipe")
    return {k: stored[k] for k in keys if k in stored}


def bench_config_from(args: argparse.Namespace):
    from vlprompt.protocols.runner import BenchConfig, Recipe

    tree = load_yaml(args.config) if args.config else {}
    flags = {
        "methods": args.methods, "datasets": args.datasets, "protocols": args.protocols, "shots": args.shots,
        "seeds": args.seeds, "model": args.model, "data_root": args.data_root, "output": args.output,
        "precision": args.precision, "workers": args.workers, "recipe": args.recipe,
    }
    tree = deep_merge(tree, {k: v for k, v in flags.items() if v is not None})
    tree = deep_merge(tree, parse_set(args.set or []))
    output = Path(str(tree.get("output") or "bench"))
    if output.exists() and not output.is_dir():  # else a FileExistsError traceback when the bench writes into it
        raise CLIError(f"--output {output} is a file, not a folder: give a folder for the bench")
    if getattr(args, "report_only", False):  # the folder's own settings; flags, --config and --set still win
        tree = deep_merge(_recorded_bench_settings(args, tree), tree)
    if isinstance(tree.get("recipes"), str):  # `recipes: toy` of earlier configs names the whole recipe
        tree.setdefault("recipe", tree.pop("recipes"))
    if not isinstance(tree.get("recipes") or {}, dict):
        raise CLIError(f"recipes: must map method names to recipes (got {tree['recipes']!r}); name a whole recipe "
                       "with recipe: / --recipe")  # fmt: skip
    try:
        tree["recipes"] = {k: Recipe(**v) for k, v in (tree.get("recipes") or {}).items()}
    except (TypeError, ValueError) as err:
        raise CLIError(f"bad recipe in the bench config: {err}") from err
    known = sorted(f.name for f in dataclasses.fields(BenchConfig) if f.init)
    unknown = sorted(set(tree) - set(known))
    if unknown:  # else "BenchConfig.__init__() got an unexpected keyword argument"
        raise CLIError(f"unknown bench key(s) {unknown}; the keys are: {', '.join(known)}; engine options for every "
                       "run go under default_train (e.g. --set default_train.epochs=1)")
    missing = [k for k in ("methods", "datasets") if not tree.get(k)]
    if missing:
        raise CLIError(f"bench needs {missing}: pass --methods/--datasets or a --config YAML with them")
    try:
        return BenchConfig(**tree)
    except (TypeError, ValueError) as err:
        raise CLIError(f"bad bench config: {err}") from err


def _recorded_command(config) -> str | None:
    """The command that produced an existing report, so that --report-only keeps naming it."""
    from vlprompt.protocols.runner import precision_suffix

    report = Path(config.output) / f"results{precision_suffix(config.precision)}.md"
    if report.is_file():
        for line in report.read_text().splitlines():
            if line.startswith("Command: `") and line.endswith("`"):
                return line[len("Command: `"):-1]
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    from vlprompt.protocols.report import rows_of_methods, write_report
    from vlprompt.protocols.runner import finished_rows, read_csv, results_csv_path, run_bench

    config = bench_config_from(args)
    rows = finished_rows(config) if args.report_only else run_bench(config)
    # methods named here (not taken from the folder's bench_config): the report shows those, not every method the
    # folder's table holds
    asked = args.report_only and (args.methods or (load_yaml(args.config) if args.config else {}).get("methods")
                                  or parse_set(args.set or []).get("methods"))
    if asked:
        rows, unfinished = rows_of_methods(rows, config.methods)
        where = f"{results_csv_path(config).name} in {config.output}"
        if not rows:
            raise CLIError(f"{where} has no finished run of {', '.join(unfinished)}: run the bench with them first")
        if unfinished:
            print(f"--report-only: {where} has no finished run of {', '.join(unfinished)}; the report leaves "
                  "them out")
    command = args.command_line or (_recorded_command(config) if args.report_only else None) \
        or "vlprompt " + " ".join(args.argv)
    reference = None  # another precision than fp32: compare with the fp32 results of the same folder, if any
    fp32_csv = Path(config.output) / "results.csv"
    if config.precision != "fp32" and fp32_csv.exists():
        reference = read_csv(fp32_csv)
    from vlprompt.protocols.runner import writes_files

    if writes_files():  # the main process of a bench started with several processes
        path = write_report(rows, config.output, config.methods, command=command, precision=config.precision,
                            reference_rows=reference)
        print(path.read_text())
    return 0


def _pretraining_config(args: argparse.Namespace, config_class, what: str):
    """The pretraining config of ``--set KEY=VALUE`` options, refusing an unknown key, a bad value or an --output
    that is a file."""
    values = parse_set(args.set or [])
    try:
        check_keys(values, config_class, what)
    except OptionError as err:
        raise CLIError(err.problems[0]) from None
    try:
        config = config_class(**values)
    except (TypeError, ValueError) as err:
        raise CLIError(f"bad {what}: {err}") from err
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise CLIError(f"--output {args.output} is a file; give a folder for the model")
    return config


def cmd_pretrain_toy(args: argparse.Namespace) -> int:
    from vlprompt.pretraining.clip_pretrain import PretrainConfig, pretrain

    pretrain(_pretraining_config(args, PretrainConfig, "pretraining option"), args.output, args.cache_dir)
    return 0


def cmd_pretrain_toy_vilt(args: argparse.Namespace) -> int:
    from vlprompt.pretraining.vilt_pretrain import ViltPretrainConfig, pretrain_vilt

    pretrain_vilt(_pretraining_config(args, ViltPretrainConfig, "ViLT pretraining option"), args.output, args.cache_dir)
    return 0


def cmd_pretrain_toy_detector(args: argparse.Namespace) -> int:
    from vlprompt.pretraining.gdino_pretrain import DetectorPretrainConfig, pretrain_detector

    config = _pretraining_config(args, DetectorPretrainConfig, "detector pretraining option")
    pretrain_detector(config, args.output, args.cache_dir)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlprompt.demo import run_demo

    run_demo(Path(args.output), quick=args.quick)
    return 0


# ------------------------------------------------------------------------------------------- parser
def _add_common_run_flags(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    p.add_argument("--config", help="YAML file with model/method/method_options/data/train/output keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any option, e.g. train.lr=0.01")
    if with_method:
        p.add_argument("--model", help="model folder, hub id, embedded (the shipped toy CLIP; the default) or "
                                       "random:<preset>")
        p.add_argument("--method", help="method name (see `vlprompt methods`)")
        p.add_argument("--dataset", help="dataset: eurosat, imagenet, ... (with --data-root), toy:<name> (the "
                                         "default: toy:shapes), imagefolder:<path>, coco:<path> or toydet:<name>; "
                                         "for fusion encoders (ViLT) vqa:<path>, nlvr2:<path> or retrieval:<path>")
    else:
        p.add_argument("--model", help="backbone to evaluate on (default: the one recorded in the run folder)")
        p.add_argument("--dataset", help="dataset to evaluate on (default: the run's own training dataset)")
    p.add_argument("--data-root", help="folder holding the datasets in the CoOp layout (toy:<name> datasets: default ~/.cache/vlprompt/toyworld)")
    if with_method:  # eval scores whole splits: no few-shot sampling, no training seed
        p.add_argument("--shots", type=int, help="images per class for training (few-shot; not for nlvr2: or "
                                                 "retrieval:, which have no classes); default: all")
        p.add_argument("--seed", type=int, help="seed for few-shot sampling and training (default 1)")
    p.add_argument("--subsample", choices=["all", "base", "novel"], help="base-to-novel class subset")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="numeric precision (default fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlprompt",
        description="Parameter-efficient prompt tuning of vision-language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(subcommands=sub.choices)  # for errors in a subcommand's own name (see parse_command_line)

    p = sub.add_parser("train", help="train a prompt and write a run folder", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_run_flags(p)
    p.add_argument("--output", help="run folder to write (default runs/default)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip (lets text-only methods cache images)")
    p.add_argument("--recipe", help=RECIPE_HELP)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved prompt on any dataset and split")
    p.add_argument("run_dir", help="run folder written by `vlprompt train`")
    _add_common_run_flags(p, with_method=False)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k labels (classification runs) or boxes drawn on the images (detection "
                                       "runs) for image files",
                       description="Predict with a trained prompt. A classification run prints the top-k labels of "
                                   "each image. A detection run prints one line per box (image, category phrase, "
                                   "score, box [x0, y0, x1, y1] in the image's pixels) and writes each image with its "
                                   "boxes drawn and labelled as a PNG, by default "
                                   f"<run_dir>/{PREDICTIONS_DIR}/<image name>.png.")
    p.add_argument("run_dir", help="run folder written by `vlprompt train`")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--k", type=positive_int, help="classification runs: top labels to show per image (default 5)")
    p.add_argument("--threshold", type=float,
                   help=f"detection runs: keep boxes whose category score (0..1) is at least this (default "
                        f"{DEFAULT_THRESHOLD}; 0 keeps every query's box)")
    p.add_argument("--max-boxes", type=positive_int, help="detection runs: keep at most this many boxes per image, "
                                                          "best first (default: every box above --threshold)")
    p.add_argument("--output", help=f"detection runs: folder for the drawn PNGs (default "
                                    f"<run_dir>/{PREDICTIONS_DIR}); an input image is never overwritten")
    p.add_argument("--overwrite", action="store_true", help="detection runs: replace PNGs an earlier predict wrote "
                                                            "under the same names")
    p.add_argument("--model", help="override the backbone recorded in the run folder")
    p.set_defaults(func=cmd_predict)

    from vlprompt.interop.layouts import LAYOUTS

    p = sub.add_parser("import", help="read a checkpoint of the research code (CoOp, CoCoOp, MaPLe, IVLP, VPT, UPT, DPT) as a "
                                      "vlprompt prompt")  # fmt: skip
    p.add_argument("--from", dest="repository", required=True, choices=sorted(LAYOUTS),
                   help="the repository trainer that saved the checkpoint")
    p.add_argument("checkpoint", help="the checkpoint file, e.g. output/.../prompt_learner/model.pth.tar-50 (dpt, "
                                      "dpt_vpt: the trainer's output folder, or one of its files)")
    p.add_argument("--model", required=True, help="the CLIP it was trained on (folder, hub id or random:<preset>)")
    p.add_argument("--dataset", help="take the class names (and template) of this dataset")
    p.add_argument("--data-root", default=None)
    p.add_argument("--classnames", help="comma-separated class names, in the trained order")
    p.add_argument("--classnames-file", help="a file with one class name per line, in the trained order")
    p.add_argument("--template", help="the class template, where the method uses one (default: the dataset's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method options the checkpoint does not record, e.g. --set method.class_position=middle")
    p.add_argument("--output", required=True, help="the folder to write the prompt into")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a vlprompt prompt as a checkpoint of the research code")
    p.add_argument("run_dir", help="a run folder or saved prompt")
    p.add_argument("--to", dest="repository", required=True, choices=sorted(LAYOUTS))
    p.add_argument("--output", required=True, help="the checkpoint file to write, e.g. model.pth.tar-5 (dpt, dpt_vpt: "
                                                   "the output folder, one subfolder per saved model)")
    p.add_argument("--epoch", type=int, default=0, help="the epoch recorded in the checkpoint")
    p.add_argument("--model", help="override the backbone recorded in the run folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("params", help="trainable parameters of each method on a model")
    p.add_argument("--model", default="random:vit-b-16")
    p.add_argument("--methods", nargs="*", help="default: all registered methods")
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--shots", type=positive_int, default=16,
                   help="training images per class, for methods whose count depends on them (Tip-Adapter-F)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method options for every method listed, e.g. --methods coop --set method.n_ctx=4")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("methods", help="the method x backbone matrix and parameter counts")
    p.add_argument("--model", default="random:vit-b-16")
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("bench", help="run evaluation protocols over methods x datasets x shots x seeds (resumable)")
    p.add_argument("--config", help="YAML: methods, datasets, protocols, shots, seeds, model, recipes, ...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--datasets", nargs="+", help="dataset names (toy:<name>, coco:<folder>, ...); toydet:suite names "
                                                  "the six sets of the toy detection suite")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOL_CHOICES))
    p.add_argument("--shots", nargs="+", type=shots_value,
                   help="images per class (per category for detection), or 'all' for the whole training split "
                        "(default: 1 2 4 8 16; on detection datasets 1 3 5 10 all, as ODinW)")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--model")
    p.add_argument("--data-root")
    p.add_argument("--output", help="results folder (finished runs in it are reused)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="of every run's training and evaluation (default fp32); other precisions get their own run "
                        "folders and results_<precision>.* files, with the difference to fp32 when it was run too")
    p.add_argument("--workers", type=int,
                   help="runs trained at once, each in its own process (default 1); torch's threads are divided "
                        "among them (set threads_per_worker in the config to choose)")
    p.add_argument("--recipe", help=RECIPE_HELP)
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from results.csv")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("pretrain-toy", help="pretrain the small CLIP of the embedded default on the toy world")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--cache-dir", default=str(Path("~/.cache/vlprompt/pretrain").expanduser()),
                   help="where the rendered corpus is cached")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="PretrainConfig field, e.g. steps=3000")
    p.set_defaults(func=cmd_pretrain_toy)

    p = sub.add_parser("pretrain-toy-vilt", help="pretrain the small ViLT of embedded-vilt on the toy world "
                                                 "(image-text matching + masked words)")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--cache-dir", default=str(Path("~/.cache/vlprompt/pretrain").expanduser()),
                   help="where the rendered corpus is cached")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="ViltPretrainConfig field, e.g. steps=3000")
    p.set_defaults(func=cmd_pretrain_toy_vilt)

    p = sub.add_parser("pretrain-toy-detector", help="pretrain the small Grounding DINO of embedded-detector on the "
                                                     "toy world's multi-object scenes (the detector's own loss)")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--cache-dir", default=str(Path("~/.cache/vlprompt/pretrain").expanduser()),
                   help="where the rendered scenes and evaluation sets are cached")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="DetectorPretrainConfig field, e.g. steps=3000 or holdout_shapes=[octagon,heart]")
    p.set_defaults(func=cmd_pretrain_toy_detector)

    p = sub.add_parser("demo", help="the main job: zero-shot vs tuned prompts on the embedded default")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="smaller and faster (smoke test)")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_libraries() -> None:
    """transformers' per-load progress bars and advisory warnings drown the CLI's own output."""
    import os
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if not os.environ.get("VLPROMPT_DEBUG"):
        warnings.filterwarnings("ignore", module="transformers")


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """The parsed arguments; an unknown flag is reported by its subcommand (`vlprompt eval: error: ...`, with that
    command's usage), not by the top-level parser."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from vlprompt.backbones import BackboneLoadError, UnsupportedBackboneError
    from vlprompt.data import DatasetError
    from vlprompt.engine import CheckpointError, TrainingError
    from vlprompt.methods import MethodConfigError
    from vlprompt.protocols.workers import WorkerError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(argv)
    args.argv = argv  # what was asked, as typed: recorded in bench reports
    _quiet_libraries()
    import warnings

    # A warning reads like the CLI's errors (one line, the command named), not as Python's file:line + source.
    warnings.formatwarning = lambda message, *_rest, **_kw: f"vlprompt {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except (CLIError, DatasetError, BackboneLoadError, UnsupportedBackboneError, CheckpointError, TrainingError,
            MethodConfigError, WorkerError, FileNotFoundError, ValueError) as err:
        import os

        if os.environ.get("VLPROMPT_DEBUG"):
            raise
        print(f"vlprompt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        import os

        if os.environ.get("VLPROMPT_DEBUG"):
            raise
        print(f"vlprompt {args.command}: interrupted{INTERRUPT_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130  # the shell's code for a process ended by SIGINT


# What a Ctrl-C leaves and how to go on, for the commands that keep their work on disk.
INTERRUPT_HINTS = {
    "train": "; the last finished epoch is kept: rerun with --resume to continue",
    "bench": "; finished runs are kept and tabled: rerun the same command to continue",
}


if __name__ == "__main__":
    sys.exit(main())
