"""The engine through its Python API: ``vlprompt.engine.api.train`` / ``evaluate_checkpoint`` / ``predict``.

Everything runs on tiny CLIPs (``random:tiny`` architecture) and a 3-class EuroSAT-layout set of 32x32 images
(fixtures at the end of conftest.py), so each training run takes about a second on a CPU.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlprompt.backbones import load_backbone
from vlprompt.data import DatasetError, ImageDataset, build_transform, load_dataset
from vlprompt.data.synthetic import make_synthetic_eurosat
from vlprompt.engine import CheckpointError, TrainingError
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine import trainer as trainer_module
from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig, evaluate_checkpoint, predict, train
from vlprompt.methods import canonical_method_name
from vlprompt.methods.coop import CoOp
from vlprompt.methods.vpt import VPT

from data_fixtures import make_imagefolder, make_split_json_dataset, write_corrupt_image

CLASSES = ["AnnualCrop", "Forest", "Highway"]
N_TRAIN, N_VAL, N_TEST = 3 * 4, 3 * 2, 3 * 3  # engine_data_root: (4, 2, 3) images per class
OTHER_CLASSES = ["abyssinian", "beagle", "boxer", "pug"]
LP_OPTIONS = {"c_values": [0.1, 10.0], "max_iter": 50}  # a short C sweep keeps the linear probe fast


def quiet(_: str) -> None:
    pass


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / ckpt.METRICS_FILE).read_text().splitlines()]


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]


def prompt_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / ckpt.PROMPT_FILE))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def vpt_run(tiny_model_dir, engine_data_root, engine_run_options, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vpt") / "vpt_deep"
    options = engine_run_options(tiny_model_dir, engine_data_root, run_dir, method="vpt_deep",
                                 method_options={"n_tokens": 4})
    return run_dir, train(options, progress=False, log=quiet)


@pytest.fixture(params=["coop", "vpt_deep"])
def finished_run(request, engine_coop_run):
    """(method, run folder, final metrics) of a finished CoOp / VPT-deep run."""
    if request.param == "coop":
        return ("coop", *engine_coop_run)
    return ("vpt_deep", *request.getfixturevalue("vpt_run"))


def resume_options(model_dir, data_root, output, **train_overrides) -> RunOptions:
    """3 epochs, 3 steps per epoch, augmentation ON, a warm-up epoch and AdamW state: everything resume restores."""
    train_cfg = dict(epochs=3, batch_size=4, optimizer="adamw", lr=0.01, warmup_epochs=1, augment=True, seed=1)
    train_cfg.update(train_overrides)
    return RunOptions(
        model=str(model_dir),
        method="coop",
        method_options={"n_ctx": 2},
        data=DataOptions(dataset="eurosat", root=str(data_root)),
        train=TrainConfig(**train_cfg),
        output=str(output),
    )


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_model_dir, engine_data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    result = train(resume_options(tiny_model_dir, engine_data_root, run_dir), progress=False, log=quiet)
    return run_dir, result


class Interrupt(Exception):
    """Stands for a crash / Ctrl-C between epochs."""


# ------------------------------------------------------------------------------------------------ run folder
def test_train_writes_a_complete_small_run_folder(finished_run, tiny_model_dir, engine_data_root):
    method, run_dir, result = finished_run
    for name in (ckpt.PROMPT_FILE, ckpt.CONFIG_FILE, ckpt.METRICS_FILE, ckpt.RUN_CONFIG_FILE, ckpt.RESULTS_FILE):
        assert (run_dir / name).is_file(), name
    assert (run_dir / ckpt.PROMPT_FILE).stat().st_size < 1_000_000

    config = json.loads((run_dir / ckpt.CONFIG_FILE).read_text())
    assert canonical_method_name(config["method"]) == method
    assert config["classnames"] == CLASSES
    assert config["template"] == load_dataset("eurosat", engine_data_root).template
    identity = load_backbone(str(tiny_model_dir)).identity
    assert config["backbone"]["config_hash"] == identity["config_hash"]
    assert config["backbone"]["name_or_path"] == str(tiny_model_dir)
    tensors = prompt_tensors(run_dir)
    assert config["trainable_parameters"] == sum(t.numel() for t in tensors.values()) > 0
    if method == "coop":
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"ctx": (2, identity["arch"]["text_config"]["hidden_size"])}
    else:  # deep: fresh tokens at each of the tiny image tower's 2 layers
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            "prompts": (2, 4, identity["arch"]["vision_config"]["hidden_size"])
        }
    assert config["task"] == "classification"
    assert json.loads((run_dir / ckpt.RESULTS_FILE).read_text())["final_metrics"] == result

    run_config = json.loads((run_dir / ckpt.RUN_CONFIG_FILE).read_text())
    assert run_config["method"] == method
    assert run_config["model"] == str(tiny_model_dir)
    assert run_config["train"]["epochs"] == 2
    assert run_config["data"]["root"] == str(engine_data_root)

    records = metrics(run_dir)
    assert [r["epoch"] for r in records[:-1]] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and "val_accuracy" in r for r in records[:-1])
    assert records[-1] == {"split": "test", "accuracy": result["accuracy"], "n": N_TEST}
    assert result["n"] == N_TEST and 0.0 <= result["accuracy"] <= 100.0


def test_evaluate_checkpoint_reproduces_the_training_test_accuracy_exactly(finished_run, engine_data_root):
    _, run_dir, result = finished_run
    evaluated = evaluate_checkpoint(run_dir, DataOptions(dataset="eurosat", root=str(engine_data_root)))
    assert evaluated == {"dataset": "eurosat", "split": "test", "accuracy": result["accuracy"], "n": N_TEST}
    val = evaluate_checkpoint(run_dir, DataOptions(dataset="eurosat", root=str(engine_data_root)), split="val")
    assert val["n"] == N_VAL


# ------------------------------------------------------------------------------------------------ resume / seeds
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(uninterrupted_run, tiny_model_dir, engine_data_root,
                                                                  tmp_path):
    full_dir, full_result = uninterrupted_run
    run_dir = tmp_path / "interrupted"

    def crash_after_epoch_2(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise Interrupt(message)

    with pytest.raises(Interrupt):
        train(resume_options(tiny_model_dir, engine_data_root, run_dir), progress=False, log=crash_after_epoch_2)
    assert not (run_dir / ckpt.PROMPT_FILE).exists()
    assert json.loads((run_dir / ckpt.RESUME_DIR / "state.json").read_text())["epochs_done"] == 2
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]
    # An unfinished run is not a checkpoint yet, and the error says how to finish it.
    with pytest.raises(CheckpointError, match="--resume"):
        evaluate_checkpoint(run_dir, DataOptions(dataset="eurosat", root=str(engine_data_root)))

    messages: list[str] = []
    result = train(resume_options(tiny_model_dir, engine_data_root, run_dir), resume=True, progress=False,
                   log=messages.append)
    assert any("resuming" in m and "after epoch 2" in m for m in messages)
    assert [m.split()[1] for m in messages if m.startswith("epoch ")] == ["3/3"]  # only the missing epoch ran

    assert result == full_result
    assert without_times(metrics(run_dir)) == without_times(metrics(full_dir))
    assert_same_tensors(prompt_tensors(run_dir), prompt_tensors(full_dir))


def test_same_seed_reproduces_and_another_seed_differs(uninterrupted_run, tiny_model_dir, engine_data_root, tmp_path):
    full_dir, full_result = uninterrupted_run
    again = train(resume_options(tiny_model_dir, engine_data_root, tmp_path / "again"), progress=False, log=quiet)
    assert again == full_result
    assert without_times(metrics(tmp_path / "again")) == without_times(metrics(full_dir))
    assert_same_tensors(prompt_tensors(tmp_path / "again"), prompt_tensors(full_dir))

    train(resume_options(tiny_model_dir, engine_data_root, tmp_path / "seed2", seed=2), progress=False, log=quiet)
    other, base = prompt_tensors(tmp_path / "seed2"), prompt_tensors(full_dir)
    assert sorted(other) == sorted(base)
    assert any(not torch.equal(other[k], base[k]) for k in base)


def test_training_into_an_existing_run_refuses_and_leaves_it_untouched(engine_coop_run, engine_run_options,
                                                                      tiny_model_dir, engine_data_root, tmp_path):
    run_dir = copy_run(engine_coop_run[0], tmp_path / "run")
    before = snapshot(run_dir)
    options = engine_run_options(tiny_model_dir, engine_data_root, run_dir, epochs=3)
    with pytest.raises(TrainingError) as info:
        train(options, progress=False, log=quiet)
    assert "--resume" in str(info.value) and "--overwrite" in str(info.value)
    assert snapshot(run_dir) == before

    # --overwrite replaces it (the same options as the original run give the same prompt).
    same = engine_run_options(tiny_model_dir, engine_data_root, run_dir)
    assert train(same, overwrite=True, progress=False, log=quiet) == engine_coop_run[1]
    assert_same_tensors(prompt_tensors(run_dir), prompt_tensors(engine_coop_run[0]))


# ------------------------------------------------------------------------------------------------ non-finite loss
def test_divergent_learning_rate_stops_with_an_actionable_error(tiny_model_dir, engine_data_root, tmp_path):
    run_dir = tmp_path / "diverged"
    # Epoch 1 is the warm-up (lr 1e-5); epoch 2 runs at 1e30 and diverges on its second step.
    options = resume_options(tiny_model_dir, engine_data_root, run_dir, optimizer="sgd", lr=1e30)
    with pytest.raises(TrainingError) as info:
        train(options, progress=False, log=quiet)
    message = str(info.value)
    assert "learning rate" in message and "1e+30" in message
    assert not (run_dir / ckpt.PROMPT_FILE).exists()  # no final prompt from a diverged run
    # The finished epoch's state is intact: finite prompt, one finite metrics record, resumable.
    assert json.loads((run_dir / ckpt.RESUME_DIR / "state.json").read_text())["epochs_done"] == 1
    saved = ckpt.load_prompt_tensors(run_dir / ckpt.RESUME_DIR)
    assert all(torch.isfinite(t).all() for t in saved.values())
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [1] and math.isfinite(records[0]["train_loss"])


def test_nan_loss_keeps_the_last_finished_epoch_resumable(uninterrupted_run, tiny_model_dir, engine_data_root,
                                                          tmp_path, monkeypatch):
    full_dir, full_result = uninterrupted_run
    run_dir = tmp_path / "nan"
    poisoned = {"on": False}
    real_loss = CoOp.loss

    def loss(self, logits, labels):
        value = real_loss(self, logits, labels)
        return value * float("nan") if poisoned["on"] else value

    def poison_after_epoch_1(message: str) -> None:
        if message.startswith("epoch 1/"):
            poisoned["on"] = True

    monkeypatch.setattr(CoOp, "loss", loss)
    with pytest.raises(TrainingError, match="learning rate") as info:
        train(resume_options(tiny_model_dir, engine_data_root, run_dir), progress=False, log=poison_after_epoch_1)
    assert "epoch 2, step 1" in str(info.value)
    # The first batch from the saved state failing points at that state: the message says how to start over.
    assert "--overwrite" in str(info.value)
    assert not (run_dir / ckpt.PROMPT_FILE).exists()
    assert [r["epoch"] for r in metrics(run_dir)] == [1]

    # Resuming from what the failed run left gives exactly the uninterrupted run: nothing was corrupted.
    poisoned["on"] = False
    result = train(resume_options(tiny_model_dir, engine_data_root, run_dir), resume=True, progress=False, log=quiet)
    assert result == full_result
    assert without_times(metrics(run_dir)) == without_times(metrics(full_dir))
    assert_same_tensors(prompt_tensors(run_dir), prompt_tensors(full_dir))


def test_resume_after_divergence_with_a_lower_learning_rate_uses_it(tiny_model_dir, engine_data_root, tmp_path):
    run_dir = tmp_path / "diverged"
    with pytest.raises(TrainingError):
        train(resume_options(tiny_model_dir, engine_data_root, run_dir, optimizer="sgd", lr=1e30), progress=False,
              log=quiet)
    # The error message says "Lower the learning rate": doing so on resume must take effect.
    result = train(resume_options(tiny_model_dir, engine_data_root, run_dir, optimizer="sgd", lr=0.002), resume=True,
                   progress=False, log=quiet)
    assert result["n"] == N_TEST
    assert all(r["lr"] <= 0.002 for r in metrics(run_dir) if r.get("epoch", 0) >= 2)


def _crash_after_epoch(n: int):
    def log(message: str) -> None:
        if message.startswith(f"epoch {n}/"):
            raise Interrupt(message)

    return log


def test_resume_refuses_a_run_of_other_settings_and_leaves_it_untouched(tiny_model_dir, engine_data_root, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(resume_options(tiny_model_dir, engine_data_root, run_dir), progress=False, log=_crash_after_epoch(1))
    before = snapshot(run_dir)
    other_prompt = resume_options(tiny_model_dir, engine_data_root, run_dir)
    other_prompt.method_options = {"n_ctx": 3}
    with pytest.raises(TrainingError, match=r"other settings \(method_options: .*--output") as info:
        train(other_prompt, resume=True, progress=False, log=quiet)
    assert "n_ctx" in str(info.value)
    with pytest.raises(TrainingError, match=r"train\.seed: 1 there, 2 now"):
        train(resume_options(tiny_model_dir, engine_data_root, run_dir, seed=2), resume=True, progress=False,
              log=quiet)
    assert snapshot(run_dir) == before  # a refused resume writes nothing


def test_a_crash_while_replacing_the_resume_state_resumes_from_a_complete_one(uninterrupted_run, tiny_model_dir,
                                                                             engine_data_root, tmp_path):
    full_dir, full_result = uninterrupted_run
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(resume_options(tiny_model_dir, engine_data_root, run_dir), progress=False, log=_crash_after_epoch(2))
    # As if the process died inside the next save: the previous state moved aside, the new one half written.
    (run_dir / ckpt.RESUME_DIR).rename(run_dir / (ckpt.RESUME_DIR + ".old"))
    (run_dir / (ckpt.RESUME_DIR + ".tmp")).mkdir()
    (run_dir / (ckpt.RESUME_DIR + ".tmp") / ckpt.PROMPT_FILE).write_bytes(b"half")
    result = train(resume_options(tiny_model_dir, engine_data_root, run_dir), resume=True, progress=False, log=quiet)
    assert result == full_result
    assert_same_tensors(prompt_tensors(run_dir), prompt_tensors(full_dir))


# ------------------------------------------------------------------------------------------------ bad checkpoints
def test_checkpoint_refuses_a_backbone_of_another_architecture(engine_coop_run, engine_other_arch_model_dir,
                                                               engine_data_root):
    run_dir, _ = engine_coop_run
    data = DataOptions(dataset="eurosat", root=str(engine_data_root))
    with pytest.raises(CheckpointError, match=r"vision_config\.hidden_size 48 \(checkpoint\) vs 64") as info:
        evaluate_checkpoint(run_dir, data, model=str(engine_other_arch_model_dir))
    assert "text_config" not in str(info.value)  # only the field that differs is named
    image = load_dataset("eurosat", engine_data_root).test[0].path
    with pytest.raises(CheckpointError, match=r"vision_config\.hidden_size"):
        predict(run_dir, [image], model=str(engine_other_arch_model_dir))


def _other_key(path: Path) -> None:
    save_file({"prompts": torch.zeros(2, 4, 48)}, str(path), metadata={"method": "vpt"})


def _other_shape(path: Path) -> None:
    save_file({"ctx": torch.zeros(5, 32)}, str(path), metadata={"method": "coop"})


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 definitely not safetensors \xff" * 10)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "tamper, pattern",
    [
        (_other_key, r"missing \['ctx'\], unexpected \['prompts'\]"),
        (_other_shape, r"shape \(5, 32\)"),
        (_garbage, "corrupt"),
        (_truncated, "corrupt"),
        (_missing, "missing"),
    ],
    ids=["other-method-key", "other-shape", "garbage-bytes", "truncated", "missing"],
)
def test_tampered_prompt_tensors_raise_checkpoint_error(engine_coop_run, engine_data_root, tmp_path, tamper, pattern):
    run_dir = copy_run(engine_coop_run[0], tmp_path / "run")
    tamper(run_dir / ckpt.PROMPT_FILE)
    with pytest.raises(CheckpointError, match=pattern):
        evaluate_checkpoint(run_dir, DataOptions(dataset="eurosat", root=str(engine_data_root)))
    with pytest.raises(CheckpointError, match=pattern):
        predict(run_dir, [load_dataset("eurosat", engine_data_root).test[0].path])


def test_missing_or_corrupt_prompt_config_raises_checkpoint_error(engine_coop_run, engine_data_root, tmp_path):
    data = DataOptions(dataset="eurosat", root=str(engine_data_root))
    run_dir = copy_run(engine_coop_run[0], tmp_path / "run")
    assert (run_dir / ckpt.RESUME_DIR).is_dir()
    (run_dir / ckpt.CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="--resume"):
        evaluate_checkpoint(run_dir, data)

    shutil.rmtree(run_dir / ckpt.RESUME_DIR)
    with pytest.raises(CheckpointError, match="prompt_config.json is missing") as info:
        evaluate_checkpoint(run_dir, data)
    assert "--resume" not in str(info.value)

    shutil.copy(engine_coop_run[0] / ckpt.CONFIG_FILE, run_dir / ckpt.CONFIG_FILE)
    (run_dir / ckpt.CONFIG_FILE).write_text('{"method": "coop", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        evaluate_checkpoint(run_dir, data)
    (run_dir / ckpt.CONFIG_FILE).write_text("[]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object; the checkpoint is corrupt"):
        evaluate_checkpoint(run_dir, data)
    saved = json.loads((engine_coop_run[0] / ckpt.CONFIG_FILE).read_text())
    (run_dir / ckpt.CONFIG_FILE).write_text(json.dumps({k: v for k, v in saved.items() if k != "classnames"}))
    with pytest.raises(CheckpointError, match=r"lacks \['classnames'\]; the checkpoint is corrupt"):
        evaluate_checkpoint(run_dir, data)

    with pytest.raises(CheckpointError, match="not_a_run is not a folder: pass the run folder written by"):
        evaluate_checkpoint(tmp_path / "not_a_run", data)


# ------------------------------------------------------------------------------------------------ cross-dataset
@pytest.fixture
def other_classes_root(tmp_path):
    """A 4-class Oxford-Pets-layout set and a 4-class image folder, with class names unlike the training set's."""
    make_split_json_dataset(tmp_path, "oxford_pets", classnames=OTHER_CLASSES, per_split=(1, 1, 2), image_size=32)
    make_imagefolder(tmp_path / "folder", classes=OTHER_CLASSES, per_class=(1, 1, 2), form="split", image_size=32)
    return tmp_path


@pytest.mark.parametrize("dataset", ["oxford_pets", "imagefolder:folder"])
def test_generic_coop_prompt_evaluates_on_another_label_set(engine_coop_run, other_classes_root, dataset):
    run_dir, _ = engine_coop_run
    data = DataOptions(dataset=dataset, root=str(other_classes_root))
    result = evaluate_checkpoint(run_dir, data)
    assert result["n"] == 4 * 2 and result["split"] == "test"

    # The same number, computed by hand: the saved context re-pointed at the other dataset's class names.
    splits = load_dataset(dataset, other_classes_root)
    assert splits.classnames == [c.replace("_", " ") for c in OTHER_CLASSES]
    backbone = load_backbone(json.loads((run_dir / ckpt.CONFIG_FILE).read_text())["backbone"]["name_or_path"])
    method = ckpt.load_prompt(run_dir, backbone, splits.classnames, splits.template)
    assert method.classnames == splits.classnames
    from vlprompt.engine.api import transform_config

    dataset_ = ImageDataset(splits.test, build_transform(transform_config(backbone), train=False))
    loader = torch.utils.data.DataLoader(dataset_, batch_size=64)
    assert trainer_module.evaluate(method, loader)["accuracy"] == result["accuracy"]


@pytest.fixture(scope="module")
def class_specific_run(tiny_model_dir, engine_data_root, engine_run_options, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("csc") / "coop_csc"
    options = engine_run_options(tiny_model_dir, engine_data_root, run_dir, method_options={"n_ctx": 2,
                                 "class_specific": True}, epochs=1)
    train(options, progress=False, log=quiet)
    return run_dir


def test_class_specific_coop_refuses_another_number_of_classes(class_specific_run, other_classes_root,
                                                               engine_data_root):
    with pytest.raises(ValueError, match="class-specific"):
        evaluate_checkpoint(class_specific_run, DataOptions(dataset="oxford_pets", root=str(other_classes_root)))
    # Its own classes still work.
    assert evaluate_checkpoint(class_specific_run, DataOptions(dataset="eurosat", root=str(engine_data_root)))["n"] == 9


@pytest.mark.parametrize("method", ["coop_class_specific", "linear_probe"])
def test_class_tied_prompts_refuse_other_class_names_of_the_same_count(method, class_specific_run, tiny_model_dir,
                                                                       engine_data_root, engine_run_options,
                                                                       tmp_path):
    if method == "linear_probe":
        run_dir = tmp_path / "lp"
        train(engine_run_options(tiny_model_dir, engine_data_root, run_dir, method="linear_probe",
                                 method_options=LP_OPTIONS), progress=False, log=quiet)
    else:
        run_dir = class_specific_run
    make_split_json_dataset(tmp_path, "oxford_pets", classnames=("cat", "dog", "fish"), per_split=(1, 1, 2),
                            image_size=32)
    with pytest.raises(ValueError, match="cat|classes"):
        evaluate_checkpoint(run_dir, DataOptions(dataset="oxford_pets", root=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ predict
def test_predict_returns_sorted_top_k_probabilities(engine_coop_run, engine_data_root):
    run_dir, _ = engine_coop_run
    images = [s.path for s in load_dataset("eurosat", engine_data_root).test[::3]]
    out = predict(run_dir, images, k=2)
    assert [item["image"] for item in out] == [str(Path(p).resolve()) for p in images]
    for item in out:
        probs = [t["probability"] for t in item["top"]]
        assert len(item["top"]) == 2
        assert {t["label"] for t in item["top"]} <= set(CLASSES) and len({t["label"] for t in item["top"]}) == 2
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
    everything = predict(run_dir, images[:1], k=10)[0]["top"]  # k is capped at the number of classes
    assert sorted(t["label"] for t in everything) == sorted(CLASSES)
    assert sum(t["probability"] for t in everything) == pytest.approx(1.0, abs=1e-5)
    assert everything[:2] == out[0]["top"]


def test_predict_reports_missing_and_corrupt_images(engine_coop_run, engine_data_root, tmp_path):
    run_dir, _ = engine_coop_run
    good = load_dataset("eurosat", engine_data_root).test[0].path
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        predict(run_dir, [good, tmp_path / "nope.jpg"])
    corrupt = write_corrupt_image(tmp_path / "broken.jpg")
    with pytest.raises(DatasetError) as info:
        predict(run_dir, [good, corrupt])
    assert str(corrupt) in str(info.value)


# ------------------------------------------------------------------------------------------------ other methods
def test_zeroshot_through_train_writes_an_empty_prompt(tiny_model_dir, engine_data_root, engine_run_options, tmp_path):
    run_dir = tmp_path / "zs"
    result = train(engine_run_options(tiny_model_dir, engine_data_root, run_dir, method="zeroshot"), progress=False,
                   log=quiet)
    assert result["split"] == "test" and result["n"] == N_TEST and 0.0 <= result["accuracy"] <= 100.0
    assert prompt_tensors(run_dir) == {}
    config = json.loads((run_dir / ckpt.CONFIG_FILE).read_text())
    assert config["method"] == "zeroshot" and config["trainable_parameters"] == 0
    assert not (run_dir / ckpt.RESUME_DIR).exists()  # nothing was trained
    assert metrics(run_dir)[-1] == result
    data = DataOptions(dataset="eurosat", root=str(engine_data_root))
    assert evaluate_checkpoint(run_dir, data)["accuracy"] == result["accuracy"]


def test_linear_probe_through_train(tiny_model_dir, engine_data_root, engine_run_options, other_classes_root,
                                    tmp_path):
    run_dir = tmp_path / "lp"
    options = engine_run_options(tiny_model_dir, engine_data_root, run_dir, method="linear_probe",
                                 method_options=LP_OPTIONS)
    result = train(options, progress=False, log=quiet)
    assert result["n"] == N_TEST
    assert result["accuracy"] == 100.0  # one solid colour per class: linearly separable even for a random CLIP
    embed_dim = load_backbone(str(tiny_model_dir)).embed_dim
    assert {k: tuple(v.shape) for k, v in prompt_tensors(run_dir).items()} == {
        "head.weight": (3, embed_dim), "head.bias": (3,)
    }
    first = metrics(run_dir)[0]
    assert first["epoch"] == 1 and first["c"] in LP_OPTIONS["c_values"]
    data = DataOptions(dataset="eurosat", root=str(engine_data_root))
    assert evaluate_checkpoint(run_dir, data)["accuracy"] == result["accuracy"]
    with pytest.raises(ValueError, match="linear probe"):  # its weights belong to the 3 training classes
        evaluate_checkpoint(run_dir, DataOptions(dataset="oxford_pets", root=str(other_classes_root)))


# ------------------------------------------------------------------------------------------------ tuning helps
@pytest.fixture(scope="module")
def pretrained_clip(tmp_path_factory):
    """The demo's tiny CLIP: contrastively pretrained on bare class names, so the dataset template is unfamiliar."""
    from vlprompt.demo import pretrain_tiny_clip

    work = tmp_path_factory.mktemp("pretrained_clip")
    model_dir = pretrain_tiny_clip(work / "model", work, steps=40)
    data_root = make_synthetic_eurosat(work / "data", per_split=(8, 0, 6), seed=5)  # images unseen in pretraining
    return model_dir, data_root


def test_coop_beats_zero_shot_on_the_easy_task(pretrained_clip, tmp_path):
    model_dir, data_root = pretrained_clip

    def run(method, **train_cfg):
        options = RunOptions(
            model=str(model_dir),
            method=method,
            method_options={"n_ctx": 4} if method == "coop" else {},
            data=DataOptions(dataset="eurosat", root=str(data_root)),
            train=TrainConfig(batch_size=16, warmup_epochs=0, seed=1, **{"epochs": 1, **train_cfg}),
            output=str(tmp_path / method),
        )
        return train(options, progress=False, log=quiet)

    zero_shot = run("zeroshot")
    coop = run("coop", epochs=3, lr=0.002, optimizer="adamw")
    assert zero_shot["n"] == coop["n"] == 60
    assert coop["accuracy"] >= zero_shot["accuracy"] + 20.0, (zero_shot, coop)


# ------------------------------------------------------------------------------------------------ caching
@pytest.fixture
def evaluations(monkeypatch):
    """Counts the engine's evaluation passes and the images they see."""
    from vlprompt.tasks import classification

    seen = {"passes": 0, "images": 0}
    real = classification.evaluate

    def counting(method, loader, *args, **kwargs):
        seen["passes"] += 1
        seen["images"] += len(loader.dataset)
        return real(method, loader, *args, **kwargs)

    monkeypatch.setattr(classification, "evaluate", counting)  # what the classification task evaluates with
    return seen


def test_vpt_computes_class_text_features_once_not_per_step(tiny_model_dir, engine_data_root, engine_run_options,
                                                            tmp_path, monkeypatch, evaluations):
    calls = {"text": 0, "train_steps": 0}
    real_text, real_image = VPT.text_features, VPT.image_features

    def text_features(self):
        calls["text"] += 1
        return real_text(self)

    def image_features(self, pixel_values):
        if torch.is_grad_enabled():  # a training step (cache building and evaluation run without gradients)
            calls["train_steps"] += 1
        return real_image(self, pixel_values)

    monkeypatch.setattr(VPT, "text_features", text_features)
    monkeypatch.setattr(VPT, "image_features", image_features)
    train(engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "vpt", method="vpt_deep"), progress=False,
          log=quiet)
    assert calls["train_steps"] == 2 * 3  # 2 epochs x ceil(12 / 4) steps
    assert evaluations["passes"] == 2 + 1  # validation after each epoch, then the test split
    assert calls["text"] == 1 + evaluations["passes"]  # once for training, once per evaluation pass


@pytest.mark.parametrize("augment", [False, True])
def test_coop_caches_image_features_when_augmentation_is_off(augment, tiny_model_dir, engine_data_root,
                                                             engine_run_options, tmp_path, monkeypatch, evaluations):
    images = {"n": 0}
    real = CoOp.image_features

    def image_features(self, pixel_values):
        images["n"] += pixel_values.shape[0]
        return real(self, pixel_values)

    monkeypatch.setattr(CoOp, "image_features", image_features)
    epochs = 2
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "coop", epochs=epochs, augment=augment)
    train(options, progress=False, log=quiet)
    assert evaluations["images"] == epochs * N_VAL + N_TEST
    if augment:  # fresh crops every step: every training image goes through the image tower every epoch
        assert images["n"] == epochs * N_TRAIN + evaluations["images"]
    else:  # each training image encoded exactly once, for the cache
        assert images["n"] == N_TRAIN + evaluations["images"]


@pytest.mark.parametrize("method", ["coop", "linear_probe"])
def test_training_on_a_test_only_dataset_names_it_and_the_fix(method, engine_run_options, tiny_model_dir,
                                                             engine_data_root, tmp_path, monkeypatch):
    import dataclasses

    from vlprompt.data import DatasetError
    from vlprompt.engine import api

    real = api.load_splits
    monkeypatch.setattr(api, "load_splits", lambda options: dataclasses.replace(real(options), train=[]))
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", method=method)
    with pytest.raises(DatasetError, match=r"no training images .*vlprompt eval"):
        train(options, progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ decoded-image cache
@pytest.mark.parametrize("cache", [True, None])
def test_augmenting_decoded_images_from_memory_trains_exactly_as_from_the_files(cache, tiny_model_dir,
                                                                                engine_data_root, engine_run_options,
                                                                                tmp_path, monkeypatch):  # fmt: skip
    """The cache holds each training image decoded at full resolution, so the crops are the same pixels. ``None``
    (automatic) caches a few-shot set that fits the budget; its files are then read once per run, not per epoch."""
    from vlprompt.data import datasets

    split = json.loads((engine_data_root / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    train_files = {str(engine_data_root / "eurosat" / "2750" / item[0]) for item in split["train"]}
    opened: list[str] = []
    open_image = datasets.open_image

    def counting_open(path):
        opened.append(str(path))
        return open_image(path)

    monkeypatch.setattr(datasets, "open_image", counting_open)

    def run(name: str, cache_images):
        opened.clear()
        options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / name, augment=True, epochs=2,
                                     cache_images=cache_images)  # fmt: skip
        options.data.shots = 4  # all 4 training images per class, few-shot: what the automatic cache covers
        result = train(options, progress=False, log=quiet)
        return result, sum(path in train_files for path in opened)

    cached, cached_reads = run("cached", cache)
    plain, plain_reads = run("files", False)
    assert cached == plain
    assert_same_tensors(prompt_tensors(tmp_path / "cached"), prompt_tensors(tmp_path / "files"))
    assert (cached_reads, plain_reads) == (len(train_files), 2 * len(train_files))  # once per run / per epoch


def test_a_method_too_large_for_memory_is_named_with_its_options(engine_run_options, tiny_model_dir,
                                                                 engine_data_root, tmp_path, monkeypatch):
    """torch's CPU allocator raises a RuntimeError when a prompt of a billion tokens cannot be allocated."""
    from vlprompt.engine import api

    def too_large(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 2199023255552 bytes.")

    monkeypatch.setattr(api, "get_prompt_model", too_large)
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", epochs=1)
    with pytest.raises(TrainingError, match=r"building coop with .* needs more memory than this machine has: lower"):
        train(options, progress=False, log=lambda _: None)
