"""Bench report tables: averages only over complete sets, one cost per run, one domain table per source."""
from __future__ import annotations

from vlprompt.protocols.report import cost_cells, fewshot_average, markdown_report, write_report


def _row(method, dataset, seed, accuracy, protocol="fewshot", shots=16, train_dataset=None, params=100, time_s=10.0):
    return {"protocol": protocol, "train_dataset": train_dataset or dataset, "eval_dataset": dataset, "subset": "all",
            "method": method, "shots": shots, "seed": seed, "accuracy": accuracy, "n": 10,
            "trainable_parameters": params, "train_time_s": time_s, "precision": "fp32"}


def test_an_average_over_fewer_datasets_is_not_shown():
    rows = [_row(m, d, seed, acc) for m in ("a", "b") for seed in (1, 2, 3)
            for d, acc in (("d1", 40.0), ("d2", 80.0)) if not (m == "b" and d == "d2" and seed > 1)]
    average = fewshot_average(rows)
    assert average[("a", 16)] == (60.0, 0.0)
    assert ("b", 16) not in average  # seeds 2 and 3 lack d2: their mean would be over d1 alone
    line = next(x for x in markdown_report(rows).splitlines() if x.startswith("| b |"))
    assert line == "| b | - |"


def test_cost_counts_a_run_with_several_targets_once_and_shows_parameter_ranges():
    rows = [_row("coop", "src", 1, 50.0, protocol="crossdataset", train_dataset="src", time_s=10.0)]
    rows += [_row("coop", f"t{i}", 1, 50.0, protocol="crossdataset", train_dataset="src", time_s=10.0) for i in range(3)]
    rows += [_row("coop", "src", 2, 50.0, protocol="crossdataset", train_dataset="src", time_s=100.0)]
    rows += [_row("linear_probe", "d1", 1, 50.0, params=5_120), _row("linear_probe", "d2", 1, 50.0, params=512_000)]
    costs = cost_cells(rows)
    assert costs["coop"] == ("100", 55.0)
    assert costs["linear_probe"][0] == "5,120 - 512,000"


def test_domain_sources_get_a_table_each_and_odd_names_plot(tmp_path):
    rows = [_row("coop", t, 1, 50.0, protocol="domain", train_dataset=s)
            for s, targets in (("imagenet", ("imagenet", "imagenetv2")), ("toy:shapes", ("toy:shapes", "toy:shapes_v2")))
            for t in targets]
    report = markdown_report(rows)
    assert "trained on imagenet," in report and "trained on toy:shapes," in report
    imagenet_table = report.split("trained on imagenet,")[1].split("##")[0]
    assert "toy:shapes" not in imagenet_table
    fewshot = [_row("coop", "imagefolder:/data/pets", 1, 70.0, shots=k) for k in (1, 2)]
    write_report(fewshot, tmp_path)
    assert (tmp_path / "fewshot_imagefolder_data_pets.png").is_file()


def test_a_one_seed_report_shows_no_spread_and_says_so():
    one = markdown_report([_row(m, "d1", 1, acc) for m, acc in (("a", 40.0), ("b", 80.0))])
    assert "±" not in one and "one seed" in one
    assert "| a | 40.0 |" in one.splitlines()
    two = markdown_report([_row("a", "d1", seed, acc) for seed, acc in ((1, 40.0), (2, 60.0))])
    assert "| a | 50.0 ± 14.1 |" in two.splitlines() and "mean ± std over seeds" in two
