"""The README's Python block runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_block() -> str:
    text = README.read_text()
    section = text.split("## From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's 'From Python' section has no python block"
    return match.group(1)


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLPROMPT_TOY_ROOT", str(tmp_path / "toy"))
    code = readme_python_block()
    assert len([line for line in code.splitlines() if line.strip()]) <= 14  # "about a dozen lines"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params: 512 || backbone params: 1,825,537" in out
    assert (tmp_path / "prompts/coop-shapes/prompt.safetensors").exists()
    assert (tmp_path / "runs/py-coop/results.json").exists()
    predictions = namespace["vlprompt"].predict_images(namespace["loaded"], [namespace["splits"].test[0].path], k=2)
    assert [p["label"] in ("circle", "square", "star") for p in predictions[0]["top"]] == [True, True]
    assert namespace["final"]["n"] == 320
