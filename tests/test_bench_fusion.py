"""The bench's ``full`` protocol: fusion-encoder methods trained on a whole training split (VQA, NLVR2, retrieval),
resumable, reported and plotted like the classification protocols; the toy sets as ``toy:<task>`` datasets."""
from __future__ import annotations

import contextlib
import csv
import io

import pytest

from vlprompt.cli import main
from vlprompt.protocols.runner import BenchConfig
from vlprompt.specs import DatasetSpec
from vlprompt.toyworld.fusion_sets import FusionSetSizes, materialize_fusion_set

SMALL = FusionSetSizes(vqa=(6, 3), nlvr2=(8, 4, 4), retrieval=(4, 2, 3))


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("methods, datasets, protocols, message", [
    (["apt_native"], ["nlvr2:data"], ["fewshot"], "nlvr2:data is an NLVR2 dataset, which trains on its whole "
                                                   "training split: run it with --protocols full"),
    (["apt_native"], ["toy:shapes"], ["fewshot"], "apt_native is a fusion-encoder method: bench it on vqa:"),
    (["apt_native"], ["toy:vqa", "toy:shapes"], ["full"], "toy:shapes is not one"),
    (["coop"], ["toy:vqa"], ["full"], "coop is not a fusion-encoder method"),
    (["apt_native"], ["toy:vqa"], ["full", "fewshot"], "the full protocol runs alone"),
])  # fmt: skip
def test_the_full_protocol_and_the_others_refuse_what_they_cannot_run(tmp_path, methods, datasets, protocols,
                                                                      message):  # fmt: skip
    with pytest.raises(ValueError, match=message):
        BenchConfig(methods=methods, datasets=datasets, protocols=protocols, output=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_the_command_line_offers_every_protocol():
    from vlprompt.cli import PROTOCOL_CHOICES
    from vlprompt.protocols.runner import PROTOCOLS

    assert PROTOCOL_CHOICES == PROTOCOLS


def test_toy_sets_are_datasets_of_their_tasks():
    assert [DatasetSpec.parse(f"toy:{t}").task for t in ("vqa", "nlvr2", "retrieval")] == ["vqa", "nlvr2", "retrieval"]
    assert DatasetSpec.parse("toy:shapes").task == "classification"


def test_a_full_bench_trains_reports_plots_and_resumes(tmp_path):
    nlvr2 = materialize_fusion_set("nlvr2", tmp_path / "data", sizes=SMALL)
    out = tmp_path / "bench"
    args = ["bench", "--protocols", "full", "--methods", "fusion_head", "apt_native", "--datasets", f"nlvr2:{nlvr2}",
            "--model", "random:vilt-micro", "--seeds", "1", "2", "--set", "default_train.batch_size=4",
            "--set", "default_train.epochs=1", "--set", "recipes.apt_native.method_options.n_prompts=2",
            "--output", out]  # fmt: skip
    code, _, err = _cli(*args)
    assert code == 0, err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["protocol"] for r in rows} == {"full"}
    assert {r["method"] for r in rows} == {"fusion_head", "apt_native"}
    assert all(r["n"] == "4" for r in rows)  # the 4 statements of test1
    assert (out / "runs" / "full" / f"nlvr2_{str(nlvr2).replace('/', '_')}" / "apt_native" / "all_seed1"
            / "result.json").is_file()  # fmt: skip
    report = (out / "results.md").read_text()
    assert "## Whole training split" in report and "| apt_native |" in report
    assert (out / "full.png").stat().st_size > 1000
    stamp = (out / "results.csv").read_text()
    code, out_text, err = _cli(*args)  # a rerun trains nothing
    assert code == 0, err
    assert (out / "results.csv").read_text() == stamp
