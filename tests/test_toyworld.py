"""The procedural toy world (vlprompt.toyworld): determinism, rendering, captions, holdout, suite layout."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vlprompt.data import few_shot
from vlprompt.toyworld import (
    BACKGROUNDS,
    COLOURS,
    DOMAINS,
    FILLS,
    HOLDOUT,
    SHAPES,
    SIZES,
    SUITE,
    PretrainingCorpus,
    boxes,
    caption,
    coco_detection,
    load_pretraining_cache,
    load_toy,
    materialize,
    materialize_suite,
    pretraining_pairs,
    qa,
    render,
    render_array,
    resolve_toy_name,
    sample_scene,
    toy_scene,
    write_pretraining_cache,
)
from vlprompt.toyworld.captions import NUMBER_WORDS, plural

SMALL = (2, 1, 2)  # train / val / test per class for quick materialization


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --------------------------------------------------------------------------------------------------- world
def test_same_seed_same_scene_pixels_and_caption():
    for seed in (0, 7):
        s1, s2 = sample_scene(seed), sample_scene(seed)
        assert s1 == s2
        for domain in DOMAINS:
            assert np.array_equal(render_array(s1, 48, domain), render_array(s2, 48, domain))
        assert caption(s1, seed) == caption(s2, seed)
        assert qa(s1, seed) == qa(s2, seed)
    scenes = [sample_scene(seed) for seed in range(20)]
    assert len({repr(s) for s in scenes}) == 20
    assert len({render_array(s).tobytes() for s in scenes}) == 20
    assert len({caption(scenes[0], seed) for seed in range(20)}) > 5


def test_every_attribute_renders():
    rng = np.random.default_rng(0)

    def check(scene, domain="clean", size=48):
        img = render_array(scene, size, domain)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        empty = render_array(replace(scene, objects=()), size, domain)
        assert _diff(img, empty) > 40, (scene, domain)

    for shape in SHAPES:
        check(sample_scene(rng, "single", shape=shape, size="medium"))
    for colour in COLOURS:
        check(sample_scene(rng, "single", colour=colour, background=("white", "grey")))
    for fill in FILLS:
        check(sample_scene(rng, "single", fill=fill, size="large"))
    for size in SIZES:
        check(sample_scene(rng, "single", size=size))
    for bg in BACKGROUNDS:
        check(sample_scene(rng, "single", background=bg, colour=("red", "blue", "yellow")))
    for n in range(1, 6):
        scene = sample_scene(rng, "count", count=n)
        assert scene.count == n
        check(scene)
    for kind in ("pair", "multi"):
        check(sample_scene(rng, kind))
    for domain in DOMAINS:
        check(sample_scene(rng, "single", size="large", background="white"), domain)
    for px in (32, 48, 64):
        check(sample_scene(rng, "single"), size=px)
    assert isinstance(render(sample_scene(1)), Image.Image)


def test_fills_and_colours_are_distinguishable():
    rng = np.random.default_rng(1)
    base = sample_scene(rng, "single", size="large", background="white", position="center", colour="blue")
    o = base.objects[0]
    imgs = {f: render_array(replace(base, objects=(replace(o, fill=f),))) for f in FILLS}
    for a in FILLS:
        for b in FILLS:
            if a < b:
                assert _diff(imgs[a], imgs[b]) > 30, (a, b)
    red = render_array(replace(base, objects=(replace(o, fill="solid", colour="red", rgb=COLOURS["red"]),)))
    crimson = render_array(replace(base, objects=(replace(o, fill="solid", colour="crimson", rgb=COLOURS["crimson"]),)))
    assert _diff(red, crimson) > 40


def test_scene_respects_constraints_and_relations():
    rng = np.random.default_rng(2)
    for _ in range(50):
        s = sample_scene(rng, "pair")
        a, b = s.objects
        if s.relation == "left of":
            assert a.x < b.x - 0.15
        elif s.relation == "right of":
            assert a.x > b.x + 0.15
        elif s.relation == "above":
            assert a.y < b.y - 0.15
        else:
            assert a.y > b.y + 0.15
        assert a.shape != b.shape
    for _ in range(20):
        s = sample_scene(rng, "count", count=5)
        assert len({(o.shape, o.colour) for o in s.objects}) == 1
        for i, p in enumerate(s.objects):  # no overlaps
            for q in s.objects[i + 1:]:
                assert (p.x - q.x) ** 2 + (p.y - q.y) ** 2 >= (p.radius + q.radius) ** 2
    with pytest.raises(ValueError):
        sample_scene(0, "single", shape="blob")
    colour, shape = sorted(HOLDOUT.pairs)[0]
    with pytest.raises(ValueError):
        sample_scene(0, "single", colour=colour, shape=shape, holdout=HOLDOUT)


def test_boxes_inside_image_and_cover_the_object():
    rng = np.random.default_rng(3)
    for i in range(60):
        scene = sample_scene(rng, background="white")
        size = (32, 48, 64)[i % 3]
        bs = boxes(scene, size)
        assert len(bs) == scene.count
        for b, o in zip(bs, scene.objects):
            x, y, w, h = b["bbox"]
            assert b["category"] == o.shape
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size + 1e-6 and y + h <= size + 1e-6
        if scene.kind == "single":  # every changed pixel lies in the box (1 px of anti-aliasing slack)
            img = render_array(scene, size).astype(int)
            empty = render_array(replace(scene, objects=()), size).astype(int)
            ys, xs = np.nonzero(np.abs(img - empty).max(2) > 8)
            x, y, w, h = bs[0]["bbox"]
            assert xs.min() >= x - 1.5 and xs.max() <= x + w + 0.5 and ys.min() >= y - 1.5 and ys.max() <= y + h + 0.5
    coco = coco_detection([sample_scene(0, "multi")], ["a.png"], 48)
    assert {"images", "annotations", "categories"} <= coco.keys() and coco["annotations"][0]["category_id"] >= 1


# ------------------------------------------------------------------------------------------------- captions
def test_captions_mention_class_attributes():
    rng = np.random.default_rng(4)
    n = 300
    hits = {"shape": 0, "colour": 0, "count": 0, "pair": 0}
    for _ in range(n):
        s = sample_scene(rng, "single")
        text = caption(s, rng)
        hits["shape"] += s.objects[0].shape in text
        hits["colour"] += s.objects[0].colour in text
        c = sample_scene(rng, "count")
        hits["count"] += NUMBER_WORDS[c.count] in caption(c, rng).split() or str(c.count) in caption(c, rng)
        p = sample_scene(rng, "pair")
        t = caption(p, rng)
        hits["pair"] += all(o.shape in t for o in p.objects)
    assert hits["shape"] / n > 0.75 and hits["colour"] / n > 0.55, hits
    assert hits["count"] / n > 0.6 and hits["pair"] / n > 0.6, hits


def test_qa_answers_follow_the_scene():
    scene = sample_scene(5, "count", count=3)
    pairs = dict(qa(scene, 0, None))
    shape = scene.objects[0].shape
    assert pairs[f"how many {plural(shape)} are there?"] == "three"
    single = sample_scene(6, "single")
    o = single.objects[0]
    answers = dict(qa(single, 0, None))
    assert answers[f"what colour is the {o.shape}?"] == o.colour
    assert answers[f"where is the {o.shape}?"] == o.position
    assert len(qa(single, 1, 3)) == 3


# ------------------------------------------------------------------------------------------------- corpus
def test_pretraining_corpus_excludes_the_holdout():
    corpus = PretrainingCorpus(3000, seed=0)
    seen_pairs, domains = set(), set()
    for i in range(len(corpus)):
        scene, domain, _ = corpus._draw(i)
        seen_pairs |= {(o.colour, o.shape) for o in scene.objects}
        domains.add(domain)
    assert not seen_pairs & HOLDOUT.pairs
    assert not domains & set(HOLDOUT.domains)
    assert len(seen_pairs) > 120  # the rest of the world is covered
    # held-out pairs' colours and shapes still occur, just not together
    held_colours = {c for c, _ in HOLDOUT.pairs}
    held_shapes = {s for _, s in HOLDOUT.pairs}
    assert held_colours <= {c for c, _ in seen_pairs} and held_shapes <= {s for _, s in seen_pairs}
    texts = [corpus.caption(i) for i in range(300)]
    assert not any("sketch" in t or "inverted" in t or "negative" in t for t in texts)
    pairs = list(pretraining_pairs(4, seed=1, size=32))
    assert len(pairs) == 4 and pairs[0][0].size == (32, 32) and isinstance(pairs[0][1], str)
    assert pairs[2][1] == PretrainingCorpus(4, seed=1, size=32)[2][1]  # streaming == random access
    with pytest.raises(ValueError):
        PretrainingCorpus(10, domains={"clean": 1.0, "sketch": 0.5})


def test_hard_negative_groups_differ_in_one_attribute_only():
    corpus = PretrainingCorpus(400, seed=0, group_size=4)
    fields = ("shape", "colour", "fill", "x", "y")
    for g in range(100):
        members = [corpus._draw(4 * g + j) for j in range(4)]
        scenes = [m[0] for m in members]
        assert len({m[1] for m in members}) == 1  # one domain per group
        assert len({(s.kind, s.background, s.bg_rgb, s.seed, s.count) for s in scenes}) == 1
        differing = {f for f in fields if len({getattr(s.objects[0], f) for s in scenes}) > 1}
        assert differing and (differing <= {"x", "y"} or len(differing) == 1), differing
        assert all(HOLDOUT.allows_scene(s) for s in scenes)
    assert np.array_equal(corpus[9][0], PretrainingCorpus(400, seed=0, group_size=4)[9][0])
    with pytest.raises(ValueError, match="group_size"):
        PretrainingCorpus(10, group_size=0)


def test_pretraining_cache_roundtrip(tmp_path):
    folder = write_pretraining_cache(tmp_path / "corpus", 12, seed=3, size=32)
    images, texts = load_pretraining_cache(folder)
    corpus = PretrainingCorpus(12, seed=3, size=32)
    assert images.shape == (12, 32, 32, 3) and len(texts) == 12
    assert np.array_equal(images[5], corpus[5][0]) and texts[5] == corpus[5][1]
    stamp = (folder / "images.npy").stat().st_mtime_ns
    write_pretraining_cache(tmp_path / "corpus", 12, seed=3, size=32)  # reused, not rewritten
    assert (folder / "images.npy").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------------- suite
def test_every_suite_class_produces_its_attribute():
    for name, spec in SUITE.items():
        assert len(spec.classnames) == len(spec.class_kwargs) == len(set(spec.classnames)) >= 3, name
        assert "{}" in spec.template
        for label, cname in enumerate(spec.classnames):
            scene, domain = toy_scene(name, "test", label, 0)
            assert domain in spec.domains
            o = scene.objects[0]
            kw = spec.class_kwargs[label]
            for key in ("shape", "colour", "fill", "size", "position"):
                if key in kw:
                    assert getattr(o, key) == kw[key], (name, cname)
            if "count" in kw:
                assert scene.count == kw["count"]
            if "relation" in kw:
                assert scene.relation == kw["relation"] and (o.shape, scene.objects[1].shape) == kw["pair"]
            if "background" in kw:
                assert scene.background == kw["background"]
    combo = SUITE["combo"]
    assert len(combo.classnames) >= 100
    held_out = sum((kw["colour"], kw["shape"]) in HOLDOUT.pairs for kw in combo.class_kwargs)
    assert held_out >= 0.15 * len(combo.classnames)  # compositions never seen in pretraining
    assert len([s for s in SUITE.values() if s.source is None]) >= 8


def test_materialize_coop_layout_and_load(tmp_path):
    base = materialize("count", tmp_path, counts=SMALL)
    assert base == tmp_path / "toy_count"
    split = json.loads((base / "split_toy_count.json").read_text())
    assert set(split) == {"train", "val", "test"}
    rel, label, cname = split["train"][0]
    assert (base / "images" / rel).is_file() and isinstance(label, int) and cname == "one"
    assert Image.open(base / "images" / rel).size == (48, 48)
    assert not list(tmp_path.glob(".toy_*"))  # no temp folders left behind

    d = load_toy("toy:count", tmp_path, counts=SMALL)
    assert d.name == "toy_count" and d.classnames == list(SUITE["count"].classnames)
    assert d.template == SUITE["count"].template
    for part, n in zip((d.train, d.val, d.test), SMALL):
        labels = [s.label for s in part]
        assert sorted(set(labels)) == list(range(d.num_classes))
        assert all(labels.count(c) == n for c in range(d.num_classes))
        assert all(s.classname == d.classnames[s.label] and s.path.is_file() for s in part)
    paths = [s.path for s in d.train + d.val + d.test]
    assert len(set(paths)) == len(paths)
    shot = few_shot(d, 2, seed=1)
    assert len(shot.train) == 2 * d.num_classes

    # idempotent: reused untouched; other settings rebuild
    stamp = (base / "toyworld.json").stat().st_mtime_ns
    assert materialize("count", tmp_path, counts=SMALL) == base
    assert (base / "toyworld.json").stat().st_mtime_ns == stamp
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        materialize("count", tmp_path, counts=(1, 1, 1))
    assert len(load_toy("count", tmp_path, counts=(1, 1, 1)).train) == d.num_classes


def test_materialize_is_deterministic(tmp_path):
    a = materialize("relation", tmp_path / "a", counts=(1, 1, 1))
    b = materialize("relation", tmp_path / "b", counts=(1, 1, 1))
    c = materialize("relation", tmp_path / "c", counts=(1, 1, 1), seed=1)
    rel = json.loads((a / "split_toy_relation.json").read_text())["test"][0][0]
    pa, pb, pc = (np.asarray(Image.open(x / "images" / rel)) for x in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)


def test_suite_and_domain_variants(tmp_path):
    paths = materialize_suite(tmp_path, counts=(1, 1, 1))
    assert set(paths) == set(SUITE)
    for name, spec in SUITE.items():
        d = load_toy(name, tmp_path, counts=(1, 1, 1))
        assert d.num_classes == len(spec.classnames)
        if spec.source:
            src = SUITE[spec.source]
            assert d.classnames == list(src.classnames) and d.template == src.template
            assert d.train == [] and d.val == [] and len(d.test) == d.num_classes
    assert {"sketch"} <= {dom for s in SUITE.values() for dom in s.domains}
    # the sketch variant renders exactly the source's test scenes
    for label in range(3):
        assert toy_scene("shapes_sketch", "test", label, 0)[0] == toy_scene("shapes", "test", label, 0)[0]
    assert toy_scene("shapes_v2", "test", 0, 0)[0] != toy_scene("shapes", "test", 0, 0)[0]
    assert resolve_toy_name("Toy-Shapes") == resolve_toy_name("toy_shapes") == "shapes"


def test_rendering_speed_sanity(capsys):
    scenes = [sample_scene(i) for i in range(200)]
    t = time.perf_counter()
    for s in scenes:
        render_array(s, 48)
    ms = (time.perf_counter() - t) / len(scenes) * 1e3
    with capsys.disabled():
        print(f"\n[toyworld] render 48px clean: {ms:.2f} ms/image (~{ms * 10:.0f} s per 10k images)")


def test_length_bucketed_caption_encoding_equals_one_padded_batch(tiny_model_dir):
    import torch

    from vlprompt.backbones import load_backbone
    from vlprompt.pretraining.clip_pretrain import encode_captions_bucketed

    backbone = load_backbone(str(tiny_model_dir))
    backbone.model.requires_grad_(True)
    corpus = PretrainingCorpus(40, seed=2)
    tokens = backbone.tokenize([corpus.caption(i) for i in range(40)])
    assert len(set(tokens.eot_index.tolist())) > 5  # captions of many lengths
    outputs, grads = [], []
    for buckets in (1, 3, 4, 40, 64):
        backbone.model.zero_grad()
        features = encode_captions_bucketed(backbone, tokens.input_ids, tokens.eot_index, buckets)
        features.pow(2).sum().backward()
        outputs.append(features.detach())
        grads.append(backbone.model.text_model.embeddings.token_embedding.weight.grad.clone())
    for features, grad in zip(outputs[1:], grads[1:]):
        assert features.shape == outputs[0].shape
        torch.testing.assert_close(features, outputs[0], atol=1e-5, rtol=1e-5)  # same rows, same order
        torch.testing.assert_close(grad, grads[0], atol=1e-4, rtol=1e-3)  # float summation order only


# The scenes and captions a seed gives, per world version. A change to the sampler or the captions must bump
# WORLD_VERSION (so cached corpora and suites are regenerated and bench results are not reused across it); then put
# the new digest here. Pixels are left out: their last bits may differ between Pillow versions.
PINNED_WORLD_DIGESTS = {2: "5be37e1a2133e3ae"}


def test_what_a_seed_produces_is_pinned_to_the_world_version():
    import hashlib

    from vlprompt.toyworld.world import WORLD_VERSION

    corpus = PretrainingCorpus(500, seed=0)
    digest = hashlib.sha256()
    for i in range(0, 500, 5):
        digest.update(repr((corpus.scene(i), corpus.domain(i), corpus.caption(i))).encode())
    assert PINNED_WORLD_DIGESTS.get(WORLD_VERSION) == digest.hexdigest()[:16], (
        "the toy world's scenes or captions changed: bump WORLD_VERSION in vlprompt/toyworld/world.py and pin "
        f"{digest.hexdigest()[:16]} for it in PINNED_WORLD_DIGESTS"
    )


def test_a_scene_key_draws_another_datasets_very_scenes(monkeypatch):
    """benchmarks/toy_domains.py re-renders a dataset in other looks: same scenes, another look."""
    import dataclasses

    from vlprompt.toyworld import suite

    monkeypatch.setattr(suite, "SUITE", dict(suite.SUITE))
    suite.SUITE["shapes__sketch"] = dataclasses.replace(suite.SUITE["shapes"], name="shapes__sketch",
                                                        scene_key="shapes", domains=("sketch",))
    for split, label, i in (("train", 0, 0), ("test", 3, 5)):
        assert suite.toy_scene("shapes__sketch", split, label, i)[0] == suite.toy_scene("shapes", split, label, i)[0]
    assert suite.toy_fingerprint("shapes__sketch") != suite.toy_fingerprint("shapes")


@pytest.mark.parametrize("in_the_way", ["a file", "a file on its path"])
def test_a_toy_root_that_cannot_be_written_is_named_with_the_fix(tmp_path, in_the_way):
    from vlprompt.data import DatasetError

    root = tmp_path / "afile.txt"
    if in_the_way == "a file":
        root.write_text("not a folder")
        why = "a file is in the way"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro" / "blocker").write_text("")
        root = tmp_path / "ro" / "blocker" / "toy"
        why = "Not a directory"
    with pytest.raises(DatasetError, match=rf"cannot write the toy world's datasets in .*\({why}\); pass a "
                                           r"writable folder as --data-root \(or set \$VLPROMPT_TOY_ROOT\)"):
        materialize("count", root, counts=(1, 1, 1))
