"""The BridgeTower adapter (backbones/bridgetower.py) on the micro preset: two streams of co-attention layers behind
the one-sequence fusion-encoder contract.

- without prompts it gives transformers' own ``BridgeTowerModel`` outputs exactly (both streams and the pooled
  output, which is 2C wide: ``pooled_width``);
- the attention-block site hands each of the 4 L attach points (self- and cross-attention of both streams) the
  stream's query-side input and the attention's ``dense`` output, and its return replaces that output before dropout,
  the residual and the LayerNorm; APT's module there is its formula, at every point;
- deep prompts as the APT release's METER baseline places them: keys and values of the other stream's
  cross-attention at one layer, half per stream, equal to a hand-written loop over the model's own layers;
- image types and offsets; a batch equals its single examples; saved folders load back (with a retrieval
  checkpoint's matching head), and bad folders are refused on one line;
- the methods of methods/fusion.py build on it and train only their own tensors.
"""
from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.backbones import BACKBONES, BackboneLoadError, FusionEncoderBackbone, load_backbone
from vlprompt.backbones.base import DeepPrompts
from vlprompt.backbones.bridgetower import BridgeTowerBackbone
from vlprompt.backbones.bridgetower_presets import (
    random_bridgetower,
    random_bridgetower_backbone,
    roberta_tokenizer,
    save_random_bridgetower,
)
from vlprompt.methods.apt import APTConfig, ApproximatedPrompts
from vlprompt.tasks.batches import VQABatch

TEXTS = ["a red circle left of a square", "how many stars?"]
ANSWERS = ["yes", "no", "2", "red"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro-sized products: a second thread only adds synchronisation, which dominates on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bt() -> BridgeTowerBackbone:
    return load_backbone("random:bridgetower-micro")


@pytest.fixture(scope="module")
def batch(bt):
    tokens = bt.tokenize(TEXTS)
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    pixels = torch.randn(len(TEXTS), 3, bt.image_size, bt.image_size, generator=torch.Generator().manual_seed(1))
    return tokens.input_ids, mask, pixels


def test_it_is_a_fusion_encoder_with_two_streams_of_attach_points(bt, batch):
    assert isinstance(bt, FusionEncoderBackbone) and BACKBONES["bridgetower"] is BridgeTowerBackbone
    assert bt.kind == "fusion_encoder" and {"attention_block", "joint_sequence", "fusion_weights"} <= bt.sites
    assert (bt.width, bt.pooled_width, bt.num_layers, bt.num_image_types) == (32, 64, 2, 1)
    points = bt.attach_points()
    text0, image0 = bt.model.cross_modal_text_layers[0], bt.model.cross_modal_image_layers[0]
    assert len(points) == 4 * bt.num_layers and points[:4] == [text0.attention.output, text0.crossattention.output,
                                                                image0.attention.output, image0.crossattention.output]
    hidden, mask = bt.embed(*batch)
    blocks = bt.num_layers * (batch[0].shape[1] + bt.image_tokens)
    assert hidden.shape == (2, blocks, bt.width) and mask.shape == (2, blocks) and bt.image_tokens == 17


@torch.no_grad()
def test_without_prompts_it_gives_the_models_own_outputs(bt, batch):
    ids, mask, pixels = batch
    sequence, pooled = bt.encode(ids, mask, pixels)
    out = bt.model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    text, image = bt.split_streams(sequence)
    torch.testing.assert_close(text, out.text_features, rtol=0, atol=0)
    torch.testing.assert_close(image, out.image_features, rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)
    assert pooled.shape == (2, bt.pooled_width)


class Recorder:
    """A block adapter that records what it is handed and what it returns; ``change(j, x, out)`` makes the return."""

    def __init__(self, change=None) -> None:
        self.change, self.seen = change, {}

    def __call__(self, j, x, attn_out):
        returned = None if self.change is None else self.change(j, x, attn_out)
        self.seen[j] = (x.detach().clone(), attn_out.detach().clone(), None if returned is None else returned.detach())
        return returned


def _capture(bt):
    """Hooks recording, per attach point, the attention's query-side input, its context (before ``dense``) and the
    output module's result (after dropout, residual and LayerNorm), independently of the adapter's hooks."""
    got = {"query": {}, "context": {}, "output": {}}
    handles = []
    for j, point in enumerate(bt.attach_points()):
        attention = next(m for m in bt.model.modules() if getattr(m, "output", None) is point)
        handles.append(attention.register_forward_pre_hook(
            lambda m, args, kwargs, j=j: got["query"].__setitem__(j, (args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True))  # fmt: skip
        handles.append(attention.self.register_forward_hook(
            lambda m, a, out, j=j: got["context"].__setitem__(j, out[0])))  # fmt: skip
        handles.append(point.register_forward_hook(lambda m, a, out, j=j: got["output"].__setitem__(j, out)))
    return got, handles


@torch.no_grad()
def test_the_block_site_sees_each_attentions_query_input_and_dense_output(bt, batch):
    plain = bt.encode(*batch)
    got, handles = _capture(bt)
    try:
        recorder = Recorder()
        recorded = bt.encode(*batch, block=recorder)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(recorded[0], plain[0]) and torch.equal(recorded[1], plain[1])  # None changes nothing
    assert sorted(recorder.seen) == list(range(4 * bt.num_layers))
    for j, point in enumerate(bt.attach_points()):
        x, attn_out, _ = recorder.seen[j]
        stream_length = batch[0].shape[1] if j % 4 < 2 else bt.image_tokens  # text points, then image points
        assert x.shape == (2, stream_length, bt.width)
        torch.testing.assert_close(x, got["query"][j], rtol=0, atol=0)
        torch.testing.assert_close(attn_out, point.dense(got["context"][j]), rtol=0, atol=0)
    unchanged = bt.encode(*batch, block=Recorder(lambda j, x, out: out))  # returning its input changes nothing
    assert torch.equal(unchanged[1], plain[1])
    for j in (0, 3, 4 * bt.num_layers - 1):  # text self-, image cross-attention, the last point
        ramp = torch.linspace(-1, 1, bt.width)  # varies over channels: a constant would vanish in the LayerNorm
        shifted = bt.encode(*batch, block=Recorder(lambda i, x, out, j=j: out + 0.5 * ramp if i == j else None))
        assert not torch.allclose(shifted[1], plain[1])


@torch.no_grad()
def test_apt_is_its_definition_at_every_attach_point(bt, batch):
    torch.manual_seed(3)
    apt = ApproximatedPrompts(len(bt.attach_points()), bt.width, APTConfig(n_prompts=5, rank=4))
    apt.up.normal_(0, 0.1)  # off the released init (B = 0, s = 0) so every term of the formula matters
    apt.log_scale.normal_(0, 0.2)
    got, handles = _capture(bt)
    recorder = Recorder(apt)
    try:
        sequence, pooled = bt.encode(*batch, block=recorder)
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.allclose(pooled, bt.encode(*batch)[1])
    for j, point in enumerate(bt.attach_points()):
        x, attn_out, returned = recorder.seen[j]
        p, a, b = apt.prompts[j], apt.down[j], apt.up[j]
        keys = p + (p @ a.t()) @ b.t()
        s = torch.relu(x @ keys.t())
        expected = (attn_out + s.amax(-1, keepdim=True) * (s @ p)) * apt.log_scale[j].exp()
        torch.testing.assert_close(returned, expected, rtol=1e-5, atol=1e-6)
        # the change is made before dropout (off in eval), the residual and the LayerNorm
        torch.testing.assert_close(got["output"][j], point.LayerNorm(returned + x), rtol=1e-5, atol=1e-6)
    zero = ApproximatedPrompts(len(bt.attach_points()), bt.width, APTConfig(n_prompts=5))
    zero.prompts.zero_()  # no memory: K~ = 0, so E = 0 and O' = O exp(0) = O
    torch.testing.assert_close(bt.encode(*batch, block=zero)[1], bt.encode(*batch)[1], rtol=0, atol=0)


def _deep_by_hand(bt, ids, mask, pixels, tokens):
    """The release's METER deep prompts over the model's own layers: layer l's first half of tokens joins the text
    stream as keys of the image stream's cross-attention, the second half the image stream's for the text stream."""
    model = bt.model
    hidden, joint_mask = bt.embed(ids, mask, pixels)
    t, i = ids.shape[1], bt.image_tokens
    blocks = hidden.split(t + i, dim=1)
    ext = bt._key_mask(hidden, mask)
    text = image = None
    for l in range(bt.num_layers):
        text_in, image_in = blocks[l][:, :t], blocks[l][:, t:]
        if l == 0:
            text, image = text_in, image_in
        else:
            text = model.cross_modal_text_link_tower[l - 1](text_in, text, ext)
            image = model.cross_modal_image_link_tower[l - 1](image_in, image, None)
        if l < len(tokens):
            half = tokens[l].shape[0] // 2
            text_prompts = tokens[l][:half].expand(len(ids), -1, -1)
            image_prompts = tokens[l][half:].expand(len(ids), -1, -1)
            keys_mask = bt._key_mask(hidden, torch.cat([mask, torch.ones(len(ids), half, dtype=mask.dtype)], 1))
            new_text = model.cross_modal_text_layers[l](text, torch.cat([image, image_prompts], 1), attention_mask=ext)
            new_image = model.cross_modal_image_layers[l](image, torch.cat([text, text_prompts], 1),
                                                          encoder_attention_mask=keys_mask)  # fmt: skip
        else:
            new_text = model.cross_modal_text_layers[l](text, image, attention_mask=ext)
            new_image = model.cross_modal_image_layers[l](image, text, encoder_attention_mask=ext)
        text, image = new_text[0], new_image[0]
    return torch.cat([text, image], dim=1)


@torch.no_grad()
def test_deep_prompts_are_the_releases_keys_of_the_other_streams_cross_attention(bt, batch):
    ids, mask, pixels = batch
    plain_sequence, plain = bt.encode(ids, mask, pixels)
    empty_sequence, empty = bt.encode(ids, mask, pixels, prompts=DeepPrompts([]))
    assert torch.equal(empty, plain) and torch.equal(empty_sequence, plain_sequence)
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randn(6, bt.width, generator=g) for _ in range(bt.num_layers)]
    sequence, pooled = bt.encode(ids, mask, pixels, prompts=DeepPrompts(tokens))
    assert sequence.shape == plain_sequence.shape and not torch.allclose(pooled, plain)
    torch.testing.assert_close(sequence, _deep_by_hand(bt, ids, mask, pixels, tokens), rtol=1e-5, atol=1e-6)
    shallow = bt.encode(ids, mask, pixels, prompts=DeepPrompts(tokens[:1]))[0]  # layer 0 only: nothing carries over
    torch.testing.assert_close(shallow, _deep_by_hand(bt, ids, mask, pixels, tokens[:1]), rtol=1e-5, atol=1e-6)
    per_sequence = [t.expand(len(ids), -1, -1) for t in tokens]  # (B, N, C) tokens: the same as shared ones
    torch.testing.assert_close(bt.encode(ids, mask, pixels, prompts=DeepPrompts(per_sequence))[0], sequence)
    with pytest.raises(ValueError, match="co-attention prompts given for 3 layers but the co-attention tower has 2"):
        bt.encode(ids, mask, pixels, prompts=DeepPrompts(tokens + tokens[:1]))
    with pytest.raises(ValueError, match="even number of tokens per layer, got 5"):
        bt.encode(ids, mask, pixels, prompts=DeepPrompts([t[:5] for t in tokens]))


@torch.no_grad()
def test_a_batch_equals_its_single_examples_with_apt_and_deep_prompts(bt, batch):
    ids, mask, pixels = batch
    torch.manual_seed(4)
    apt = ApproximatedPrompts(len(bt.attach_points()), bt.width, APTConfig(n_prompts=4))
    prompts = DeepPrompts([torch.randn(4, bt.width) for _ in range(bt.num_layers)])
    for sites in ({"block": apt}, {"prompts": prompts}):
        together = bt.encode(ids, mask, pixels, **sites)[1]
        alone = torch.cat([bt.encode(ids[k:k + 1], mask[k:k + 1], pixels[k:k + 1], **sites)[1] for k in range(2)])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_image_types_and_the_type_offset_reach_every_bridge(bt, batch):
    plain = bt.encode(*batch)[1]
    assert torch.equal(bt.encode(*batch, image_index=1)[1], plain)  # one image type: the second image shares it
    assert torch.equal(bt.encode(*batch, image_type_offset=torch.zeros(bt.width))[1], plain)
    offset = torch.linspace(-0.5, 0.5, bt.width)
    shifted = bt.encode(*batch, image_type_offset=offset)[1]
    types = bt.model.token_type_embeddings.weight
    original = types.clone()
    try:  # the offset is the image type's stand-in: the same as moving the image type's embedding by it
        types[1] += offset
        torch.testing.assert_close(shifted, bt.encode(*batch)[1], rtol=1e-5, atol=1e-6)
    finally:
        types.copy_(original)
    assert not torch.allclose(shifted, plain)


def test_a_saved_folder_loads_back_and_bad_folders_are_refused_on_one_line(bt, batch, tmp_path):
    from transformers import BridgeTowerForImageAndTextRetrieval

    from vlprompt.backbones.vilt_presets import save_random_vilt

    loaded = load_backbone(str(save_random_bridgetower(tmp_path / "bt")))
    assert isinstance(loaded, BridgeTowerBackbone) and loaded.identity["config_hash"] == bt.identity["config_hash"]
    assert loaded.matching_head() is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(*batch)[1], bt.encode(*batch)[1], rtol=0, atol=0)
    other = random_bridgetower_backbone("bridgetower-micro", num_attention_heads=4)  # another cross-modal layout
    assert other.identity["config_hash"] != bt.identity["config_hash"]

    retrieval = load_backbone(str(save_random_bridgetower(tmp_path / "itm", with_itm_head=True)))
    head = retrieval.matching_head()
    assert (head.in_features, head.out_features) == (retrieval.pooled_width, 1) and not head.weight.requires_grad
    theirs = BridgeTowerForImageAndTextRetrieval.from_pretrained(tmp_path / "itm").eval()
    with torch.no_grad():
        logits = theirs(input_ids=batch[0], attention_mask=batch[1], pixel_values=batch[2]).logits
        torch.testing.assert_close(head(retrieval.encode(*batch)[1]).squeeze(1), logits[:, 1] - logits[:, 0])

    folder = save_random_bridgetower(tmp_path / "no_tokenizer")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(BackboneLoadError, match="RoBERTa tokenizer beside") as err:
        load_backbone(str(folder))
    assert "\n" not in str(err.value)
    vilt_folder = save_random_vilt(tmp_path / "vilt")
    with pytest.raises(BackboneLoadError, match="holds a 'vilt' model, not BridgeTower") as err:
        BridgeTowerBackbone.from_pretrained(vilt_folder)
    assert "\n" not in str(err.value)
    with pytest.raises(BackboneLoadError, match="could not read a BridgeTower config") as err:
        BridgeTowerBackbone.from_pretrained(tmp_path / "missing")
    assert "\n" not in str(err.value)


def test_the_public_base_architecture_and_the_released_trainable_counts():
    from transformers import BridgeTowerConfig, BridgeTowerModel

    with torch.device("meta"):  # the preset's architecture without allocating its 326M weights
        model = random_bridgetower("bridgetower-base")
    base = BridgeTowerBackbone(model, roberta_tokenizer(), "random:bridgetower-base")
    assert (base.width, base.pooled_width, base.num_layers, base.image_size, base.max_text_length) == \
        (768, 1536, 6, 288, 50)  # fmt: skip
    assert base.image_tokens == 325 and len(base.attach_points()) == 24 and len(base.tokenizer) <= 50265
    with torch.device("meta"):
        assert base.num_parameters() == sum(p.numel() for p in BridgeTowerModel(BridgeTowerConfig()).parameters())

    def extra(name, config):
        method = vlprompt.get_prompt_model(base, name, ANSWERS, config=config)
        return method.num_trainable() - sum(p.numel() for p in method.head.parameters())

    # METER's APT in the release: 24 modules of M = 200: 3.83M; the release also trains poolers and token types
    assert extra("apt_native", {"n_prompts": 200, "train_pooler": False, "train_token_types": False}) == \
        24 * (200 * 768 + 2 * 4 * 768 + 1) == 3_833_880  # fmt: skip
    assert extra("apt_native", {"n_prompts": 200}) == 3_833_880 + 2 * (768 * 768 + 768) + 2 * 768
    # the release's deep prompts: 200 per stream per layer
    assert extra("deep_prompt_native", {"n_prompts": 400}) == 6 * 400 * 768 == 1_843_200


# ----------------------------------------------------------------------------------------------- methods on it
def _vqa_batch(bt, batch):
    targets = torch.tensor([[0, 0, 1.0, 0], [2 / 3, 1 / 3, 0, 0]])
    return VQABatch(batch[0], batch[1], batch[2], targets)


@pytest.mark.parametrize("name", ["fusion_head", "apt_native", "deep_prompt_native", "lora_native", "full_native"])
def test_the_fusion_methods_build_on_it_and_train_only_their_own_tensors(batch, name):
    bt = load_backbone("random:bridgetower-micro")  # LoRA and full tuning change the backbone: a fresh one
    torch.manual_seed(0)
    method = vlprompt.get_prompt_model(bt, name, ANSWERS, config={"n_prompts": 4} if "prompt" in name or "apt" in
                                       name else {})  # fmt: skip
    own = method.prompt_parameters()
    encoder = {n for n in own if n.startswith("backbone.")}
    expected = {
        "fusion_head": set(),
        "apt_native": {f"backbone.model.{n}" for n in bt.named_weights(["pooler", "token_types"])},
        "deep_prompt_native": set(),
        "lora_native": {n for n in encoder if "lora_" in n},
        "full_native": {f"backbone.model.{n}" for n in bt.named_weights()},
    }[name]
    assert encoder == expected
    if name == "apt_native":
        assert method.apt.prompts.shape == (4 * bt.num_layers, 4, bt.width)
    if name == "deep_prompt_native":
        assert method.prompts.shape == (bt.num_layers, 4, bt.width)
    if name == "lora_native":  # A and B of q and v in the self- and cross-attention of both streams' layers
        assert len(encoder) == 2 * 2 * 2 * 2 * bt.num_layers
        assert {n.split(".")[2].rsplit("_", 1)[0] for n in encoder} == {"cross_modal_text", "cross_modal_image"}
    assert method.head.layers[0].in_features == bt.pooled_width  # the head reads BridgeTower's 2C pooled output
    method.train()
    out = method.training_step(_vqa_batch(bt, batch))
    out.losses["main"].backward()
    mine = {id(p) for p in own.values()}
    stray = [n for n, p in method.named_parameters() if p.grad is not None and id(p) not in mine]
    assert not stray and any(p.grad is not None for p in own.values())


def test_without_memory_tokens_apt_native_is_the_head_on_the_frozen_encoder(bt, batch):
    method = vlprompt.get_prompt_model(bt, "apt_native", ANSWERS, config={"n_prompts": 0})
    assert method.head.layers[0].in_features == bt.pooled_width  # the head reads BridgeTower's 2C pooled output
    bare = vlprompt.get_prompt_model(bt, "fusion_head", ANSWERS)
    bare.head.load_state_dict(method.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(*batch), bare.eval()(*batch))


@torch.no_grad()
def test_lora_starts_as_the_untouched_encoder(batch):
    bt = load_backbone("random:bridgetower-micro")
    plain = bt.encode(*batch)[1]
    adapters = bt.add_lora(4, 8.0, 0.0, ("q", "k", "v", "o"))
    assert len(adapters) == 2 * 4 * 2 * 2 * bt.num_layers  # A, B x 4 projections x 2 attentions x 2 streams
    torch.testing.assert_close(bt.encode(*batch)[1], plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        bt.add_lora(4, 8.0, 0.0)
