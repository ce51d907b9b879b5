"""Exact text truncation, for every method, in training and in evaluation.

The CLIP adapter cuts each batch of texts after its last end-of-text token (the text tower is causal, so later
positions cannot change the pooled features). ``CLIPBackbone.truncate_text = False`` runs the full 77-position
context instead, as the reference implementations do; the adapter's full-context mode is checked against a
hand-written 77-position tower in tests/test_backbone.py. Here every registered method (shallow and deep text
prompts, per-image prompts, block terms, re-arranged sequences, template ensembles) gives the same logits and
gradients both ways on class names of different token lengths, and whole engine runs (training steps, cached
features, validation, test) give the same losses, prompts and accuracies, while the text tower really ran on the
short sequences.
"""
from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import CLIPBackbone, load_backbone
from vlprompt.engine.api import DataOptions, load_splits
from vlprompt.engine.trainer import TrainConfig, Trainer, seed_everything
from vlprompt.methods import METHODS, get_prompt_model
from vlprompt.tasks import ClassificationBatch, ClassificationTask

from data_fixtures import make_split_json_dataset

CONTEXT = 77
# 1 to 6 BPE tokens: every batch of class sentences has end-of-text tokens at different positions
VARIED_NAMES = ["forest", "annual crop", "herbaceous vegetation land", "a b c d e f"]
# Every registered CLIP method that runs the text tower, plus the variants whose text path differs.
CLIP_METHODS = [
    name for name, spec in METHODS.items()
    if name != "linear_probe" and spec.method_class.backbone_kind == CLIPBackbone.info.kind
    and spec.method_class.required_sites <= CLIPBackbone.info.sites
]
TEXT_METHODS: dict[str, tuple[str, dict] | dict] = {name: {} for name in CLIP_METHODS}
TEXT_METHODS.update({
    "zeroshot_ensemble": ("zeroshot", {"templates": "ensemble"}),
    "coop_middle": ("coop", {"class_position": "middle"}),
    "coop_front": ("coop", {"class_position": "front"}),
    "coop_class_specific": ("coop", {"class_specific": True}),
    "cocoop_chunked": ("cocoop", {"chunk_size": 3}),
    "apt_text_only": ("apt", {"towers": "text", "n_prompts": 8}),
    "dpt_top2": ("dpt", {"top_k": 2}),  # K < classes: the frozen ranking pass is used
    "clip_lora": ("clip_lora", {"dropout": 0.0}),  # the adapters' dropout would draw other masks in each pass
})


def _spec(case: str) -> tuple[str, dict]:
    value = TEXT_METHODS[case]
    return value if isinstance(value, tuple) else (case, {})


class TextLengths:
    """Sequence lengths entering the text tower's first layer, split by whether gradients were on."""

    def __init__(self, backbone) -> None:
        self.train: list[int] = []
        self.no_grad: list[int] = []

        def record(module, args):
            (self.train if torch.is_grad_enabled() else self.no_grad).append(args[0].shape[1])

        backbone.model.text_model.encoder.layers[0].register_forward_pre_hook(record)

    def clear(self) -> None:
        self.train.clear()
        self.no_grad.clear()


def _liven(method) -> None:
    """Keep random-init parts from hiding differences: CoCoOp's 1-unit meta-net ReLU alive, APT's B non-zero."""
    with torch.no_grad():
        if getattr(method, "meta_net", None) is not None:
            method.meta_net[0].bias.fill_(0.5)
        for part in (getattr(method, "text_apt", None), getattr(method, "image_apt", None)):
            if part is not None:
                part.up.normal_(0, 0.02)


def _logits_and_grads(method, pixels, labels):
    """Training-step logits, the gradients of the step's whole loss (every named term: DPT's auxiliary and guidance
    terms too), and evaluation logits."""
    method.zero_grad(set_to_none=True)
    method.train()
    output = method.training_step(ClassificationBatch(labels, pixel_values=pixels))
    logits = output.logits
    trainable = method.prompt_parameters()
    if trainable:
        output.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}
    method.eval()
    with torch.no_grad():
        eval_logits = method(pixel_values=pixels)
    return logits.detach(), grads, eval_logits


@pytest.mark.parametrize("case", sorted(TEXT_METHODS))
def test_truncated_and_full_context_text_give_the_same_logits_and_gradients(case, monkeypatch):
    name, options = _spec(case)
    lengths = TextLengths(backbone := load_backbone("random:tiny"))  # own copy: hooks stay off the shared one
    torch.manual_seed(0)
    method = get_prompt_model(backbone, name, VARIED_NAMES, config=dict(options))
    _liven(method)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=g)
    labels = torch.tensor([0, 3, 2])

    lengths.clear()
    truncated = _logits_and_grads(method, pixels, labels)
    short = lengths.train + lengths.no_grad
    monkeypatch.setattr(backbone, "truncate_text", False)
    method.set_classes(list(VARIED_NAMES))  # class-derived buffers (DPT's template ranking) in full context too
    lengths.clear()
    full = _logits_and_grads(method, pixels, labels)

    assert short and max(short) < CONTEXT  # the text tower ran on cut sequences ...
    assert set(lengths.train + lengths.no_grad) == {CONTEXT}  # ... and here on the whole context
    torch.testing.assert_close(truncated[0], full[0], atol=2e-5, rtol=1e-5)  # training-mode logits
    torch.testing.assert_close(truncated[2], full[2], atol=2e-5, rtol=1e-5)  # evaluation logits
    assert set(truncated[1]) == set(full[1])
    for param, grad in truncated[1].items():
        torch.testing.assert_close(grad, full[1][param], atol=1e-5, rtol=1e-4, msg=param)
    if name not in ("zeroshot", "tip_adapter", "tip_adapter_f"):  # nothing to train (-F: not before its fit)
        assert any(g.abs().sum() > 0 for g in truncated[1].values())


@pytest.mark.parametrize("case", ["coop", "ivlp", "deep_prompt"])
@torch.no_grad()
def test_truncation_cuts_at_the_last_end_of_text_plus_the_prompts(case):
    """The cut is as short as exactness allows: the longest class sentence, plus the inserted prompt tokens."""
    backbone = load_backbone("random:tiny")
    lengths = TextLengths(backbone)
    method = get_prompt_model(backbone, case, VARIED_NAMES)
    method.text_features()
    sentences = method.class_text  # the class sentences, placeholder words the prompts replace already removed
    inserted = method.config.n_ctx if case == "coop" else method.config.n_text
    assert lengths.no_grad == [int(sentences.lengths.max()) + inserted]


# ------------------------------------------------------------------------------------------------ engine runs
@pytest.fixture(scope="module")
def varied_data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied_names")
    make_split_json_dataset(root, "eurosat", classnames=VARIED_NAMES, per_split=(2, 1, 2), image_size=32)
    return root


ENGINE_OPTIONS = {  # small prompts keep each run about a second; other methods run with their defaults
    "coop": {"n_ctx": 4}, "vpt_shallow": {"n_tokens": 2}, "vpt_deep": {"n_tokens": 2}, "sdpt": {"init_scale": 0.1},
    "dpt": {"n_ctx": 4, "n_visual": 2}, "apt": {"n_prompts": 4}, "deep_prompt": {"n_text": 8, "n_image": 4},
    "clip_lora": {"dropout": 0.0},  # dropout masks over the text would differ in size (cut vs whole context)
}


def _engine_run(data_root, run_dir, name, augment):
    backbone = load_backbone("random:tiny")
    lengths = TextLengths(backbone)
    splits = load_splits(DataOptions(dataset="eurosat", root=str(data_root)))
    seed_everything(1)
    method = get_prompt_model(backbone, name, splits.classnames, splits.template, dict(ENGINE_OPTIONS.get(name, {})))
    _liven(method)
    lengths.clear()
    # SGD, not AdamW: Adam divides by the root of tiny second moments, which turns float rounding of a near-zero
    # gradient into a full-size step (MaPLe's couplings.0.weight: 2.6e-4 apart after 2 epochs, others 1e-7).
    config = TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, optimizer="sgd", lr=0.05, augment=augment)
    trainer = Trainer(config, run_dir, progress=False, log=lambda _: None)
    final = trainer.fit(method, ClassificationTask(splits, backbone, augment))
    return trainer.history, final, method.prompt_state_dict(), lengths


@pytest.mark.parametrize("name", sorted(CLIP_METHODS))
def test_engine_training_and_evaluation_run_truncated_and_match_the_full_context(name, varied_data_root, tmp_path,
                                                                                  monkeypatch):
    augment = name != "coop"  # CoOp without augmentation: the cached-image-features path
    history, final, prompts, lengths = _engine_run(varied_data_root, tmp_path / "cut", name, augment)
    monkeypatch.setattr(CLIPBackbone, "truncate_text", False)
    full_history, full_final, full_prompts, full_lengths = _engine_run(varied_data_root, tmp_path / "full", name,
                                                                       augment)
    # training steps (gradients on; none for zero-shot or for text features cached once) and evaluation
    trains_text = name not in ("zeroshot", "vpt_shallow", "vpt_deep", "clip_adapter", "tip_adapter", "tip_adapter_f")
    assert bool(lengths.train) == trains_text
    assert lengths.no_grad and max(lengths.train + lengths.no_grad) < CONTEXT
    assert set(full_lengths.train + full_lengths.no_grad) == {CONTEXT}
    # the same run either way
    assert final == full_final
    for record, full_record in zip(history, full_history):
        for key in ("train_loss", "val_accuracy", "accuracy"):
            if key in record:
                assert record[key] == pytest.approx(full_record[key], rel=1e-4, abs=1e-5), key
    assert set(prompts) == set(full_prompts)
    for key, tensor in prompts.items():
        torch.testing.assert_close(tensor, full_prompts[key], atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("case", ["coop", "coop_class_specific", "ivlp", "maple"])
def test_many_class_text_chunks_checkpointed_give_the_same_logits_and_gradients(case, monkeypatch):
    """Above the backbone's checkpoint_classes the text tower runs in recomputed chunks: same numbers."""
    name, options = _spec(case) if case in TEXT_METHODS else (case, {})
    backbone = load_backbone("random:tiny")
    torch.manual_seed(0)
    names = [f"{a} {b}" for a in VARIED_NAMES for b in ("one", "two")]  # more classes than the chunk below
    method = get_prompt_model(backbone, name, names, config=dict(options))
    pixels = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 5])
    whole = _logits_and_grads(method, pixels, labels)
    chunks = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: chunks.append(1) or original(*a, **k))
    monkeypatch.setattr(backbone, "checkpoint_classes", 3)
    monkeypatch.setattr(backbone, "chunk_classes", 3)
    chunked = _logits_and_grads(method, pixels, labels)
    assert len(chunks) == -(-len(names) // 3)  # the text tower really ran in chunks
    torch.testing.assert_close(chunked[0], whole[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[2], whole[2], atol=2e-5, rtol=1e-5)
    assert set(chunked[1]) == set(whole[1]) and chunked[1]
    for param, grad in chunked[1].items():
        torch.testing.assert_close(grad, whole[1][param], atol=1e-5, rtol=1e-4, msg=param)
