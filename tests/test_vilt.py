"""The ViLT adapter (backbones/vilt.py), the first fusion encoder: the contract methods will be written against.

- without prompts it gives transformers' own ``ViltModel`` outputs exactly (same patch order);
- every forward is reproducible and leaves the global random stream untouched (ViLT draws its patch order);
- the attention-block site hands each block's LayerNorm'd input and attention output to the adapter, and a change
  there changes the model; returning nothing changes nothing;
- deep prompts in the joint sequence: appended at layer 0, replaced at later layers, dropped from the output;
  zero prompts change nothing; the result equals a hand-written loop over the model's own layers;
- the public ViLT-B/32 architecture (``random:vilt-b32``) and a saved folder load through ``load_backbone``.
"""
from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.backbones import FusionEncoderBackbone, load_backbone
from vlprompt.backbones.base import DeepPrompts
from vlprompt.backbones.vilt import PATCH_ORDER_SEED, ViltBackbone
from vlprompt.backbones.vilt_presets import save_random_vilt

TEXTS = ["a red circle left of a square", "two stars"]


@pytest.fixture(scope="module")
def vilt():
    return load_backbone("random:vilt-micro")


@pytest.fixture(scope="module")
def batch(vilt):
    tokens = vilt.tokenize(TEXTS)
    mask = (torch.arange(tokens.input_ids.shape[1]) < tokens.lengths.unsqueeze(1)).long()
    pixels = torch.randn(len(TEXTS), 3, vilt.image_size, vilt.image_size, generator=torch.Generator().manual_seed(1))
    return tokens.input_ids, mask, pixels


def test_it_is_a_fusion_encoder_with_the_sites_apt_and_deep_prompts_need(vilt):
    assert isinstance(vilt, FusionEncoderBackbone) and isinstance(vilt, ViltBackbone)
    assert vilt.kind == "fusion_encoder" and {"attention_block", "joint_sequence"} <= vilt.sites
    assert len(vilt.attach_points()) == vilt.num_layers == 2 and vilt.width == 32


@torch.no_grad()
def test_without_prompts_it_gives_the_models_own_outputs(vilt, batch):
    ids, mask, pixels = batch
    sequence, pooled = vilt.encode(ids, mask, pixels)
    torch.manual_seed(PATCH_ORDER_SEED)  # the patch order the adapter uses
    out = vilt.model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.testing.assert_close(vilt.final_sequence(sequence), out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)


@torch.no_grad()
def test_forwards_are_reproducible_and_leave_the_random_stream_alone(vilt, batch):
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    first = vilt.encode(*batch)[1]
    second = vilt.encode(*batch)[1]
    assert torch.equal(first, second) and torch.equal(torch.rand(3), expected_next)


class Recorder:
    """An attention-block adapter that records what it is handed and adds ``shift`` at one layer."""

    def __init__(self, layer: int = -1, shift: float = 0.0) -> None:
        self.layer, self.shift, self.seen = layer, shift, {}

    def __call__(self, j, x, attn_out):
        self.seen[j] = (x.detach().clone(), attn_out.detach().clone())
        if j != self.layer:
            return None
        # a change that varies over the channels (a constant one would vanish in the next LayerNorm)
        return attn_out + self.shift * torch.linspace(-1, 1, attn_out.shape[-1])


@torch.no_grad()
def test_the_block_site_sees_each_blocks_normed_input_and_attention_output(vilt, batch):
    layers = vilt.model.encoder.layer
    inputs = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, j=j: inputs.__setitem__(j, args[0].clone()))
               for j, layer in enumerate(layers)]  # fmt: skip
    recorder = Recorder()
    try:
        plain = vilt.encode(*batch)[1]
        recorded = vilt.encode(*batch, block=recorder)[1]
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(plain, recorded)  # an adapter returning nothing changes nothing
    assert sorted(recorder.seen) == [0, 1]
    for j, layer in enumerate(layers):
        x, attn_out = recorder.seen[j]
        normed = layer.layernorm_before(inputs[j])
        torch.testing.assert_close(x, normed)
        mask = vilt._attention_mask(inputs[j], torch.cat([batch[1], torch.ones(2, inputs[j].shape[1] - batch[1].shape[1],
                                                                                 dtype=torch.long)], dim=1))  # fmt: skip
        torch.testing.assert_close(attn_out, layer.attention(normed, mask)[0])
    shifted = vilt.encode(*batch, block=Recorder(layer=1, shift=0.5))[1]
    assert not torch.allclose(shifted, plain)


@torch.no_grad()
def test_deep_prompts_join_the_sequence_and_leave_it_at_the_end(vilt, batch):
    ids, mask, pixels = batch
    plain_sequence, plain = vilt.encode(ids, mask, pixels)
    empty_sequence, empty = vilt.encode(ids, mask, pixels, prompts=DeepPrompts([]))
    assert torch.equal(empty, plain)
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randn(3, vilt.width, generator=g), torch.randn(3, vilt.width, generator=g)]
    sequence, pooled = vilt.encode(ids, mask, pixels, prompts=DeepPrompts(tokens))
    assert sequence.shape == plain_sequence.shape and not torch.allclose(pooled, plain)
    # by hand: append layer 0's tokens (attended by all), replace them before layer 1, drop them at the end
    hidden, joint_mask = vilt.embed(ids, mask, pixels)
    n = hidden.shape[1]
    hidden = torch.cat([hidden, tokens[0].expand(len(ids), -1, -1)], dim=1)
    attention_mask = vilt._attention_mask(hidden, torch.cat([joint_mask, torch.ones(len(ids), 3, dtype=torch.long)], 1))
    for j, layer in enumerate(vilt.model.encoder.layer):
        if j == 1:
            hidden = torch.cat([hidden[:, :n], tokens[1].expand(len(ids), -1, -1)], dim=1)
        out = layer(hidden, attention_mask)
        hidden = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(sequence, hidden[:, :n])
    # shallow prompts (layer 0 only) stay in the sequence through every layer
    shallow = vilt.encode(ids, mask, pixels, prompts=DeepPrompts([tokens[0]]))[1]
    assert not torch.allclose(shallow, pooled)
    with pytest.raises(ValueError, match="joint prompts given for 3 layers but the joint tower has 2"):
        vilt.encode(ids, mask, pixels, prompts=DeepPrompts(tokens + tokens[:1]))


def test_the_public_vilt_b32_architecture_and_a_saved_folder_load(tmp_path):
    from transformers import ViltConfig, ViltModel

    b32 = load_backbone("random:vilt-b32")
    assert (b32.width, b32.num_layers, b32.image_size, b32.max_text_length) == (768, 12, 384, 40)
    assert b32.num_parameters() == sum(p.numel() for p in ViltModel(ViltConfig()).parameters())
    folder = save_random_vilt(tmp_path / "vilt")
    loaded = load_backbone(str(folder))
    assert isinstance(loaded, ViltBackbone) and loaded.identity["config_hash"] == \
        load_backbone("random:vilt-micro").identity["config_hash"]  # fmt: skip
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(vlprompt.backbones.BackboneLoadError, match="reads ordinary words as unknown"):
        load_backbone(str(folder))


@torch.no_grad()
def test_apt_on_every_block_costs_its_formula_in_flops(vilt, batch):
    """APT's module (methods/apt.py) on the attention-block site: per block `X K~^T` and `S P` (2 T M C FLOPs each)
    plus the low-rank keys (2 M C r twice); what benchmarks/fusion_cost.py reports for ViLT-B/32."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlprompt.methods.apt import APTConfig, ApproximatedPrompts

    def flops(**sites):
        counter = FlopCounterMode(display=False)
        with counter:
            vilt.encode(*batch, **sites)
        return counter.get_total_flops()

    m, r = 5, 4
    apt = ApproximatedPrompts(vilt.num_layers, vilt.width, APTConfig(n_prompts=m, rank=r))
    tokens = vilt.embed(*batch)[0].shape[1]
    b, c, layers = len(TEXTS), vilt.width, vilt.num_layers
    assert flops(block=apt) - flops() == layers * (2 * 2 * b * tokens * m * c + 2 * 2 * m * c * r)
    assert sum(p.numel() for p in apt.parameters()) == layers * (m * c + 2 * r * c + 1)


def _keys_values_only_block(layer, hidden, prompts, key_mask, heads):
    """One ViLT block as the APT release's deep-prompt baseline runs it: the prompts join the block's LayerNorm and
    give keys and values only (no query rows, no output, no feed-forward)."""
    batch, length, width = hidden.shape
    normed = layer.layernorm_before(torch.cat([hidden, prompts.expand(batch, -1, -1)], dim=1))
    attention = layer.attention.attention

    def split(x):
        return x.view(batch, -1, heads, width // heads).transpose(1, 2)

    q, k, v = split(attention.query(normed[:, :length])), split(attention.key(normed)), split(attention.value(normed))
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    hidden = hidden + layer.attention.output.dense(context)
    return layer.output(layer.intermediate(layer.layernorm_after(hidden)), hidden)


def test_deep_prompts_give_the_release_keys_and_values_only_outputs(vilt, batch):
    """What docs/benchmarks/fusion_cost.md states: the joint_sequence site computes the prompts' queries and
    feed-forward too, but the text and image tokens come out as in the release's placement."""
    ids, mask, pixels = batch
    hidden, joint_mask = vilt.embed(ids, mask, pixels)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randn(3, vilt.width, generator=generator) for _ in range(vilt.num_layers)]
    with torch.no_grad():
        ours = vilt.run_layers(hidden, joint_mask, prompts=DeepPrompts(prompts))
        expected = hidden
        key_mask = torch.cat([joint_mask, joint_mask.new_ones(len(ids), 3)], dim=1)
        for layer, layer_prompts in zip(vilt.model.encoder.layer, prompts):
            expected = _keys_values_only_block(layer, expected, layer_prompts, key_mask,
                                               vilt.model.config.num_attention_heads)  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
