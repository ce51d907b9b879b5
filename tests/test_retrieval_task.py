"""The retrieval task (tasks/retrieval.py) and the fusion methods' matching-score head (methods/fusion.py) on a micro
random ViLT and a tiny folder in Karpathy's layout (``dataset_flickr30k.json``, solid-colour images, five captions
each).

What is checked: the score ``Linear(C, 1)`` starts from a retrieval checkpoint's own (``rank_output`` of a saved
``ViltForImageAndTextRetrieval``) and then ``fusion_head`` trains nothing (the zero-shot baseline), else it is random
(and an untrained random score warns); a batch of pairs scores as its single pairs; ViLT's loss ranks each positive
caption against K sampled captions of other images; the all-pairs evaluation equals pair-by-pair scoring whatever the
batch size; runs through the engine and the CLI record their task and their recalls, and the saved prompt scores the
same; bad inputs are named in one line. A check of the plumbing, not of ViLT.
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
from vlprompt.cli import main
from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig, evaluate_checkpoint
from vlprompt.engine.trainer import make_accelerator, prepare_training, run_training_step
from vlprompt.methods import MethodConfigError
from vlprompt.methods.fusion import RetrievalHead
from vlprompt.tasks.batches import RETRIEVAL_LABELS, RetrievalBatch
from vlprompt.tasks.fusion_inputs import fusion_transform, tokens_and_mask
from vlprompt.tasks.retrieval import RetrievalTask, load_retrieval_splits, score_all_pairs

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
MODEL = "random:vilt-micro"
METRICS = {"split", "accuracy", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n", "n_captions"}


def write_retrieval_folder(root, sizes=(("train", 6), ("val", 3), ("test", 4)), seed=0):
    """Karpathy's Flickr30K layout: ``dataset_flickr30k.json`` and the images under ``images/``."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for split, n in sizes:
        for k in range(n):
            name = rng.choice(sorted(COLOURS))
            filename = f"{split}_{k}.jpg"
            Image.new("RGB", (40 + k, 40), COLOURS[name]).save(root / "images" / filename)
            items.append({"filename": filename, "split": split,
                          "sentences": [{"raw": f"a {name} picture, number {k} of {split}, caption {j}"}
                                        for j in range(5)]})  # fmt: skip
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": items}))
    return root


def save_retrieval_vilt(out):
    """A micro ViLT saved as a retrieval checkpoint (``ViltForImageAndTextRetrieval``: the encoder and its score)."""
    from transformers import ViltForImageAndTextRetrieval

    from vlprompt.backbones.grounding_dino_presets import bert_tokenizer
    from vlprompt.backbones.vilt_presets import random_vilt

    torch.manual_seed(0)
    model = ViltForImageAndTextRetrieval(random_vilt("vilt-micro").config).eval()
    with torch.no_grad():
        model.rank_output.weight.normal_(0, 3.0)
        model.rank_output.bias.fill_(0.25)
    model.save_pretrained(out)
    bert_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vilt():
    return load_backbone(MODEL)


@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory):
    return write_retrieval_folder(tmp_path_factory.mktemp("retrieval"))


@pytest.fixture(scope="module")
def itm_dir(tmp_path_factory):
    return save_retrieval_vilt(tmp_path_factory.mktemp("vilt-itm") / "model")


def _model(backbone, name, seed=0, **options):
    torch.manual_seed(seed)
    return vlprompt.get_prompt_model(backbone, name, list(RETRIEVAL_LABELS), config={"task": "retrieval", **options})


def pairs(backbone, n: int = 4, seed: int = 0):
    texts = ["a red square", "two blue circles on the left", "a green star", "nothing at all"][:n]
    ids, mask = tokens_and_mask(backbone, texts)
    pixels = torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels


def ranking_batch(backbone, images: int = 2, candidates: int = 4) -> RetrievalBatch:
    texts = [f"a {c} thing number {k}" for k in range(images) for c in ("red", "blue", "green", "odd")[:candidates]]
    ids, mask = tokens_and_mask(backbone, texts)
    size = backbone.image_size
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(3))
    return RetrievalBatch(ids.view(images, candidates, -1), mask.view(images, candidates, -1), pixels)


def _options(root, output, method, model=MODEL, epochs=2, **method_options):
    train = TrainConfig(epochs=epochs, batch_size=12, lr=0.01, optimizer="adamw", warmup_epochs=0)
    return RunOptions(model=str(model), method=method, method_options=method_options,
                      data=DataOptions(dataset=f"retrieval:{root}"), train=train, output=str(output))  # fmt: skip


# ----------------------------------------------------------------------------------------------- the head
def test_a_retrieval_checkpoints_score_is_the_head_and_fusion_head_on_it_is_zero_shot(itm_dir, vilt):
    backbone = load_backbone(str(itm_dir))
    matching = backbone.matching_head()
    assert matching is not None and not matching.weight.requires_grad and backbone.pooled_width == backbone.width
    assert backbone.num_parameters() == vilt.num_parameters()  # the score is not counted as the encoder's
    zero_shot = _model(backbone, "fusion_head")
    assert zero_shot.num_trainable() == 0 and zero_shot.head.from_checkpoint and not zero_shot.untrained_score
    ids, mask, pixels = pairs(backbone)
    with torch.no_grad():
        _, pooled = backbone.encode(ids, mask, pixels)
        torch.testing.assert_close(zero_shot.eval()(ids, mask, pixels), matching(pooled).squeeze(-1))
    tuned = _model(backbone, "apt_native", n_prompts=2)  # the release trains the score from the checkpoint's
    assert torch.equal(tuned.head.score.weight, matching.weight) and "head.score.weight" in tuned.prompt_parameters()
    trained_too = _model(backbone, "fusion_head", train_head=True)
    assert set(trained_too.prompt_parameters()) == {"head.score.weight", "head.score.bias"}

    assert vilt.matching_head() is None  # a model without one: a random score, which fusion_head trains
    random_head = _model(vilt, "fusion_head")
    assert set(random_head.prompt_parameters()) == {"head.score.weight", "head.score.bias"}
    frozen = _model(vilt, "fusion_head", train_head=False)
    assert frozen.num_trainable() == 0 and frozen.untrained_score
    again = _model(vilt, "fusion_head", seed=5, train_head=False)  # an untrained score is the same wherever rebuilt
    assert torch.equal(again.head.score.weight, frozen.head.score.weight)
    with pytest.warns(UserWarning, match="random, untrained matching head"):
        frozen.warn_if_untrained()
    with pytest.raises(MethodConfigError, match="train_head=false leaves a vqa head random"):
        vlprompt.make_config("fusion_head", {"train_head": False})


@pytest.mark.parametrize("name", ["fusion_head", "apt_native", "deep_prompt_native"])
def test_scores_of_a_batch_equal_its_single_pairs(vilt, name):
    method = _model(vilt, name, **({} if name == "fusion_head" else {"n_prompts": 3})).eval()
    ids, mask, pixels = pairs(vilt)
    with torch.no_grad():
        together = method(ids, mask, pixels)
        alone = torch.cat([method(ids[i:i + 1], mask[i:i + 1], pixels[i:i + 1]) for i in range(len(ids))])
    assert together.shape == (4,)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["apt_native", "deep_prompt_native"])
def test_the_loss_ranks_each_positive_against_its_negatives_and_only_the_method_gets_gradients(name):
    backbone = load_backbone(MODEL)  # apt_native trains the backbone's pooler and type embeddings: a fresh one
    method = _model(backbone, name, n_prompts=3)
    batch = ranking_batch(backbone)
    accelerator = make_accelerator("fp32")
    step_module, optimizer = prepare_training(method, vlprompt.TrainConfig(lr=0.05, optimizer="adamw"), accelerator)
    own = method.prompt_parameters()
    method.train()
    with torch.no_grad():  # the score of each image with each of its candidates, pair by pair
        by_pair = torch.stack([method(batch.input_ids[i], batch.attention_mask[i],
                                      batch.pixel_values[i:i + 1].expand(4, -1, -1, -1)) for i in range(2)])  # fmt: skip
    out = run_training_step(step_module, optimizer, batch, accelerator, list(own.values()))
    assert out.logits.shape == (2, 4)
    torch.testing.assert_close(out.logits.detach(), by_pair, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.losses["main"].detach(), F.cross_entropy(by_pair, torch.zeros(2, dtype=torch.long)),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    mine = {id(p) for p in own.values()}
    assert not [n for n, p in method.named_parameters() if p.grad is not None and id(p) not in mine]
    assert all(p.grad is not None for p in own.values())


# ----------------------------------------------------------------------------------------------- the task
def test_training_samples_draw_k_captions_of_other_images_reproducibly(vilt, retrieval_root):
    splits = load_retrieval_splits(f"retrieval:{retrieval_root}")
    task = RetrievalTask(splits, vilt)
    task.prepare_training(_model(vilt, "fusion_head", negatives=3), None, 8)
    dataset = task.train_dataset()
    assert len(dataset) == 6 * 5  # every (image, caption) pair of train is a sample
    torch.manual_seed(11)
    pixels, ids, mask, index = dataset[7]
    torch.manual_seed(11)
    assert torch.equal(dataset[7][1], ids)  # the trainer seeds every sample: the same draw in any process
    assert ids.shape[0] == 1 + 3 and torch.equal(ids[0], dataset.input_ids[7]) and index == 7
    owner = dataset.captions.image
    for seed in range(20):
        torch.manual_seed(seed)
        _, candidates, _, j = dataset[seed % len(dataset)]
        rows = [next(k for k in range(len(dataset)) if torch.equal(dataset.input_ids[k], row))
                for row in candidates[1:]]
        assert all(owner[k] != owner[j] for k in rows)  # never a caption of the image itself


def test_all_pairs_scoring_equals_pair_by_pair_whatever_the_batch_size(vilt, retrieval_root):
    images = load_retrieval_splits(f"retrieval:{retrieval_root}").test
    method = _model(vilt, "apt_native", n_prompts=2)
    transform = fusion_transform(vilt)
    scores, caption_image = score_all_pairs(method, images, vilt, transform, batch_size=7)
    assert scores.shape == (4, 20) and caption_image.tolist() == [i for i in range(4) for _ in range(5)]
    again, _ = score_all_pairs(method, images, vilt, transform, batch_size=64)
    torch.testing.assert_close(scores, again, rtol=1e-4, atol=1e-6)
    from vlprompt.data import open_image

    texts = [c for image in images for c in image.captions]
    ids, mask = tokens_and_mask(vilt, texts)
    with torch.no_grad():
        pixels = transform(open_image(images[2].path)).unsqueeze(0).expand(len(texts), -1, -1, -1)
        torch.testing.assert_close(scores[2], method.eval()(ids, mask, pixels), rtol=1e-4, atol=1e-6)


def test_the_zero_shot_baseline_trains_nothing_and_its_run_scores_the_same(itm_dir, retrieval_root, tmp_path):
    run = tmp_path / "zero-shot"
    final = vlprompt.train(_options(retrieval_root, run, "fusion_head", model=itm_dir), progress=False,
                           log=lambda _: None)  # fmt: skip
    assert set(final) == METRICS and final["split"] == "test" and (final["n"], final["n_captions"]) == (4, 20)
    assert final["accuracy"] == (final["i2t_r1"] + final["t2i_r1"]) / 2
    assert json.loads((run / "prompt_config.json").read_text())["trainable_parameters"] == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["epoch"] == 0 and "val_accuracy" in history[0]  # nothing to train: evaluated only
    again = evaluate_checkpoint(run, DataOptions(dataset=f"retrieval:{retrieval_root}"))
    assert {k: again[k] for k in METRICS} == final


@pytest.mark.parametrize("name", ["apt_native", "deep_prompt_native"])
def test_a_run_through_the_engine_records_its_recalls_and_its_prompt_scores_the_same(retrieval_root, tmp_path, name):
    run = tmp_path / name
    final = vlprompt.train(_options(retrieval_root, run, name, n_prompts=2, negatives=3), progress=False,
                           log=lambda _: None)  # fmt: skip
    assert set(final) == METRICS and final["split"] == "test"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_accuracy", "val_accuracy", "val_i2t_r1", "val_t2i_r1"} <= set(history[0])
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["task"] == "retrieval" and recorded["method_options"]["task"] == "retrieval"
    assert recorded["method_options"]["negatives"] == 3
    again = evaluate_checkpoint(run, DataOptions(dataset=f"retrieval:{retrieval_root}"))
    assert {k: again[k] for k in METRICS} == final
    loaded = vlprompt.PromptMethod.from_pretrained(run)
    assert loaded.task == "retrieval" and isinstance(loaded.head, RetrievalHead)


def test_the_cli_trains_and_evaluates_retrieval(retrieval_root, tmp_path, capsys):
    assert main(["train", "--model", MODEL, "--method", "apt_native", "--dataset", f"retrieval:{retrieval_root}",
                 "--epochs", "1", "--quiet", "--output", str(tmp_path / "run"), "--set", "method.n_prompts=2",
                 "--set", "method.negatives=2"]) == 0  # fmt: skip
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(tmp_path / "run"), "--split", "val"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["split"] == "test" and scored["split"] == "val" and scored["n"] == 3 and "t2i_r10" in scored
    with pytest.warns(UserWarning, match="fusion_head scores retrieval with a random, untrained matching head"):
        assert main(["train", "--model", MODEL, "--method", "fusion_head", "--dataset", f"retrieval:{retrieval_root}",
                     "--epochs", "1", "--quiet", "--output", str(tmp_path / "frozen"), "--set",
                     "method.train_head=false"]) == 0  # fmt: skip


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_refused_in_one_line(retrieval_root, tmp_path, capsys):
    common = ["--model", MODEL, "--method", "apt_native", "--epochs", "1", "--quiet", "--output", str(tmp_path / "x")]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_coco.json").write_text("{\"imgs\": []}")
    missing = write_retrieval_folder(tmp_path / "missing")
    (missing / "images" / "test_1.jpg").unlink()
    one = write_retrieval_folder(tmp_path / "one", sizes=(("train", 1), ("test", 2)))
    cases = [
        (["--dataset", f"retrieval:{tmp_path / 'nowhere'}"],
         "is not a folder; pass retrieval:<a folder with Karpathy's"),
        (["--dataset", f"retrieval:{empty}"], "holds neither dataset_flickr30k.json nor dataset_coco.json"),
        (["--dataset", f"retrieval:{broken}"], "is not a Karpathy split file"),
        (["--dataset", f"retrieval:{missing}"], "1 of 4 test images are missing"),
        (["--dataset", f"retrieval:{one}"], "1 training image(s): retrieval trains each caption against captions"),
        (["--dataset", f"retrieval:{retrieval_root}", "--shots", "2"], "retrieval has no classes to sample"),
        (["--dataset", "retrieval:"], "retrieval:<path>"),
    ]
    for args, expected in cases:
        assert main(["train", *common, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (args, err)


def test_the_scheme_and_the_bench_know_retrieval(tmp_path):
    from vlprompt.protocols.runner import BenchConfig
    from vlprompt.specs import DatasetSpec

    spec = DatasetSpec.parse("retrieval:data/flickr30k")
    assert (spec.scheme, spec.task, str(spec)) == ("retrieval", "retrieval", "retrieval:data/flickr30k")
    with pytest.raises(ValueError, match="retrieval:data is a retrieval dataset, which trains on its whole training "
                                         "split: run it with --protocols full"):
        BenchConfig(methods=["coop"], datasets=["retrieval:data"], output=str(tmp_path / "b"))
