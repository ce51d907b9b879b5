"""The NLVR2 task (tasks/nlvr2.py) and the fusion methods' NLVR2 head (methods/fusion.py) on a micro random ViLT and a
tiny folder in the NLVR2 layout (solid-colour image pairs; "the left image is red" is true when it is).

What is checked: ViLT's pair recipe (the statement encoded with each image, image 1 as the third modality type when
the model has one, else with the head's zero-initialised offset standing in for it; the two pooled outputs
concatenated and classified), its cross-entropy, gradients only in the method, training and scoring through the
engine and the CLI (the run records its task; eval and loading rebuild the NLVR2 head), the dataset picking the
head (``bind_task``), and bad inputs named in one line. A check of the plumbing, not of ViLT.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.backbones.vilt_presets import random_vilt_backbone
from vlprompt.cli import main
from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig, check_method_fits_dataset, evaluate_checkpoint
from vlprompt.engine.trainer import make_accelerator, prepare_training, run_training_step
from vlprompt.methods import MethodConfigError, method_class
from vlprompt.methods.fusion import NLVR2Head, VQAHead
from vlprompt.tasks.batches import NLVR2_LABELS, NLVR2Batch

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
MODEL = "random:vilt-micro"


def write_nlvr2_folder(root, sizes=(("train", 16), ("dev", 8), ("test1", 8)), seed=0):
    """NLVR2's layout: ``<split>.json`` JSON lines; train's images under numbered directories, the others' not."""
    rng = random.Random(seed)
    for split, n in sizes:
        lines = []
        for k in range(n):
            left, right, said = (rng.choice(sorted(COLOURS)) for _ in range(3))
            directory = k % 2 if split == "train" else None
            folder = root / split / str(directory) if directory is not None else root / split
            folder.mkdir(parents=True, exist_ok=True)
            pair = f"{split}-{k}-0"
            Image.new("RGB", (48, 40), COLOURS[left]).save(folder / f"{pair}-img0.png")
            Image.new("RGB", (40, 48), COLOURS[right]).save(folder / f"{pair}-img1.png")
            item = {"identifier": f"{pair}-{k % 3}", "sentence": f"the left image is {said}",
                    "label": str(left == said)}  # fmt: skip
            if directory is not None:
                item["directory"] = directory
            lines.append(json.dumps(item))
        (root / f"{split}.json").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def vilt():
    return load_backbone(MODEL)


@pytest.fixture(scope="module")
def nlvr2_root(tmp_path_factory):
    return write_nlvr2_folder(tmp_path_factory.mktemp("nlvr2"))


def pair_batch(backbone, n: int = 3, seed: int = 0) -> NLVR2Batch:
    texts = ["the left image is red", "both images show blue", "there are two green things"][:n]
    tokens = backbone.tokenize(texts)
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 2, 3, backbone.image_size, backbone.image_size, generator=g)
    return NLVR2Batch(tokens.input_ids, mask, pixels, torch.tensor([1, 0, 1][:n]))


def _model(backbone, name, seed=0, **options):
    torch.manual_seed(seed)
    return vlprompt.get_prompt_model(backbone, name, list(NLVR2_LABELS), config={"task": "nlvr2", **options})


@torch.no_grad()
def _logits(method, batch):
    return method.eval()(batch.input_ids, batch.attention_mask, batch.pixel_values)


def _options(root, output, method, epochs=2, **method_options):
    train = TrainConfig(epochs=epochs, batch_size=8, lr=0.01, optimizer="adamw", warmup_epochs=0)
    return RunOptions(model=MODEL, method=method, method_options=method_options,
                      data=DataOptions(dataset=f"nlvr2:{root}"), train=train, output=str(output))  # fmt: skip


# ----------------------------------------------------------------------------------------------- the head
def test_the_logits_follow_vilts_pair_recipe_and_read_both_images(vilt):
    method = _model(vilt, "fusion_head")
    with torch.no_grad():  # an offset off its zero init, so that its use shows
        method.head.image_type_offset.normal_(0, 0.5)
    batch = pair_batch(vilt)
    logits = _logits(method, batch)
    assert logits.shape == (3, 2)
    ids, mask, pixels = batch.input_ids, batch.attention_mask, batch.pixel_values
    with torch.no_grad():
        _, first = vilt.encode(ids, mask, pixels[:, 0], image_index=0)
        _, second = vilt.encode(ids, mask, pixels[:, 1], image_index=1, image_type_offset=method.head.image_type_offset)
        expected = method.head.layers(torch.cat([first, second], dim=-1))
    torch.testing.assert_close(logits, expected)
    other = pair_batch(vilt, seed=1).pixel_values[:, 1]
    changed = NLVR2Batch(ids, mask, torch.stack([pixels[:, 0], other], dim=1), batch.labels)
    assert not torch.allclose(_logits(method, changed), logits, atol=1e-5)  # image 1 is read
    swapped = NLVR2Batch(ids, mask, pixels.flip(1), batch.labels)
    assert not torch.allclose(_logits(method, swapped), logits, atol=1e-5)  # the order of the pair matters
    head = method.head.layers
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (2 * vilt.pooled_width,
                                                                                  2 * vilt.pooled_width, 2)


def test_the_offset_is_zero_initialised_and_only_stands_in_for_a_missing_third_type(vilt):
    assert vilt.num_image_types == 1  # pretrained on single images: text and image types only
    method = _model(vilt, "fusion_head")
    offset = method.head.image_type_offset
    assert torch.equal(offset, torch.zeros(vilt.width)) and "head.image_type_offset" in method.prompt_parameters()
    batch = pair_batch(vilt)
    with torch.no_grad():  # at its zero init the second image is the model's image type: a copy of it, as ViLT's
        _, second = vilt.encode(batch.input_ids, batch.attention_mask, batch.pixel_values[:, 1])
        _, first = vilt.encode(batch.input_ids, batch.attention_mask, batch.pixel_values[:, 0])
        expected = method.head.layers(torch.cat([first, second], dim=-1))
    torch.testing.assert_close(_logits(method, batch), expected)

    three = random_vilt_backbone("vilt-micro", modality_type_vocab_size=3)  # ViLT's NLVR2 checkpoints have 3 types
    assert three.num_image_types == 2
    own = _model(three, "fusion_head")
    assert own.head.image_type_offset is None
    assert not any("image_type_offset" in n for n in own.prompt_parameters())
    before = _logits(own, batch)
    with torch.no_grad():
        _, first = three.encode(batch.input_ids, batch.attention_mask, batch.pixel_values[:, 0], image_index=0)
        _, second = three.encode(batch.input_ids, batch.attention_mask, batch.pixel_values[:, 1], image_index=1)
        torch.testing.assert_close(before, own.head.layers(torch.cat([first, second], dim=-1)))
        three.model.embeddings.token_type_embeddings.weight[2].add_(5.0)  # the third type is what image 1 reads
    assert not torch.equal(_logits(own, batch), before)  # (a random micro ViLT's pooled output barely moves)


@pytest.mark.parametrize("name", ["fusion_head", "apt_native", "deep_prompt_native"])
def test_a_batch_equals_its_single_examples(vilt, name):
    method = _model(vilt, name, **({} if name == "fusion_head" else {"n_prompts": 3}))
    batch = pair_batch(vilt)
    alone = torch.cat([_logits(method, NLVR2Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1],
                                                  batch.pixel_values[i:i + 1], batch.labels[i:i + 1]))
                       for i in range(len(batch))])  # fmt: skip
    torch.testing.assert_close(_logits(method, batch), alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["apt_native", "deep_prompt_native"])
def test_the_loss_is_cross_entropy_and_only_the_methods_parameters_get_gradients(name):
    backbone = load_backbone(MODEL)  # apt_native trains the backbone's pooler and type embeddings: a fresh one
    method = _model(backbone, name, n_prompts=3)
    accelerator = make_accelerator("fp32")
    step_module, optimizer = prepare_training(method, vlprompt.TrainConfig(lr=0.05, optimizer="adamw"), accelerator)
    own = method.prompt_parameters()
    assert "head.image_type_offset" in own
    method.train()
    batch = pair_batch(backbone)
    out = run_training_step(step_module, optimizer, batch, accelerator, list(own.values()))
    torch.testing.assert_close(out.losses["main"].detach(), F.cross_entropy(out.logits.detach(), batch.labels))
    mine = {id(p) for p in own.values()}
    stray = [n for n, p in method.named_parameters() if p.grad is not None and id(p) not in mine]
    assert not stray, stray[:5]
    assert all(p.grad is not None for p in own.values())
    assert method.head.image_type_offset.grad.abs().sum() > 0  # the stand-in for the third type trains


# ----------------------------------------------------------------------------------------------- the task
@pytest.mark.parametrize("name", ["apt_native", "deep_prompt_native"])
def test_a_run_through_the_engine_is_scored_and_its_saved_prompt_scores_the_same(nlvr2_root, tmp_path, name):
    run = tmp_path / name
    final = vlprompt.train(_options(nlvr2_root, run, name, n_prompts=2), progress=False, log=lambda _: None)
    assert set(final) == {"split", "accuracy", "n"} and final["split"] == "test" and final["n"] == 8
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(history[0])
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["task"] == "nlvr2" and recorded["method_options"]["task"] == "nlvr2"
    assert (recorded["num_train"], recorded["num_dev"], recorded["num_test"]) == (16, 8, 8)
    assert json.loads((run / "prompt_config.json").read_text())["task"] == "nlvr2"
    again = evaluate_checkpoint(run, DataOptions(dataset=f"nlvr2:{nlvr2_root}"))
    assert again["accuracy"] == final["accuracy"] and again["split"] == "test" and again["n"] == 8
    assert evaluate_checkpoint(run, DataOptions(dataset=f"nlvr2:{nlvr2_root}"), split="val")["n"] == 8
    loaded = vlprompt.PromptMethod.from_pretrained(run)  # a saved nlvr2 run reloads an NLVR2 head
    assert loaded.task == "nlvr2" and isinstance(loaded.head, NLVR2Head) and loaded.classnames == ["False", "True"]


def test_the_dataset_picks_the_head(vilt):
    for scheme in ("vqa", "nlvr2", "retrieval"):
        assert check_method_fits_dataset("apt_native", f"{scheme}:somewhere") == scheme
    cls = method_class("apt_native")
    assert cls.supported_tasks() == ("vqa", "nlvr2", "retrieval") and method_class("coop").supported_tasks() == (
        "classification",)
    assert cls.bind_task({"n_prompts": 2}, "nlvr2") == {"n_prompts": 2, "task": "nlvr2"}
    assert method_class("coop").bind_task({"n_ctx": 4}, "classification") == {"n_ctx": 4}  # the default: as given
    with pytest.raises(MethodConfigError, match="method.task=vqa contradicts the dataset's task, nlvr2") as err:
        check_method_fits_dataset("apt_native", "nlvr2:somewhere", {"task": "vqa"})
    assert "\n" not in str(err.value)
    vqa = vlprompt.get_prompt_model(vilt, "apt_native", ["yes", "no"], config={"n_prompts": 2})
    assert vqa.task == "vqa" and isinstance(vqa.head, VQAHead)  # no task given: VQA, as before
    with pytest.raises(ValueError, match=r"the nlvr2 head outputs \['False', 'True'\]"):
        vlprompt.get_prompt_model(vilt, "fusion_head", ["yes", "no"], config={"task": "nlvr2"})
    method = _model(vilt, "fusion_head")
    with pytest.raises(ValueError, match="outputs"):
        method.set_classes(["True", "False"])
    assert method.classnames == ["False", "True"]


def test_the_cli_trains_and_evaluates_nlvr2_and_refuses_a_contradicting_task(nlvr2_root, tmp_path, capsys):
    common = ["--model", MODEL, "--method", "apt_native", "--epochs", "1", "--quiet"]
    assert main(["train", *common, "--dataset", f"nlvr2:{nlvr2_root}", "--output", str(tmp_path / "run"),
                 "--set", "method.n_prompts=2"]) == 0  # fmt: skip
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["split"] == "test" and trained["n"] == 8
    assert main(["eval", str(tmp_path / "run")]) == 0  # the run's own dataset
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["accuracy"] == trained["accuracy"]
    assert main(["train", *common, "--dataset", f"nlvr2:{nlvr2_root}", "--output", str(tmp_path / "refused"),
                 "--set", "method.task=vqa"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method.task=vqa contradicts the dataset's task, nlvr2" in err
    assert not (tmp_path / "refused").exists()
    assert main(["eval", str(tmp_path / "run"), "--dataset", "vqa:elsewhere"]) == 2
    assert "holds an nlvr2 prompt" in capsys.readouterr().err


def test_params_counts_the_nlvr2_head(capsys):
    assert main(["params", "--model", MODEL, "--methods", "fusion_head", "--set", "method.task=nlvr2"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    c = 32  # the micro ViLT's width: Linear(2C, 2C) + LayerNorm(2C) + Linear(2C, 2) + the offset (C)
    assert rows["fusion_head"] == f"{(2 * c) ** 2 + 2 * c + 2 * 2 * c + 2 * c * 2 + 2 + c:,}"


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_refused_in_one_line(nlvr2_root, tmp_path, capsys):
    common = ["--model", MODEL, "--method", "apt_native", "--epochs", "1", "--quiet", "--output", str(tmp_path / "x")]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = write_nlvr2_folder(tmp_path / "broken", sizes=(("train", 4),))
    (broken / "train.json").write_text((broken / "train.json").read_text() + "{not json\n")
    missing = write_nlvr2_folder(tmp_path / "missing", sizes=(("train", 4),))
    next((missing / "train").rglob("*-img1.png")).unlink()
    cases = [
        (["--dataset", f"nlvr2:{tmp_path / 'nowhere'}"], "is not a folder; pass nlvr2:<a folder in the NLVR2 layout>"),
        (["--dataset", f"nlvr2:{empty}"], "holds none of train.json, dev.json, test1.json"),
        (["--dataset", f"nlvr2:{broken}"], "line 5: not valid JSON"),
        (["--dataset", f"nlvr2:{missing}"], "1 image(s) of train are missing"),
        (["--dataset", f"nlvr2:{nlvr2_root}", "--shots", "4"], "NLVR2 has no classes to sample"),
        (["--dataset", "nlvr2:"], "nlvr2:<path>"),
    ]
    for args, expected in cases:
        assert main(["train", *common, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (args, err)
    assert not (tmp_path / "x").exists()
    only_train = write_nlvr2_folder(tmp_path / "only_train", sizes=(("train", 4),))
    with pytest.raises(vlprompt.data.DatasetError, match="has no dev or test statements"):
        vlprompt.train(_options(only_train, tmp_path / "y", "fusion_head"), progress=False, log=lambda _: None)
    no_test = write_nlvr2_folder(tmp_path / "no_test", sizes=(("train", 4), ("dev", 4)))
    final = vlprompt.train(_options(no_test, tmp_path / "z", "fusion_head", epochs=1), progress=False,
                           log=lambda _: None)  # fmt: skip
    assert final["split"] == "val" and final["n"] == 4  # no test split: dev is scored, and says so
    with pytest.raises(vlprompt.data.DatasetError, match="has no test split"):
        evaluate_checkpoint(tmp_path / "z", DataOptions(dataset=f"nlvr2:{no_test}"))


def test_the_scheme_and_the_bench_know_nlvr2(tmp_path):
    from vlprompt.protocols.runner import BenchConfig
    from vlprompt.specs import DatasetSpec, SpecError

    spec = DatasetSpec.parse("NLVR2:data/nlvr2")
    assert (spec.scheme, spec.name, spec.task, str(spec)) == ("nlvr2", "data/nlvr2", "nlvr2", "nlvr2:data/nlvr2")
    with pytest.raises(SpecError, match="nlvr2:<path>"):
        DatasetSpec.parse("nlvr2:")
    with pytest.raises(ValueError, match="nlvr2:data is an NLVR2 dataset, which trains on its whole training split: "
                                         "run it with --protocols full"):
        BenchConfig(methods=["coop"], datasets=["nlvr2:data"], output=str(tmp_path / "b"))
