"""Prompts saved by vlprompt 0.1.0 (tests/fixtures/v010_prompts, made by make_v010_prompts.py before the core
contracts) load with today's code and give the same logits / detections."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlprompt.backbones import load_backbone
from vlprompt.methods import PromptMethod

FIXTURES = Path(__file__).parent / "fixtures" / "v010_prompts"
CLASSIFICATION = ["zeroshot", "linear_probe", "coop", "coop_csc_middle", "cocoop", "vpt_deep", "ivlp", "maple", "upt",
                  "sdpt", "dpt", "apt"]
DETECTION = ["det_coop", "sdpt_native"]


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURES / "expected.safetensors"))


@pytest.fixture(scope="module")
def clip():
    return load_backbone("random:tiny")


@pytest.mark.parametrize("case", CLASSIFICATION)
def test_a_classification_prompt_of_010_loads_with_the_same_logits(case, clip, expected):
    method = PromptMethod.from_pretrained(FIXTURES / case, backbone=clip).eval()
    with torch.no_grad():
        logits = method(pixel_values=expected["pixels"])
    torch.testing.assert_close(logits, expected[case], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", DETECTION)
def test_a_detection_prompt_of_010_loads_with_the_same_detections(case, expected):
    method = PromptMethod.from_pretrained(FIXTURES / case, backbone=load_backbone("random:grounding-dino-micro"))
    scores, boxes = method.eval().predict(expected["det_pixels"])
    torch.testing.assert_close(scores, expected[case], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes, expected[case + "_boxes"], atol=1e-5, rtol=1e-5)


def test_a_010_prompt_loads_its_recorded_backbone_when_none_is_given():
    method = PromptMethod.from_pretrained(FIXTURES / "coop")
    assert method.backbone.name_or_path == "random:tiny" and method.registered_name == "coop"


def test_options_unknown_to_this_version_are_dropped_with_a_warning_only_from_another_version(tmp_path):
    import json
    import shutil

    from vlprompt.methods import MethodConfigError

    folder = tmp_path / "coop"
    shutil.copytree(FIXTURES / "coop", folder)
    config = json.loads((folder / "prompt_config.json").read_text())
    config["method_config"]["option_of_a_later_version"] = 3
    (folder / "prompt_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"option_of_a_later_version.*0\.1\.0.*dropped"):
        method = PromptMethod.from_pretrained(folder)
    assert method.config.n_ctx == 4
    import vlprompt

    config["vlprompt_version"] = vlprompt.__version__  # the same version: an unknown option is an error
    (folder / "prompt_config.json").write_text(json.dumps(config))
    with pytest.raises(MethodConfigError, match="option_of_a_later_version"):
        PromptMethod.from_pretrained(folder)
