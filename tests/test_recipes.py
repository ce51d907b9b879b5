"""Training recipes follow the model: the embedded models carry the toy recipe, other models get the papers'
settings (``field``), ``--recipe`` picks another, and whatever the user sets wins (vlprompt.recipes)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from vlprompt.cli import main
from vlprompt.engine.api import DataOptions, RunOptions, resolve_recipe
from vlprompt.engine.trainer import TrainConfig
from vlprompt.protocols.runner import BenchConfig, Job, Recipe, _run_options
from vlprompt.recipes import RECIPE_FILE, choose_recipe, field_recipe_set, named_recipe


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_the_embedded_model_carries_the_toy_recipe_and_others_get_the_field_one():
    choice = choose_recipe("auto", "embedded")
    assert choice.recipe.name == "toy" and "carried by the model" in choice.why
    assert choice.recipe.train["optimizer"] == "adamw" and choice.recipe.train["augment"] is False
    for model in ("random:tiny", "openai/clip-vit-base-patch16"):
        assert choose_recipe("auto", model).recipe.name == "field"
    assert choose_recipe("field", "embedded").recipe.name == "field"  # asked for: wins over the model's own


def test_the_field_recipe_holds_each_papers_released_settings():
    field = field_recipe_set()
    assert field.train_values("coop", 16)["epochs"] == 200 and field.train_values("coop", 1)["epochs"] == 50
    assert field.train_values("coop", 4)["epochs"] == 100 and "epochs" not in field.train_values("coop", None)
    assert field.train_values("maple", 16) == {"epochs": 5, "batch_size": 4, "lr": 0.0035}
    assert field.train_values("cocoop", 16)["batch_size"] == 1
    assert field.for_method("dpt").method_options == {"guidance_epochs": 30}
    assert all(recipe.source for recipe in field.methods.values())  # each names where its settings come from
    assert field.train_values("sdpt", 16) == {}  # no released recipe: the engine's defaults (CoOp's)


def test_what_the_user_sets_wins_over_the_recipe():
    options, line = resolve_recipe(RunOptions(method="sdpt", train={"lr": 0.05}, method_options={"depth": 2}))
    assert isinstance(options.train, TrainConfig) and options.recipe == "toy"
    assert options.train.lr == 0.05 and options.train.optimizer == "adamw" and options.train.augment is False
    assert options.method_options == {"init_scale": 0.1, "depth": 2}  # the toy recipe's option kept, user's added
    assert line.startswith("recipe: toy (carried by the model embedded") and "adamw lr 0.05" in line
    field_options, _ = resolve_recipe(RunOptions(model="random:tiny", method="coop",
                                                 data=DataOptions(shots=16), train={"epochs": 3}))
    assert (field_options.train.epochs, field_options.train.optimizer) == (3, "sgd")
    explicit = RunOptions(train=TrainConfig(epochs=2))
    as_given = resolve_recipe(explicit)[0]  # a complete TrainConfig: no recipe applies, and the run says so
    assert as_given.train is explicit.train and as_given.recipe == "none" and as_given.method_options == {}
    again, _ = resolve_recipe(options)
    assert again is options  # resolving twice changes nothing


def test_a_model_folder_can_carry_its_own_recipe(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / RECIPE_FILE).write_text(json.dumps({
        "name": "mine", "train": {"optimizer": "adamw", "lr": 0.03},
        "methods": {"coop": {"train": {"epochs": 4}, "method_options": {"n_ctx": 2}}},
    }))
    options, line = resolve_recipe(RunOptions(model=str(model), method="coop"))
    assert (options.train.lr, options.train.epochs, options.method_options) == (0.03, 4, {"n_ctx": 2})
    assert "recipe: mine (carried by the model" in line
    (model / RECIPE_FILE).write_text(json.dumps({"recipe": "toy"}))
    assert choose_recipe("auto", str(model)).recipe.name == "toy"


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('["toy"]', "must hold a mapping"),
    ('{"recipe": "fast"}', "unknown recipe 'fast'"),
    ('{"name": "x", "trian": {}}', "unknown keys \\['trian'\\]"),
    ('{"name": "x", "methods": {"coop": {"lr": 1}}}', "unknown keys \\['lr'\\]; use train"),
    ('{"name": "x", "methods": {"coop": {"epochs_by_shots": {"16": 0}}}}', "epochs_by_shots"),
])
def test_a_bad_recipe_file_is_refused_by_name(tiny_model_dir, tmp_path, content, message):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / RECIPE_FILE).write_text(content)
    with pytest.raises(ValueError, match=message):
        choose_recipe("auto", str(model))


def test_recipe_names_and_files_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'papers': use auto, field, toy or a recipe file"):
        choose_recipe("papers", "embedded")
    with pytest.raises(ValueError, match="cannot read the recipe file"):
        choose_recipe(str(tmp_path / "missing.yaml"), "embedded")
    file = tmp_path / "slow.yaml"
    file.write_text("train: {epochs: 30, lr: 0.001}\nmethods: {coop: {method_options: {init: a photo of a}}}\n")
    recipe = choose_recipe(str(file), "embedded").recipe
    assert recipe.name == "slow" and recipe.train_values("coop", 16) == {"epochs": 30, "lr": 0.001}
    code, _, err = _cli("train", "--recipe", "papers", "--epochs", "1", "--output", tmp_path / "run")
    assert code == 2 and "unknown recipe 'papers'" in err and not (tmp_path / "run").exists()


def test_bench_recipe_under_the_bench_settings(tmp_path):
    toy = BenchConfig(methods=["coop", "sdpt"], datasets=["toy:shapes"])
    assert toy.recipe == "toy" and toy.default_train["optimizer"] == "adamw"
    assert toy.recipes["sdpt"].method_options == {"init_scale": 0.1}
    field = BenchConfig(methods=["coop", "maple"], datasets=["eurosat"], model="random:tiny")
    job = Job("fewshot", "eurosat", "coop", 16, 1)
    assert field.recipe == "field" and _run_options(field, job, tmp_path).train.epochs == 200
    # epochs set for every method in the bench win over the recipe's per-method epochs
    short = BenchConfig(methods=["coop", "maple"], datasets=["eurosat"], model="random:tiny",
                        default_train={"epochs": 2, "lr": 0.01})
    maple = _run_options(short, Job("fewshot", "eurosat", "maple", 16, 1), tmp_path).train
    assert (maple.epochs, maple.lr, maple.batch_size) == (2, 0.01, 4)  # the recipe's batch stays
    assert _run_options(short, job, tmp_path).train.epochs == 2
    # a per-method recipe of the bench wins over everything
    own = BenchConfig(methods=["maple"], datasets=["eurosat"], model="random:tiny", default_train={"epochs": 2},
                      recipes={"maple": Recipe(train={"epochs": 7})})
    assert _run_options(own, Job("fewshot", "eurosat", "maple", 16, 1), tmp_path).train.epochs == 7


def test_recipes_toy_of_earlier_configs_still_names_the_whole_recipe(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("methods: [coop]\ndatasets: [eurosat]\nmodel: random:tiny\nrecipes: toy\n")
    from vlprompt.cli import bench_config_from, build_parser

    args = build_parser().parse_args(["bench", "--config", str(config)])
    assert bench_config_from(args).recipe == "toy"
    changed = named_recipe("toy")
    changed.methods["coop"].train["lr"] = 1.0
    assert named_recipe("toy").methods["coop"].train["lr"] != 1.0  # each use gets its own copy


def test_the_recipe_line_says_when_nothing_is_trained_by_gradient():
    assert resolve_recipe(RunOptions(method="zeroshot"))[1].endswith(": nothing to train")
    assert resolve_recipe(RunOptions(method="linear_probe"))[1].endswith("a closed-form fit on frozen image features")
