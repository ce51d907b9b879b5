"""The ``vlprompt`` command line, run in-process through ``vlprompt.cli.main`` (plus one real subprocess)."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlprompt.backbones import UnsupportedBackboneError, load_backbone
from vlprompt.cli import build_parser, main
from vlprompt.data import load_dataset
from vlprompt.methods import METHODS, get_prompt_model, make_config

CLASSES = ["AnnualCrop", "Forest", "Highway"]
N_TEST = 9


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def run_config(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run_config.json").read_text())


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, engine_data_root, tmp_path_factory):
    """``vlprompt train`` with flags only: (run folder, the JSON line it printed, its whole stdout)."""
    run_dir = tmp_path_factory.mktemp("cli") / "coop"
    argv = [
        "train", "--model", tiny_model_dir, "--method", "coop", "--dataset", "eurosat",
        "--data-root", engine_data_root, "--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--optimizer", "adamw",
        "--seed", "3", "--output", run_dir, "--quiet", "--set", "train.warmup_epochs=0", "--set", "method.n_ctx=2",
    ]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, err.getvalue()
    return run_dir, last_json(out.getvalue()), out.getvalue()


# ------------------------------------------------------------------------------------------------ train
def test_train_with_flags(cli_run, tiny_model_dir, engine_data_root):
    run_dir, printed, stdout = cli_run
    assert stdout.splitlines()[0] == f"training coop on eurosat with {tiny_model_dir} -> {run_dir}"
    assert printed["output"] == str(run_dir) and printed["split"] == "test" and printed["n"] == N_TEST
    for name in ("prompt.safetensors", "prompt_config.json", "metrics.jsonl", "run_config.json"):
        assert (run_dir / name).is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"split": "test", "accuracy": printed["accuracy"], "n": N_TEST}
    assert [r["epoch"] for r in records[:-1]] == [1, 2]

    config = run_config(run_dir)
    assert config["model"] == str(tiny_model_dir) and config["method"] == "coop"
    assert config["method_options"]["n_ctx"] == 2
    assert config["data"]["dataset"] == "eurosat" and config["data"]["root"] == str(engine_data_root)
    assert config["data"]["seed"] == 3  # --seed drives few-shot sampling and training alike
    train = config["train"]
    assert (train["epochs"], train["batch_size"], train["lr"], train["optimizer"]) == (2, 4, 0.01, "adamw")
    assert (train["seed"], train["warmup_epochs"], train["augment"]) == (3, 0, True)


def test_train_precedence_yaml_then_flags_then_set(capsys, tiny_model_dir, engine_data_root, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "method": "coop",
        "method_options": {"n_ctx": 4, "init_std": 0.05},
        "data": {"dataset": "eurosat", "root": str(engine_data_root)},
        "train": {"epochs": 3, "batch_size": 6, "lr": 0.02, "optimizer": "adamw", "warmup_epochs": 0},
        "output": str(tmp_path / "from_yaml"),
    }))
    code, out, err = cli(
        capsys, "train", "--config", config_file, "--epochs", "2", "--lr", "0.005", "--no-augment", "--quiet",
        "--set", "train.epochs=1", "--set", "method.n_ctx=2",
    )
    assert code == 0, err
    run_dir = tmp_path / "from_yaml"  # output only in the YAML
    assert last_json(out)["output"] == str(run_dir)
    config = run_config(run_dir)
    train = config["train"]
    assert train["epochs"] == 1  # YAML 3 < flag 2 < --set 1
    assert train["lr"] == 0.005  # YAML 0.02 < flag
    assert train["batch_size"] == 6 and train["optimizer"] == "adamw"  # YAML only
    assert train["augment"] is False  # flag only
    assert config["method_options"]["n_ctx"] == 2  # YAML 4 < --set
    assert config["method_options"]["init_std"] == 0.05  # YAML only, kept beside the override
    prompt = json.loads((run_dir / "prompt_config.json").read_text())
    assert prompt["method_config"]["n_ctx"] == 2
    epochs = [json.loads(line).get("epoch") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, None]  # one training epoch, then the final test record


# ------------------------------------------------------------------------------------------------ eval / predict
def test_eval_prints_the_training_test_accuracy(capsys, cli_run, engine_data_root):
    run_dir, printed, _ = cli_run
    code, out, err = cli(capsys, "eval", run_dir, "--dataset", "eurosat", "--data-root", engine_data_root)
    assert code == 0, err
    result = json.loads(out)
    assert result == {"run": str(run_dir), "dataset": "eurosat", "split": "test", "accuracy": printed["accuracy"],
                      "n": N_TEST}
    code, out, err = cli(capsys, "eval", run_dir, "--dataset", "eurosat", "--data-root", engine_data_root,
                         "--split", "val")
    assert code == 0, err
    assert json.loads(out)["n"] == 6


def test_eval_reads_the_model_from_the_config_too(capsys, cli_run, engine_data_root, engine_other_arch_model_dir):
    run_dir = cli_run[0]
    code, out, err = cli(capsys, "eval", run_dir, "--dataset", "eurosat", "--data-root", engine_data_root,
                         "--set", f"model={engine_other_arch_model_dir}")
    assert code == 2 and "vision_config.hidden_size" in err  # that model was loaded, and refused


def test_predict_prints_k_labels_per_image(capsys, cli_run, engine_data_root):
    run_dir, _, _ = cli_run
    images = [s.path for s in load_dataset("eurosat", engine_data_root).test[:2]]
    code, out, err = cli(capsys, "predict", run_dir, *images, "--k", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(images)
    for line, image in zip(lines, images):
        path, tops = line.rsplit(": ", 1)
        assert path == str(Path(image).resolve())
        pairs = [item.rsplit(" ", 1) for item in tops.split(", ")]
        assert len(pairs) == 2
        labels, probs = [p[0] for p in pairs], [float(p[1]) for p in pairs]
        assert set(labels) <= set(CLASSES) and len(set(labels)) == 2
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3


# ------------------------------------------------------------------------------------------------ params / methods
def expected_counts(model: str, num_classes: int = 10) -> dict[str, int | None]:
    """Trainable parameters of every registered method through the Python API (None: unsupported here)."""
    backbone = load_backbone(model)
    classnames = [f"class {i}" for i in range(num_classes)]
    counts: dict[str, int | None] = {}
    for name, spec in METHODS.items():
        try:
            if spec.method_class.required_sites - backbone.sites or spec.method_class.backbone_kind != backbone.kind:
                raise UnsupportedBackboneError(name)
            method = get_prompt_model(backbone, name, classnames, config=make_config(name, {}, backbone))
            fitted = method.trainable_once_fitted(16 * num_classes)  # Tip-Adapter-F: keys of 16 shots per class
            counts[name] = method.num_trainable() if fitted is None else fitted
            if backbone.has_lora():  # CLIP-LoRA's adapters: the next method is counted on the model as loaded
                backbone.remove_lora()
        except UnsupportedBackboneError:
            counts[name] = None
    return counts


def count_in(line: str) -> int | None:
    cell = line.split()[1]
    return None if cell == "None" else int(cell.replace(",", ""))


def test_params_and_methods_list_every_method_with_its_count(capsys):
    expected = expected_counts("random:tiny")
    assert expected["coop"] > 0 and expected["vpt_deep"] > expected["vpt_shallow"] > 0

    code, out, err = cli(capsys, "params", "--model", "random:tiny")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in METHODS}
    assert set(rows) == set(METHODS)
    assert {name: count_in(line) for name, line in rows.items()} == expected
    assert all(re.search(r"\d\.\d{4}%($|  \(fitted on 16 shots x 10 classes\)$)", rows[name])
               for name, count in expected.items() if count is not None)  # fmt: skip

    code, out, err = cli(capsys, "methods", "--model", "random:tiny")
    assert code == 0, err
    counts_section = out.split("trainable parameters on random:tiny", 1)[1]
    rows = {line.split()[0]: line for line in counts_section.splitlines()[1:] if line.strip()}
    assert set(rows) == set(METHODS)
    assert {name: count_in(line) for name, line in rows.items()} == expected
    matrix = out.split("trainable parameters on", 1)[0]
    for name in METHODS:
        assert re.search(rf"^{name}\s+(yes|no)\b", matrix, re.M), name


def test_params_on_vit_b16_match_the_published_counts(capsys):
    code, out, err = cli(capsys, "params", "--model", "random:vit-b-16", "--methods", "coop", "vpt_deep")
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert rows == {"coop": "8,192", "vpt_deep": "73,728"}  # 16 x 512 text tokens; 12 layers x 8 x 768


def test_params_on_vit_b16_count_the_current_methods_by_their_formulas(capsys):
    code, out, err = cli(capsys, "params", "--model", "random:vit-b-16", "--methods", "kgcoop", "clip_adapter",
                         "tip_adapter", "tip_adapter_f", "promptsrc", "clip_lora", "--shots", "4", "--num-classes",
                         "3")  # fmt: skip
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    counts = {name: line.split()[1] for name, line in rows.items()}
    assert counts == {
        "kgcoop": "2,048",  # 4 x 512
        "clip_adapter": "131,072",  # 2 x 512 x 128
        "tip_adapter": "0",
        "tip_adapter_f": "6,144",  # 4 shots x 3 classes keys of width 512
        "promptsrc": "46,080",  # 9 layers x 4 tokens x (512 + 768)
        "clip_lora": "184,320",  # 12 layers x 3 projections x rank 2 x (in + out), text 512 and image 768
    }
    assert rows["tip_adapter_f"].endswith("(fitted on 4 shots x 3 classes)")


# ------------------------------------------------------------------------------------------------ errors
def _error_cases(tiny_model_dir, data_root, tmp_path):
    common = ["--dataset", "eurosat", "--data-root", data_root, "--output", tmp_path / "run", "--quiet"]
    bad_top = tmp_path / "bad_top.yaml"
    bad_top.write_text("model: random:tiny\ntrian:\n  epochs: 2\n")
    bad_nested = tmp_path / "bad_nested.yaml"
    bad_nested.write_text("train:\n  epoch: 2\n")
    (tmp_path / "not_a_run").mkdir()
    return {
        "unknown-method": (["train", "--model", tiny_model_dir, "--method", "nosuch", *common], "unknown method"),
        "missing-data-root": (
            ["train", "--model", tiny_model_dir, "--dataset", "eurosat", "--data-root", tmp_path / "nodata",
             "--output", tmp_path / "run"],
            "does not exist",
        ),
        "missing-model-folder": (["train", "--model", tmp_path / "nomodel", *common], "no model at"),
        "bad-set-syntax": (["train", "--model", tiny_model_dir, *common, "--set", "train.epochs"], "key=value"),
        "unknown-yaml-key": (["train", "--config", bad_top, *common], "unknown config key"),
        "unknown-nested-yaml-key": (["train", "--config", bad_nested, *common], "epoch"),
        "eval-not-a-run": (
            ["eval", tmp_path / "not_a_run", "--dataset", "eurosat", "--data-root", data_root],
            "prompt_config.json is missing",
        ),
    }


ERROR_CASES = ["unknown-method", "missing-data-root", "missing-model-folder", "bad-set-syntax", "unknown-yaml-key",
               "unknown-nested-yaml-key", "eval-not-a-run"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_exit_2_with_one_line(case, capsys, tiny_model_dir, engine_data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("VLPROMPT_DEBUG", raising=False)
    argv, needle = _error_cases(tiny_model_dir, engine_data_root, tmp_path)[case]
    code, out, err = cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlprompt {argv[0]}: error: ")
    assert needle in lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_training_over_a_finished_run_exits_2_naming_resume_and_overwrite(capsys, cli_run, tiny_model_dir,
                                                                          engine_data_root):
    run_dir, _, _ = cli_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, out, err = cli(capsys, "train", "--model", tiny_model_dir, "--dataset", "eurosat", "--data-root",
                         engine_data_root, "--output", run_dir, "--quiet", "--set", "train.warmup_epochs=0")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_eval_with_an_unknown_data_key_exits_2(capsys, cli_run, engine_data_root, monkeypatch):
    monkeypatch.delenv("VLPROMPT_DEBUG", raising=False)
    run_dir, _, _ = cli_run
    code, _, err = cli(capsys, "eval", run_dir, "--dataset", "eurosat", "--data-root", engine_data_root,
                       "--set", "data.shot=4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "shot" in err


def test_train_with_a_single_epoch_needs_no_extra_option(capsys, tiny_model_dir, engine_data_root, tmp_path):
    code, _, err = cli(capsys, "train", "--model", tiny_model_dir, "--dataset", "eurosat", "--data-root",
                       engine_data_root, "--output", tmp_path / "run", "--epochs", "1", "--quiet",
                       "--set", "method.n_ctx=2")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ console script
def test_console_script_help():
    exe = Path(sys.executable).parent / "vlprompt"
    assert exe.exists(), "the vlprompt console script is not installed in this environment"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "eval", "predict", "params", "methods", "demo"):
        assert command in proc.stdout
    assert "usage: vlprompt" in proc.stdout


def test_config_numbers_in_exponent_notation_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; learning rates are written that way in ML configs."""
    from vlprompt.cli import load_yaml, parse_set

    config_file = tmp_path / "run.yaml"
    config_file.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n  warmup_lr: -2.5e-5\nname: 1e3x\n")
    loaded = load_yaml(str(config_file))
    assert loaded["train"] == {"lr": 0.001, "weight_decay": 0.0005, "warmup_lr": -2.5e-5}
    assert loaded["name"] == "1e3x"  # not a number: stays a string
    assert parse_set(["train.lr=1e-3", "method.n_ctx=4"]) == {"train": {"lr": 0.001}, "method_options": {"n_ctx": 4}}


def test_quoted_numbers_in_training_options_are_refused_by_name():
    from vlprompt.engine.trainer import TrainConfig

    with pytest.raises(ValueError, match=r"train.epochs='3' \(expected an integer\); train.lr='1e-3' \(expected a number\)"):
        TrainConfig(epochs="3", lr="1e-3")
    assert TrainConfig(lr=1, grad_clip=2).lr == 1.0


def test_eval_defaults_to_the_runs_own_dataset_and_names_a_detection_dataset(capsys, cli_run, engine_data_root):
    run_dir, printed, _ = cli_run
    code, out, err = cli(capsys, "eval", run_dir)  # no --dataset, no --data-root: both from run_config.json
    assert code == 0, err
    assert json.loads(out)["accuracy"] == printed["accuracy"]
    code, out, err = cli(capsys, "eval", run_dir, "--dataset", "coco:/nowhere")
    assert code == 2 and "is a detection dataset" in err and "classification prompt" in err


def test_train_help_names_the_embedded_default():
    from vlprompt.engine.api import DataOptions, RunOptions

    assert RunOptions().model == "embedded" and DataOptions().dataset == "toy:shapes"
    help_text = build_parser().format_help()
    assert "embedded" in help_text


@pytest.mark.parametrize(("command", "hint"), [("train", "rerun with --resume"), ("bench", "rerun the same command"),
                                               ("eval", None)])
def test_ctrl_c_ends_in_one_line_naming_how_to_go_on(capsys, monkeypatch, command, hint):
    """Ctrl-C used to print a KeyboardInterrupt traceback; it now says what is kept, with the shell's exit code."""
    import vlprompt.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, f"cmd_{command}", interrupted)
    code, _, err = cli(capsys, command, *(["runs/x"] if command == "eval" else []))
    assert code == 130
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"vlprompt {command}: interrupted")
    assert "Traceback" not in err
    if hint:
        assert hint in err
