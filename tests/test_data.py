"""Tests for vlprompt.data: readers on tiny fake layouts, few-shot sampling/caching, base/novel, transforms."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

try:  # the package may not be installed (src layout); fall back to the checkout's src/
    import vlprompt.data  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from data_fixtures import (
    IMAGENET_ENTRIES,
    make_fgvc_aircraft,
    make_imagefolder,
    make_imagenet,
    make_imagenet_variant,
    make_split_json_dataset,
    write_corrupt_image,
    write_image,
)

from vlprompt.data import (
    DATASETS,
    DatasetError,
    DatasetSplits,
    ImageDataset,
    ImageTransformConfig,
    Sample,
    available_datasets,
    build_transform,
    few_shot,
    few_shot_cache_path,
    load_dataset,
    subsample_classes,
)

REQUIRED = {
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
    "imagefolder",
}  # fmt: skip

# The table in specs/datasets.md, verbatim.
TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
SPLIT_JSON = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
CFG = ImageTransformConfig(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize_shortest=10)


def counts_per_class(samples: list[Sample], n: int) -> list[int]:
    return [sum(s.label == c for s in samples) for c in range(n)]


@pytest.fixture
def eurosat(tmp_path: Path) -> DatasetSplits:
    make_split_json_dataset(tmp_path, per_split=(10, 6, 3))
    return load_dataset("eurosat", tmp_path)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_has_every_dataset() -> None:
    assert set(available_datasets()) == REQUIRED == set(DATASETS)
    for name, template in TEMPLATES.items():
        assert DATASETS[name].template == template


@pytest.mark.parametrize(
    "alias, canonical",
    [("EuroSAT", "eurosat"), ("caltech-101", "caltech101"), ("OxfordPets", "oxford_pets"),
     ("ImageNet-Sketch", "imagenet_sketch"), ("imagenet-a", "imagenet_a"), ("ImageNet_R", "imagenet_r"),
     ("FGVCAircraft", "fgvc_aircraft"), ("DescribableTextures", "dtd"), ("ImageNetV2", "imagenetv2"),
     ("Food-101", "food101"), ("StanfordCars", "stanford_cars"), ("Flowers102", "oxford_flowers")],
)  # fmt: skip
def test_aliases(tmp_path: Path, alias: str, canonical: str) -> None:
    # Resolution happens before the folder check, so the "not found" message names the canonical dataset.
    with pytest.raises(DatasetError, match=DATASETS[canonical].folder):
        load_dataset(alias, tmp_path)


def test_unknown_name_lists_available(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="available: .*eurosat") as e:
        load_dataset("mnist", tmp_path)
    assert "imagenet_sketch" in str(e.value)


# ------------------------------------------------------------------------------------------- split JSON
def test_eurosat_reader(tmp_path: Path) -> None:
    base = make_split_json_dataset(tmp_path)
    assert base == tmp_path / "eurosat"
    assert (base / "2750" / "Forest" / "Forest_0.jpg").is_file()
    assert (base / "split_zhou_EuroSAT.json").is_file()
    ds = load_dataset("EuroSAT", tmp_path)
    assert ds.name == "eurosat"
    assert ds.classnames == ["AnnualCrop", "Forest", "Highway"]
    assert ds.template == "a centered satellite photo of {}."
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 12)
    assert counts_per_class(ds.train, 3) == [6, 6, 6]
    for s in ds.train + ds.val + ds.test:
        assert s.path.is_absolute() and s.path.is_file()
        assert s.classname == ds.classnames[s.label]
        assert s.path.parent.name == s.classname
    assert ds.split("val") is ds.val
    with pytest.raises(DatasetError, match="unknown split"):
        ds.split("validation")


@pytest.mark.parametrize("name", sorted(SPLIT_JSON))
def test_every_split_json_reader(tmp_path: Path, name: str) -> None:
    folder, image_dir, split_file = SPLIT_JSON[name]
    base = make_split_json_dataset(tmp_path, name, classnames=("a", "b_c"), per_split=(2, 1, 1), image_size=8)
    assert base == tmp_path / folder and (base / split_file).is_file()
    ds = load_dataset(name, tmp_path)
    assert ds.template == TEMPLATES[name]
    # CoOp prompts with underscores replaced by spaces; the reader does it once.
    assert ds.classnames == ["a", "b c"]
    assert ds.train[0].path == base / image_dir / "a" / "a_0.jpg"


def test_noise_pattern_and_classes_are_separable(tmp_path: Path) -> None:
    make_split_json_dataset(tmp_path, "dtd", per_split=(2, 0, 0), pattern="noise", image_size=8)
    colour = load_dataset("eurosat", make_split_json_dataset(tmp_path, per_split=(3, 0, 0)).parent)
    means = [np.asarray(Image.open(s.path), dtype=float).mean((0, 1)) for s in colour.train]
    per_class = [np.mean([m for m, s in zip(means, colour.train) if s.label == c], 0) for c in range(3)]
    within = max(np.abs(m - per_class[s.label]).max() for m, s in zip(means, colour.train))
    between = min(np.abs(per_class[a] - per_class[b]).max() for a in range(3) for b in range(a + 1, 3))
    assert between > 10 * within
    with pytest.raises(ValueError, match="pattern"):
        make_split_json_dataset(tmp_path / "x", pattern="stripes")


# --------------------------------------------------------------------------------------- ImageNet family
def test_imagenet_reader(tmp_path: Path) -> None:
    make_imagenet(tmp_path, per_split=(4, 2))
    ds = load_dataset("ImageNet", tmp_path)
    assert ds.classnames == [n for _, n in IMAGENET_ENTRIES]
    assert ds.classnames[2] == "great white shark"
    assert ds.template == "a photo of a {}."
    assert counts_per_class(ds.train, 5) == [4] * 5 and counts_per_class(ds.test, 5) == [2] * 5
    assert ds.val == ds.test  # documented convention: no separate validation split
    assert all("/images/val/" in s.path.as_posix() for s in ds.test)
    assert ds.train[0].path.parent.name == "n01440764"
    assert ds.train == sorted(ds.train, key=lambda s: (s.label, s.path.name))


def test_imagenet_missing_class_folder(tmp_path: Path) -> None:
    base = make_imagenet(tmp_path, per_split=(1, 1))
    shutil.rmtree(base / "images" / "train" / "n01443537")
    with pytest.raises(DatasetError, match="n01443537"):
        load_dataset("imagenet", tmp_path)


def test_imagenet_missing_classnames(tmp_path: Path) -> None:
    base = make_imagenet(tmp_path, per_split=(1, 1))
    (base / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match="classnames.txt"):
        load_dataset("imagenet", tmp_path)


def test_imagenet_malformed_classnames(tmp_path: Path) -> None:
    base = make_imagenet(tmp_path, per_split=(1, 1))
    (base / "classnames.txt").write_text("n01440764\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"classnames.txt:1"):
        load_dataset("imagenet", tmp_path)


def test_imagenetv2_reader(tmp_path: Path) -> None:
    make_imagenet_variant(tmp_path, "imagenetv2", [w for w, _ in IMAGENET_ENTRIES], per_class=2)
    ds = load_dataset("imagenetv2", tmp_path)
    assert ds.train == [] and ds.val == []
    assert counts_per_class(ds.test, 5) == [2] * 5
    assert ds.test[-1].path.parent.name == "4" and ds.test[-1].classname == "hammerhead shark"


def test_imagenet_sketch_reader_keeps_all_classes(tmp_path: Path) -> None:
    make_imagenet_variant(tmp_path, "imagenet_sketch", ["n01443537", "n01494475"], per_class=3)
    ds = load_dataset("ImageNet-Sketch", tmp_path)
    assert len(ds.classnames) == 5  # all ImageNet classes, even without images
    assert {s.label for s in ds.test} == {1, 4}


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_subset_readers_relabel(tmp_path: Path, name: str) -> None:
    # Folders created out of ImageNet order: labels must follow the ImageNet order of the present wnids.
    make_imagenet_variant(tmp_path, name, ["n01494475", "n01443537", "n01484850"], per_class=2)
    ds = load_dataset(name, tmp_path)
    assert ds.classnames == ["goldfish", "great white shark", "hammerhead shark"]
    assert counts_per_class(ds.test, 3) == [2, 2, 2]
    assert ds.test[0].path.parent.name == "n01443537" and ds.test[0].label == 0
    assert ds.template == "a photo of a {}." and ds.train == [] and ds.val == []


def test_imagenet_variant_uses_own_classnames_file(tmp_path: Path) -> None:
    make_imagenet_variant(tmp_path, "imagenet_r", ["n01440764"], own_classnames=True)
    assert not (tmp_path / "imagenet").exists()
    assert load_dataset("imagenet_r", tmp_path).classnames == ["tench"]


def test_imagenet_variant_without_classnames(tmp_path: Path) -> None:
    make_imagenet_variant(tmp_path, "imagenet_a", ["n01440764"])
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match="classnames.txt"):
        load_dataset("imagenet_a", tmp_path)


def test_imagenet_variant_unknown_wnid(tmp_path: Path) -> None:
    base = make_imagenet_variant(tmp_path, "imagenet_a", ["n01440764"])
    write_image(base / "imagenet-a" / "n99999999" / "x.jpg")
    with pytest.raises(DatasetError, match="n99999999"):
        load_dataset("imagenet_a", tmp_path)


# ---------------------------------------------------------------------------------------- FGVC Aircraft
def test_fgvc_aircraft_reader(tmp_path: Path) -> None:
    make_fgvc_aircraft(tmp_path, per_split=(3, 2, 1))
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172", "F-16A/B"]
    assert ds.template == "a photo of a {}, a type of aircraft."
    assert counts_per_class(ds.train, 4) == [3] * 4
    assert counts_per_class(ds.val, 4) == [2] * 4 and counts_per_class(ds.test, 4) == [1] * 4
    assert all(s.path.is_file() and s.path.suffix == ".jpg" for s in ds.train + ds.val + ds.test)


def test_fgvc_aircraft_unknown_variant(tmp_path: Path) -> None:
    base = make_fgvc_aircraft(tmp_path, per_split=(1, 1, 1))
    with open(base / "images_variant_val.txt", "a", encoding="utf-8") as f:
        f.write("1234567 Concorde\n")
    with pytest.raises(DatasetError, match=r"images_variant_val.txt:\d+.*Concorde"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_fgvc_aircraft_missing_split_file(tmp_path: Path) -> None:
    base = make_fgvc_aircraft(tmp_path, per_split=(1, 1, 1))
    (base / "images_variant_test.txt").unlink()
    with pytest.raises(DatasetError, match="images_variant_test.txt"):
        load_dataset("fgvc_aircraft", tmp_path)


# ----------------------------------------------------------------------------------------- image folder
def test_imagefolder_with_splits(tmp_path: Path) -> None:
    path = make_imagefolder(tmp_path / "mydata", form="split", per_class=(4, 2, 3))
    ds = load_dataset(f"imagefolder:{path}", None)
    assert ds.classnames == ["blue berry", "green pear", "red apple"]  # sorted folders, '_' shown as spaces
    assert ds.template == "a photo of a {}."
    assert ds.name == "imagefolder_mydata"
    assert counts_per_class(ds.train, 3) == [4] * 3
    assert counts_per_class(ds.val, 3) == [2] * 3 and counts_per_class(ds.test, 3) == [3] * 3
    assert all("/val/" in s.path.as_posix() for s in ds.val)


def test_imagefolder_carves_val_from_train(tmp_path: Path) -> None:
    path = make_imagefolder(tmp_path / "d", form="split_noval", per_class=(10, 0, 2))
    ds = load_dataset(f"imagefolder:{path}", None)
    assert counts_per_class(ds.train, 3) == [8] * 3 and counts_per_class(ds.val, 3) == [2] * 3
    assert not {s.path for s in ds.train} & {s.path for s in ds.val}
    assert all("/train/" in s.path.as_posix() for s in ds.val)
    assert load_dataset(f"imagefolder:{path}", None) == ds  # seeded


def test_imagefolder_flat_split_by_ratio(tmp_path: Path) -> None:
    path = make_imagefolder(tmp_path / "flat", per_class=10)
    ds = load_dataset("imagefolder:flat", tmp_path)  # relative path resolved against the data root
    assert counts_per_class(ds.train, 3) == [7] * 3
    assert counts_per_class(ds.val, 3) == [1] * 3 and counts_per_class(ds.test, 3) == [2] * 3
    all_paths = [s.path for s in ds.train + ds.val + ds.test]
    assert len(set(all_paths)) == 30
    assert load_dataset("imagefolder", path) == ds  # plain "imagefolder" reads the root itself, same seed


def test_imagefolder_flat_with_a_class_called_train(tmp_path: Path) -> None:
    """A flat folder whose classes include "train" (vehicles, VOC) is not the train/test split layout."""
    path = make_imagefolder(tmp_path / "vehicles", per_class=10)
    (path / "red_apple").rename(path / "train")
    ds = load_dataset(f"imagefolder:{path}", None)
    assert ds.classnames == ["blue berry", "green pear", "train"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 30


def test_imagefolder_split_of_a_class_does_not_change_when_a_class_is_added(tmp_path: Path) -> None:
    path = make_imagefolder(tmp_path / "flat", per_class=10)
    before = load_dataset(f"imagefolder:{path}", None)
    shutil.copytree(path / "green_pear", path / "a_new_class")  # sorts first: every label moves by one
    after = load_dataset(f"imagefolder:{path}", None)
    def members(splits: DatasetSplits, split: str) -> dict[str, list[Path]]:
        return {name: sorted(s.path for s in getattr(splits, split) if s.classname == name)
                for name in ("green pear", "red apple")}

    for split in ("train", "val", "test"):
        assert members(before, split) == members(after, split), split


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", None)
    path = make_imagefolder(tmp_path / "d", form="split", per_class=(1, 1, 1))
    shutil.rmtree(path / "test")
    with pytest.raises(DatasetError, match="no test/"):
        load_dataset(f"imagefolder:{path}", None)


# --------------------------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data root .* does not exist.*--data-root"):
        load_dataset("eurosat", tmp_path / "nowhere")


def test_missing_dataset_folder_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as e:
        load_dataset("eurosat", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"EuroSAT not found: expected folder {tmp_path / 'eurosat'}")
    assert "2750/" in msg and "split_zhou_EuroSAT.json" in msg and "--data-root" in msg


def test_missing_json(tmp_path: Path) -> None:
    base = make_split_json_dataset(tmp_path, per_split=(1, 1, 1))
    (base / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json is missing"):
        load_dataset("eurosat", tmp_path)


def test_missing_image_folder(tmp_path: Path) -> None:
    base = make_split_json_dataset(tmp_path, per_split=(1, 1, 1))
    shutil.rmtree(base / "2750")
    with pytest.raises(DatasetError, match="image folder .*2750 is missing"):
        load_dataset("eurosat", tmp_path)


def _rewrite_json(base: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = base / "split_zhou_EuroSAT.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_json_same_label_two_names(tmp_path: Path) -> None:
    base = make_split_json_dataset(tmp_path, per_split=(2, 1, 1))
    _rewrite_json(base, lambda d: d["test"][0].__setitem__(2, "Desert"))
    with pytest.raises(DatasetError, match=r"split_zhou_EuroSAT.json: label 0 .*'AnnualCrop'.*'Desert'"):
        load_dataset("eurosat", tmp_path)


def test_json_non_contiguous_labels(tmp_path: Path) -> None:
    base = make_split_json_dataset(tmp_path, per_split=(2, 1, 1))

    def shift(d: dict) -> None:  # type: ignore[type-arg]
        for items in d.values():
            for item in items:
                item[1] = 5 if item[1] == 2 else item[1]

    _rewrite_json(base, shift)
    with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json: labels must be contiguous"):
        load_dataset("eurosat", tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"train": [["a.jpg", "0", "x"]], "test": []}', "[]"])
def test_json_malformed(tmp_path: Path, content: str) -> None:
    base = make_split_json_dataset(tmp_path, per_split=(1, 1, 1))
    (base / "split_zhou_EuroSAT.json").write_text(content)
    with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json"):
        load_dataset("eurosat", tmp_path)


def test_missing_referenced_image(tmp_path: Path) -> None:
    base = make_split_json_dataset(tmp_path, per_split=(2, 1, 1))
    (base / "2750" / "AnnualCrop" / "AnnualCrop_2.jpg").unlink()  # first item of "val"
    with pytest.raises(DatasetError, match=r"AnnualCrop_2.jpg.*'val'.*may not match"):
        load_dataset("eurosat", tmp_path)


def test_corrupt_image_names_path(eurosat: DatasetSplits) -> None:
    bad = write_corrupt_image(eurosat.train[3].path)
    data = ImageDataset(eurosat.train, build_transform(CFG, train=False))
    x, y = data[0]
    assert x.shape == (3, 8, 8) and y == 0 and len(data) == 30
    with pytest.raises(DatasetError, match="remove it") as e:
        data[3]
    assert str(bad) in str(e.value)
    bad.unlink()
    with pytest.raises(DatasetError, match=str(bad)):
        data[3]


def test_image_dataset_batches(eurosat: DatasetSplits) -> None:
    loader = torch.utils.data.DataLoader(ImageDataset(eurosat.test, build_transform(CFG, train=True)), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 0, 0, 1]


# ---------------------------------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("shots, k_val", [(1, 1), (2, 2), (8, 4)])
def test_few_shot_counts(eurosat: DatasetSplits, shots: int, k_val: int) -> None:
    fs = few_shot(eurosat, shots, seed=1)
    assert counts_per_class(fs.train, 3) == [shots] * 3
    assert counts_per_class(fs.val, 3) == [k_val] * 3
    assert set(fs.train) <= set(eurosat.train) and set(fs.val) <= set(eurosat.val)
    assert fs.test == eurosat.test and fs.classnames == eurosat.classnames and fs.name == "eurosat"


def test_few_shot_val_from_train_without_overlap(tmp_path: Path) -> None:
    make_split_json_dataset(tmp_path, per_split=(7, 0, 1))
    ds = load_dataset("eurosat", tmp_path)
    fs = few_shot(ds, 4, seed=2)
    assert counts_per_class(fs.train, 3) == [4] * 3 and counts_per_class(fs.val, 3) == [3] * 3
    assert not set(fs.train) & set(fs.val)
    assert set(fs.val) <= set(ds.train)


def test_few_shot_too_few_images_warns(eurosat: DatasetSplits) -> None:
    with pytest.warns(UserWarning, match="fewer than 16"):
        fs = few_shot(eurosat, 16, seed=1)
    assert counts_per_class(fs.train, 3) == [10] * 3 and counts_per_class(fs.val, 3) == [4] * 3


@pytest.mark.parametrize("shots", [0, -1, True, 2.0])
def test_few_shot_rejects_bad_shots(eurosat: DatasetSplits, shots: object) -> None:
    with pytest.raises(DatasetError, match="shots must be"):
        few_shot(eurosat, shots, seed=1)  # type: ignore[arg-type]


def test_few_shot_deterministic_and_seed_dependent(eurosat: DatasetSplits) -> None:
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a, b, c = few_shot(eurosat, 2, 1), few_shot(eurosat, 2, 1), few_shot(eurosat, 2, 2)
    assert a == b
    assert set(a.train) != set(c.train)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_few_shot_on_an_unwritable_cache_folder_warns_and_samples_the_same(eurosat: DatasetSplits, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """A read-only dataset mount must not stop few-shot runs: the cache only pins a seeded split to disk."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    expected = few_shot(eurosat, 2, 3)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.warns(UserWarning, match="cache not written.*data.cache_dir"):
        assert few_shot(eurosat, 2, 3, cache_dir=tmp_path / "cache") == expected


def test_few_shot_cache_is_resampled_when_a_short_class_grows(tmp_path: Path) -> None:
    """A class that had fewer than K images contributes all of them; once it has more, the cache must not keep it
    short."""
    path = make_imagefolder(tmp_path / "pets", form="split", per_class=(3, 1, 2))
    small = load_dataset(f"imagefolder:{path}", None)
    with pytest.warns(UserWarning, match="fewer"):
        assert counts_per_class(few_shot(small, 8, 1, cache_dir=tmp_path / "cache").train, 3) == [3] * 3
    grown = make_imagefolder(tmp_path / "pets", form="split", per_class=(10, 1, 2))
    larger = load_dataset(f"imagefolder:{grown}", None)
    with pytest.warns(UserWarning, match="stale: the number of train / val images per class changed"):
        assert counts_per_class(few_shot(larger, 8, 1, cache_dir=tmp_path / "cache").train, 3) == [8] * 3


def test_few_shot_cache_written_and_reused(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fresh = few_shot(eurosat, 2, 3, cache_dir=cache)
    path = cache / "eurosat" / "shot_2-seed_3.json"
    assert path.is_file() and few_shot_cache_path(cache, "eurosat", 2, 3) == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert few_shot(eurosat, 2, 3, cache_dir=cache) == fresh
    # The cache is really read: swap one cached train image for another valid one of the same class.
    data = json.loads(path.read_text())
    replacement = next(s for s in eurosat.train if s.label == 0 and s not in fresh.train)
    data["train"][0][0] = f"{replacement.classname}/{replacement.path.name}"
    path.write_text(json.dumps(data))
    assert few_shot(eurosat, 2, 3, cache_dir=cache).train[0] == replacement


def test_few_shot_cache_survives_moving_the_data(tmp_path: Path) -> None:
    make_split_json_dataset(tmp_path / "a", per_split=(5, 2, 1))
    first = few_shot(load_dataset("eurosat", tmp_path / "a"), 2, 1, cache_dir=tmp_path / "cache")
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = load_dataset("eurosat", tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = few_shot(moved, 2, 1, cache_dir=tmp_path / "cache")
    assert [s.path.relative_to(tmp_path / "b") for s in again.train] == [
        s.path.relative_to(tmp_path / "a") for s in first.train
    ]


def test_few_shot_stale_cache_regenerated(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fs = few_shot(eurosat, 2, 1, cache_dir=cache)
    path = few_shot_cache_path(cache, "eurosat", 2, 1)
    fs.train[0].path.unlink()
    with pytest.warns(UserWarning, match="stale.*no longer exists"):
        again = few_shot(eurosat, 2, 1, cache_dir=cache)
    assert again == fs  # same seed, same sampling; the missing file fails later in ImageDataset
    renamed = DatasetSplits(eurosat.name, ["a", "b", "c"], eurosat.template, eurosat.train, eurosat.val, [])
    with pytest.warns(UserWarning, match="class list changed"):
        few_shot(renamed, 2, 1, cache_dir=cache)
    assert json.loads(path.read_text())["classnames"] == ["a", "b", "c"]  # rewritten
    path.write_text("{truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        assert few_shot(renamed, 2, 1, cache_dir=cache).train == few_shot(renamed, 2, 1).train


def test_few_shot_cache_entry_not_in_dataset(eurosat: DatasetSplits, tmp_path: Path) -> None:
    few_shot(eurosat, 1, 1, cache_dir=tmp_path)
    path = few_shot_cache_path(tmp_path, "eurosat", 1, 1)
    data = json.loads(path.read_text())
    data["val"][0][0] = "Forest/Forest_999.jpg"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="no longer part of the dataset"):
        few_shot(eurosat, 1, 1, cache_dir=tmp_path)


# -------------------------------------------------------------------------------------------- base/novel
def test_subsample_classes(tmp_path: Path) -> None:
    names = ("c0", "c1", "c2", "c3", "c4")
    make_split_json_dataset(tmp_path, classnames=names, per_split=(2, 1, 1), image_size=8)
    ds = load_dataset("eurosat", tmp_path)
    base, novel = subsample_classes(ds, "base"), subsample_classes(ds, "novel")
    assert base.classnames == ["c0", "c1", "c2"] and novel.classnames == ["c3", "c4"]  # ceil(5/2) = 3
    assert base.name == "eurosat[base]" and novel.name == "eurosat[novel]"
    assert counts_per_class(novel.train, 2) == [2, 2] and {s.label for s in novel.test} == {0, 1}
    assert all(novel.classnames[s.label] == s.classname for s in novel.train + novel.val + novel.test)
    assert [s.path for s in novel.test] == [s.path for s in ds.test if s.label >= 3]
    assert subsample_classes(ds, "new") == novel
    assert subsample_classes(ds, "all") == ds
    with pytest.raises(DatasetError, match="base"):
        subsample_classes(ds, "half")
    assert math.ceil(len(ds.classnames) / 2) == len(base.classnames)


# -------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("size", [(20, 12), (12, 20), (9, 9)])
def test_eval_transform_shape_and_determinism(tmp_path: Path, size: tuple[int, int]) -> None:
    img = Image.open(write_image(tmp_path / "x.png", None, size))
    t = build_transform(CFG, train=False)
    x = t(img)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, t(img))
    assert torch.equal(build_transform(CFG, train=True, augment=False)(img), x)
    assert torch.equal(t(img.convert("L")), t(img.convert("L").convert("RGB")))  # grey images become RGB


def test_eval_transform_matches_clip_image_processor(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The PIL backend: PIL's bicubic resize, as OpenAI CLIP's own preprocessing. With torchvision installed,
        # transformers' default CLIPImageProcessor resizes with torchvision instead, beyond this tolerance.
        proc = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)()
    cfg = ImageTransformConfig.from_image_processor(proc)
    img = Image.open(write_image(tmp_path / "x.png", None, (300, 250)))
    expected = torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0]))
    assert torch.allclose(build_transform(cfg, train=False)(img), expected.float(), atol=1e-4)


def test_train_transform_reproducible(tmp_path: Path) -> None:
    img = Image.open(write_image(tmp_path / "x.png", None, (30, 20)))
    t = build_transform(CFG, train=True)
    torch.manual_seed(0)
    a = [t(img) for _ in range(4)]
    torch.manual_seed(0)
    b = [t(img) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (3, 8, 8)
    assert len({x.sum().item() for x in a}) > 1  # it does augment


def test_transform_normalises(tmp_path: Path) -> None:
    img = Image.new("RGB", (10, 10), (255, 0, 128))
    x = build_transform(CFG, train=False)(img)
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-5)


def test_from_image_processor_default_clip() -> None:
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ImageTransformConfig.from_image_processor(transformers.CLIPImageProcessor())
    assert cfg.size == 224 and cfg.resize_shortest == 224
    assert cfg.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert cfg.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))


def test_from_image_processor_other_shapes() -> None:
    legacy = SimpleNamespace(crop_size=336, size=336, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert ImageTransformConfig.from_image_processor(legacy) == ImageTransformConfig(336, (0.5,) * 3, (0.5,) * 3, 336)
    siglip = SimpleNamespace(size={"height": 384, "width": 384}, do_center_crop=False, image_mean=0.5, image_std=0.5)
    assert ImageTransformConfig.from_image_processor(SimpleNamespace(image_processor=siglip)).size == 384
    resize_bigger = SimpleNamespace(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 256},
                                    image_mean=(0, 0, 0), image_std=(1, 1, 1))
    assert ImageTransformConfig.from_image_processor(resize_bigger).shortest_edge == 256
    with pytest.raises(ValueError):
        ImageTransformConfig(8, (0.5, 0.5), (1, 1, 1))
    with pytest.raises(ValueError):
        ImageTransformConfig(8, (0.5,) * 3, (1,) * 3, resize_shortest=4)


def test_transforms_pickle_for_workers() -> None:
    import pickle

    for t in (build_transform(CFG, True), build_transform(CFG, False)):
        assert type(pickle.loads(pickle.dumps(t))) is type(t)


# ------------------------------------------------------------------------------------------------ pixel formats
def _pixels(path) -> np.ndarray:
    from vlprompt.data import open_image

    return np.asarray(open_image(path))


def test_sixteen_bit_grey_levels_are_scaled_not_saturated(tmp_path):
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    for ext in ("png", "tif"):
        Image.fromarray(levels).save(tmp_path / f"g16.{ext}")
        rgb = _pixels(tmp_path / f"g16.{ext}")
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
        assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_sixteen_bit_rgb_keeps_its_colours(tmp_path):
    import io

    # PIL writes no 48-bit RGB; a minimal 16-bit-per-channel PNG, written by hand (zlib + CRC).
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + struct.pack(">3H", 65535, 32896, 0)  # one pixel: full red, half green, no blue
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b""))  # fmt: skip
    (tmp_path / "rgb48.png").write_bytes(png)
    assert Image.open(io.BytesIO(png)).size == (1, 1)
    assert _pixels(tmp_path / "rgb48.png")[0, 0].tolist() == [255, 128, 0]


def test_transparency_is_composited_on_white_as_transformers_processors_do(tmp_path):
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent (black underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert _pixels(tmp_path / "alpha.png").tolist() == [[[255, 0, 0], [255, 255, 255]]]
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((1, 0))
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((1, 0)))
    assert _pixels(tmp_path / "palette.png")[0, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((2, 4, 3), dtype=np.uint8)
    wide[:, 0] = 255  # a white left column
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: a viewer rotates it 90 degrees clockwise
    image.save(tmp_path / "sideways.png", exif=exif)
    upright = _pixels(tmp_path / "sideways.png")
    assert upright.shape == (4, 2, 3)  # height and width swapped
    assert (upright[0] == 255).all() and (upright[1:] == 0).all()  # the white column is now the top row


@pytest.mark.parametrize("kind", ["float", "int32"])
def test_pixel_formats_without_a_known_range_are_refused_by_name(kind, tmp_path):
    from vlprompt.data import DatasetError

    path = tmp_path / f"{kind}.tif"
    if kind == "float":
        Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)).save(path)
    else:
        Image.fromarray(np.full((2, 2), 100_000, dtype=np.int32)).save(path)
    with pytest.raises(DatasetError, match=f"{path.name}.*16-bit PNG"):
        _pixels(path)
