"""vlprompt.specs: model and dataset names parsed once into an explicit scheme and name."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt.assets import DEFAULT_EMBEDDED
from vlprompt.specs import DatasetSpec, ModelSpec, SpecError


# ------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("text", ["embedded", "embedded:", " embedded ", "Embedded"])
def test_embedded_default(text):
    spec = ModelSpec.parse(text)
    assert spec == ModelSpec("embedded", DEFAULT_EMBEDDED)
    assert str(spec) == "embedded"
    assert not spec.is_local


def test_embedded_named():
    assert ModelSpec.parse(f"embedded:{DEFAULT_EMBEDDED}") == ModelSpec("embedded", DEFAULT_EMBEDDED)
    other = ModelSpec.parse("embedded:bigclip")
    assert other == ModelSpec("embedded", "bigclip")
    assert str(other) == "embedded:bigclip"


def test_embedded_load_name_is_its_folder_or_a_spec_error():
    assert Path(ModelSpec.parse("embedded").load_name).name == DEFAULT_EMBEDDED
    with pytest.raises(SpecError, match="unknown embedded model"):
        ModelSpec.parse("embedded:nope").load_name


@pytest.mark.parametrize("preset", ["tiny", "vit-b-16", "grounding-dino-micro", "not-a-preset"])
def test_random_preset_is_not_validated_here(preset):
    spec = ModelSpec.parse(f"random:{preset}")
    assert spec == ModelSpec("random", preset)
    assert str(spec) == f"random:{preset}"
    with pytest.raises(SpecError, match="no pretrained weights"):
        spec.load_name


@pytest.mark.parametrize("text", ["random:", "random: "])
def test_random_needs_a_preset(text):
    with pytest.raises(SpecError, match=r"random:<preset>"):
        ModelSpec.parse(text)


def test_explicit_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai" / "clip-vit-base-patch16").mkdir(parents=True)  # the prefix wins over a folder
    spec = ModelSpec.parse("hf-hub:openai/clip-vit-base-patch16")
    assert spec == ModelSpec("hub", "openai/clip-vit-base-patch16")
    assert str(spec) == "hf-hub:openai/clip-vit-base-patch16"
    assert spec.load_name == "openai/clip-vit-base-patch16"
    assert not spec.is_local
    assert ModelSpec.parse("hf-hub:gpt2") == ModelSpec("hub", "gpt2")  # a legacy id, allowed when explicit


@pytest.mark.parametrize("text", ["hf-hub:", "hf-hub:a/b/c", "hf-hub:org/", "hf-hub:my model"])
def test_explicit_hub_id_must_be_a_repo_id(text):
    with pytest.raises(SpecError, match=r"hf-hub:<org>/<name>"):
        ModelSpec.parse(text)


def test_org_slash_name_not_on_disk_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.parse("openai/clip-vit-base-patch16")
    assert spec == ModelSpec("hub", "openai/clip-vit-base-patch16")
    assert ModelSpec.parse(str(spec)) == spec  # canonical text round-trips


def test_org_slash_name_on_disk_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "clip").mkdir(parents=True)
    spec = ModelSpec.parse("models/clip")
    assert spec == ModelSpec("local", str((tmp_path / "models" / "clip").resolve()))
    assert spec.is_local and spec.load_name == spec.name


def test_existing_bare_word_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    assert ModelSpec.parse("clip") == ModelSpec("local", str((tmp_path / "clip").resolve()))


@pytest.mark.parametrize("text", ["./clip", "../elsewhere/clip", "a/b/c", "/no/such/model"])
def test_path_forms_are_local_even_when_missing(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.parse(text)
    assert spec.scheme == "local"
    assert spec.name == str((tmp_path / text).resolve())  # an absolute text ignores tmp_path
    assert Path(spec.name).is_absolute()
    assert str(spec) == spec.name
    assert ModelSpec.parse(str(spec)) == spec


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = ModelSpec.parse("~/models/clip")
    assert spec == ModelSpec("local", str((tmp_path / "models" / "clip").resolve()))


def test_path_object_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ModelSpec.parse(Path("org/name")) == ModelSpec("local", str((tmp_path / "org" / "name").resolve()))
    assert ModelSpec.parse(tmp_path) == ModelSpec("local", str(tmp_path.resolve()))


@pytest.mark.parametrize("text", ["clip", "openai:clip", "org/", "my org/model"])
def test_unknown_model_names_list_the_schemes(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        ModelSpec.parse(text)
    message = str(info.value)
    assert "neither an existing folder nor a hub id" in message
    for form in ("embedded", "random:<preset>", "./path", "hf-hub:org/name"):
        assert form in message


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_model_name(text):
    with pytest.raises(SpecError, match="empty model name"):
        ModelSpec.parse(text)


def test_model_spec_is_frozen_and_a_value_error():
    spec = ModelSpec.parse("random:tiny")
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert issubclass(SpecError, ValueError)
    assert {spec, ModelSpec("random", "tiny")} == {spec}


# ------------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize(
    "text, scheme, name, task",
    [
        ("toy:shapes", "toy", "shapes", "classification"),
        ("toy:Fine_Shapes", "toy", "Fine_Shapes", "classification"),
        ("toydet:shapes", "toydet", "shapes", "detection"),
        ("coco:/data/coco", "coco", "/data/coco", "detection"),
        ("coco:coco/annotations.json", "coco", "coco/annotations.json", "detection"),
        ("imagefolder:/data/pets", "imagefolder", "/data/pets", "classification"),
        ("imagefolder:my_images", "imagefolder", "my_images", "classification"),
        ("eurosat", "named", "eurosat", "classification"),
        ("OxfordPets", "named", "OxfordPets", "classification"),
        ("oxford_pets", "named", "oxford_pets", "classification"),
    ],
)
def test_dataset_forms_round_trip(text, scheme, name, task):
    spec = DatasetSpec.parse(text)
    assert (spec.scheme, spec.name, spec.task) == (scheme, name, task)
    assert str(spec) == text
    assert DatasetSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["imagefolder", "imagefolder:", "ImageFolder"])
def test_imagefolder_without_path_means_the_data_root(text):
    spec = DatasetSpec.parse(text)
    assert spec == DatasetSpec("imagefolder", "")
    assert str(spec) == "imagefolder"


def test_dataset_schemes_are_case_insensitive_and_names_case_preserved():
    assert DatasetSpec.parse("TOY:Shapes") == DatasetSpec("toy", "Shapes")
    assert DatasetSpec.parse(" Coco:Data/COCO ") == DatasetSpec("coco", "Data/COCO")


@pytest.mark.parametrize(
    "text, form",
    [
        ("toy:", "toy:<name>"),
        ("toy", "toy:<name>"),
        ("toydet: ", "toydet:<name>"),
        ("coco:", "coco:<path>"),
        ("coco", "coco:<path>"),
    ],
)
def test_schemes_that_need_a_name(text, form):
    with pytest.raises(SpecError, match=form):
        DatasetSpec.parse(text)


def test_unknown_dataset_scheme():
    with pytest.raises(SpecError, match=r"unknown dataset scheme 'eurosat:'") as info:
        DatasetSpec.parse("eurosat:extra")
    assert "imagefolder:<path>" in str(info.value)


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_dataset_name(text):
    with pytest.raises(SpecError, match="empty dataset name"):
        DatasetSpec.parse(text)
