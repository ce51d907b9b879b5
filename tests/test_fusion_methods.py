"""Methods on fusion encoders (methods/fusion.py) on a micro random ViLT: what makes each that method
(tests/test_matrix.py runs the shared checks: gradients only in the method, save/load, zero memory tokens = the
head on the untouched encoder, refused answer changes, bf16 / float64).

- APT native: every block's attention output becomes ``(O + w E) exp(s)``, ``E = ReLU(X K~^T) P``, computed here
  independently on the block's own tensors; at the released init (B = 0, s = 0, P random) it is *not* the frozen
  model (documented in APT: the memory tokens act from the first step);
- deep prompts: the joint sequence with M tokens per block (the adapter's loop is tested in tests/test_vilt.py);
- a batch equals its single examples; the VQA loss is ViLT's (BCE on soft scores, times the number of answers);
- trainable counts on the public ViLT-B/32: APT 12 x (M x 768 + 2 x 4 x 768 + 1) (with the release's pooler and
  modality-type embeddings besides), deep prompts 12 x M x 768, plus the head
  ``Linear(768, 1536) + LayerNorm(1536) + Linear(1536, answers)``.
Training through the engine on VQA data: tests/test_vqa_task.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.backbones import load_backbone
from vlprompt.tasks.batches import VQABatch

ANSWERS = ["yes", "no", "2", "red"]
QUESTIONS = ["how many stars?", "is the circle red?", "what color is the square?"]


@pytest.fixture(scope="module")
def vilt():
    return load_backbone("random:vilt-micro")


@pytest.fixture(scope="module")
def batch(vilt):
    tokens = vilt.tokenize(QUESTIONS)
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    pixels = torch.randn(len(QUESTIONS), 3, vilt.image_size, vilt.image_size, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([[0, 0, 1.0, 0], [2 / 3, 1 / 3, 0, 0], [0, 0, 0, 1.0]])
    return VQABatch(tokens.input_ids, mask, pixels, targets)


def _model(vilt, name, config=None, seed=0):
    torch.manual_seed(seed)
    return vlprompt.get_prompt_model(vilt, name, ANSWERS, config=config or {})


def _logits(method, batch):
    with torch.no_grad():
        return method.eval()(batch.input_ids, batch.attention_mask, batch.pixel_values)


def test_apt_native_changes_every_attention_output_by_its_definition(vilt, batch):
    method = _model(vilt, "apt_native", {"n_prompts": 6})
    with torch.no_grad():  # move B and s off their init so every term of the formula matters
        method.apt.up.normal_(0, 0.1)
        method.apt.log_scale.fill_(0.2)
    apt = method.apt

    def by_definition(j, x, attn_out):
        p, a, b = apt.prompts[j], apt.down[j], apt.up[j]
        keys = p + (p @ a.t()) @ b.t()
        s = torch.relu(x @ keys.t())
        return (attn_out + s.amax(-1, keepdim=True) * (s @ p)) * apt.log_scale[j].exp()

    with torch.no_grad():
        _, pooled = vilt.encode(batch.input_ids, batch.attention_mask, batch.pixel_values, block=by_definition)
        expected = method.head(pooled)
    torch.testing.assert_close(_logits(method, batch), expected, rtol=1e-5, atol=1e-6)


def test_at_the_released_init_apt_is_not_the_frozen_model(vilt, batch):
    """B = 0 makes K~ = P, but E = ReLU(X P^T) P is not zero: unlike LoRA, APT acts from its first step."""
    method = _model(vilt, "apt_native")
    assert torch.equal(method.apt.up, torch.zeros_like(method.apt.up)) and not method.apt.log_scale.any()
    bare = _model(vilt, "fusion_head")
    bare.head.load_state_dict(method.head.state_dict())
    assert not torch.allclose(_logits(method, batch), _logits(bare, batch), atol=1e-4)


@pytest.mark.parametrize("name", ["fusion_head", "apt_native", "deep_prompt_native"])
def test_a_batch_equals_its_single_examples(vilt, batch, name):
    method = _model(vilt, name, {} if name == "fusion_head" else {"n_prompts": 4})
    together = _logits(method, batch)
    alone = torch.cat([_logits(method, VQABatch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1],
                                                batch.pixel_values[i:i + 1], batch.targets[i:i + 1]))
                       for i in range(len(batch))])  # fmt: skip
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # patch order differs per example


def test_the_vqa_loss_is_vilts(vilt, batch):
    method = _model(vilt, "deep_prompt_native", {"n_prompts": 2})
    method.train()
    out = method.training_step(batch)
    logits = out.logits.detach()
    expected = F.binary_cross_entropy_with_logits(logits, batch.targets) * len(ANSWERS)
    torch.testing.assert_close(out.losses["main"].detach(), expected)


def test_trainable_counts_on_vilt_b32_follow_the_formulas():
    b32 = load_backbone("random:vilt-b32")
    head = 768 * 1536 + 1536 + 2 * 1536 + 1536 * len(ANSWERS) + len(ANSWERS)
    assert _model(b32, "fusion_head").num_trainable() == head
    apt_only = _model(b32, "apt_native", {"n_prompts": 200, "train_pooler": False, "train_token_types": False})
    assert apt_only.num_trainable() - head == 12 * (200 * 768 + 2 * 4 * 768 + 1) == 1_916_940  # APT's 1.92M
    released = _model(load_backbone("random:vilt-b32"), "apt_native", {"n_prompts": 200})
    extras = {n: p.numel() for n, p in released.prompt_parameters().items() if n.startswith("backbone.")}
    assert extras == {"backbone.model.embeddings.token_type_embeddings.weight": 2 * 768,  # the release's trainable set
                      "backbone.model.pooler.dense.weight": 768 * 768, "backbone.model.pooler.dense.bias": 768}
    assert released.num_trainable() == apt_only.num_trainable() + sum(extras.values())
    deep = _model(b32, "deep_prompt_native", {"n_prompts": 200})
    assert deep.num_trainable() - head == 12 * 200 * 768 == 1_843_200  # the paper's deep-prompt 1.84M


def test_training_on_a_classification_dataset_is_refused_naming_the_vqa_form(tmp_path):
    from vlprompt.engine.api import RunOptions, DataOptions

    with pytest.raises(vlprompt.data.DatasetError, match="is a vqa method; use a classification method .* or a vqa dataset \\(vqa:<a folder"):
        vlprompt.train(RunOptions(model="random:vilt-micro", method="apt_native", data=DataOptions("toy:shapes"),
                                  output=str(tmp_path / "run")), progress=False, log=lambda _: None)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_lora_and_full_tuning_train_the_encoders_own_weights(batch):
    vilt = load_backbone("random:vilt-micro")  # LoRA is injected into the backbone it is built on: a fresh one
    lora = _model(vilt, "lora_native")
    bare = _model(load_backbone("random:vilt-micro"), "fusion_head")
    bare.head.load_state_dict(lora.head.state_dict())
    torch.testing.assert_close(_logits(lora, batch), _logits(bare, batch))  # B = 0: the untouched encoder
    adapters = [n for n in lora.prompt_parameters() if n.startswith("backbone.")]
    assert adapters and all("lora_" in n and (".query." in n or ".value." in n) for n in adapters)
    assert len(adapters) == 2 * 2 * vilt.num_layers  # A and B of q and v in every block
    full = _model(load_backbone("random:vilt-micro"), "full_native")
    encoder = sum(p.numel() for p in full.backbone.model.parameters())
    assert full.num_trainable() == encoder + sum(p.numel() for p in full.head.parameters())


def test_lora_on_vilt_b32_is_the_papers_baseline_size():
    b32 = load_backbone("random:vilt-b32")
    head = 768 * 1536 + 1536 + 2 * 1536 + 1536 * len(ANSWERS) + len(ANSWERS)
    assert _model(b32, "lora_native").num_trainable() - head == 12 * 2 * 4 * (768 + 768) == 147_456  # the paper's 0.15M
