"""The contracts between backbone, method, task and trainer refuse what does not fit, with one line naming the fix."""
import json

import pytest
import torch

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.data import DatasetError
from vlprompt.engine.checkpoint import CheckpointError
from vlprompt.methods import VPT, MethodConfigError, VPTConfig


def test_a_classification_method_on_a_detector_is_refused_before_any_work(engine_run_options, engine_data_root,
                                                                           tmp_path):  # fmt: skip
    options = engine_run_options("random:grounding-dino-micro", engine_data_root, tmp_path / "run")
    with pytest.raises(DatasetError, match=r"'coop' works on dual encoder models, but 'random:grounding-dino-micro' "
                                           r"is a fusion detector model; see `vlprompt methods`"):  # fmt: skip
        vlprompt.train(options, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_prompt_evaluated_on_another_architecture_names_what_differs(engine_coop_run):
    run_dir, _ = engine_coop_run
    data = vlprompt.DataOptions("toydet:shapes")
    with pytest.raises(DatasetError, match="holds a classification prompt"):
        vlprompt.evaluate_checkpoint(run_dir, data, model="random:grounding-dino-micro")
    with pytest.raises(CheckpointError, match="trained on a 'clip' backbone"):
        vlprompt.evaluate_checkpoint(run_dir, vlprompt.DataOptions("toy:shapes"), model="random:siglip-tiny")


def test_the_run_records_the_options_the_method_resolved(engine_run_options, tiny_model_dir, engine_data_root,
                                                         tmp_path):  # fmt: skip
    options = engine_run_options(tiny_model_dir, engine_data_root, tmp_path / "run", method_options={
        "init": "a photo of a"}, epochs=1)  # fmt: skip
    vlprompt.train(options, progress=False, log=lambda _: None)
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["method_options"]
    saved = json.loads((tmp_path / "run" / "prompt_config.json").read_text())["method_config"]
    assert recorded["n_ctx"] == saved["n_ctx"] == 4  # the init phrase's tokens, not the default 16


@pytest.fixture
def engine_task(tiny_backbone, engine_data_root):
    splits = vlprompt.load_splits(vlprompt.DataOptions("eurosat", root=str(engine_data_root)))
    return splits, vlprompt.ClassificationTask(splits, tiny_backbone)


def test_the_trainers_augment_option_reaches_the_task(tiny_backbone, engine_task, tmp_path, monkeypatch):
    splits, task = engine_task  # built with augmentation on
    method = vlprompt.get_prompt_model(tiny_backbone, "coop", splits.classnames, splits.template, {"n_ctx": 2})
    cached = []
    from vlprompt.tasks import classification

    real = classification.image_features_of
    monkeypatch.setattr(classification, "image_features_of", lambda *a, **k: cached.append(1) or real(*a, **k))
    config = vlprompt.TrainConfig(epochs=1, batch_size=4, augment=False, num_workers=0)
    vlprompt.Trainer(config, tmp_path / "run", progress=False, log=lambda _: None).fit(method, task)
    assert task.augment is False and cached  # CoOp leaves the image tower alone: cached once without augmentation
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]["augment"] is False


def test_a_method_of_another_task_is_refused_by_the_trainer(engine_task, tmp_path):
    _, task = engine_task
    detector = load_backbone("random:grounding-dino-micro")
    method = vlprompt.get_prompt_model(detector, "det_coop", ["circle", "square"])
    with pytest.raises(vlprompt.TrainingError, match="'det_coop' is a detection method but the task is "
                                                     "classification; train it on a detection task"):  # fmt: skip
        vlprompt.Trainer(vlprompt.TrainConfig(epochs=1), tmp_path / "run", progress=False).fit(method, task)


def test_a_trainer_fitting_two_runs_keeps_each_runs_own_history(tiny_backbone, engine_task, tmp_path):
    splits, task = engine_task
    trainer = vlprompt.Trainer(vlprompt.TrainConfig(epochs=2, batch_size=4), tmp_path / "run", progress=False,
                               log=lambda _: None)  # fmt: skip
    for name in ("coop", "vpt_shallow"):
        method = vlprompt.get_prompt_model(tiny_backbone, name, splits.classnames, splits.template)
        trainer.fit(method, task, overwrite=True)
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3  # two epochs and the final metrics of this run only


def test_depths_given_to_a_method_directly_are_resolved_and_checked(tiny_backbone):
    method = VPT(tiny_backbone, VPTConfig(depth="all"), ["cat", "dog"])
    assert method.config.depth == tiny_backbone.vision_layers and method.prompts.shape[0] == 2
    with pytest.raises(MethodConfigError, match=r"vpt.depth=12 exceeds the 2 layers of the image tower"):
        VPT(tiny_backbone, VPTConfig(), ["cat", "dog"])  # ViT-B's default depth on a 2-layer tower


def test_a_config_instance_given_to_get_prompt_model_is_the_one_the_method_holds(tiny_backbone):
    config = vlprompt.make_config("coop", {"init": "a photo of a"}, tiny_backbone)
    method = vlprompt.get_prompt_model(tiny_backbone, "coop", ["cat", "dog"], config=config)
    assert method.config is config and config.n_ctx == 4
    with torch.no_grad():
        assert method(pixel_values=torch.zeros(1, 3, 32, 32)).shape == (1, 2)
