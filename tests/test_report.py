"""impactx report: a run or sweep directory's summary beside the paper's Table 2."""

import csv
import json

import pytest

from impactx_ray.cli import main
from impactx_ray.eval.paper import PAPER_TABLE2
from impactx_ray.report import collect_rows, summary_markdown


def sweep_dir(tmp_path):
    cell = tmp_path / "cells" / "lenet5-cifar10"
    cell.mkdir(parents=True)
    row = {"model": "lenet5", "dataset": "cifar10", "baseline_test_accuracy": 0.6812,
           "impactx_test_accuracy": 0.7034, "abn_test_accuracy": 0.69, "batch_size": 32,
           "lr": 0.0006, "val_fraction": 0.1, "lam": 0.6,
           "aopc": {"IMPACTX": 0.41, "SHAP of IMPACTX": 0.45, "ABN": 0.2, "random": 0.1}}
    (cell / "result.json").write_text(json.dumps(row))
    return tmp_path


def test_paper_table2_values():
    assert PAPER_TABLE2[("cifar10", "lenet5")] == {"baseline": 67.96, "impactx": 70.65,
                                                  "abn": 68.49, "wae": 68.10}
    assert PAPER_TABLE2[("stl10", "mobilenet")]["impactx"] == 95.79
    assert len(PAPER_TABLE2) == 9


def test_report_of_a_sweep_directory(tmp_path, capsys):
    out = sweep_dir(tmp_path)
    assert main(["report", "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert ("| lenet5 | cifar10 | 68.12 | 70.34 | 69.00 | – | – | 67.96 | 70.65 | 68.49 | 68.10 "
            "| – | 32 | 0.0006 | 0.1 | 0.6 |") in md
    assert "| lenet5 | cifar10 | 0.4100 | 0.4500 | 0.2000 | 0.1000 |" in md
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert rows[0]["paper_impactx_test_accuracy"] == str(70.65 / 100)
    assert rows[0]["aopc_SHAP of IMPACTX"] == "0.45"
    assert md == summary_markdown(collect_rows(out))


def test_one_result_schema_for_runs_and_cells_and_earlier_run_files_lifted():
    from impactx_ray.config import RunConfig
    from impactx_ray.pipeline.result import as_row, result_row

    cfg = RunConfig(model="lenet5", dataset="digits", batch_size=16, lr=0.001, val_fraction=0.2, lam=0.8)
    morf = {"aopc": {"IMPACTX": 0.5}, "metrics": {"noise": {}}, "sanity": {}, "figures": ["x.png"]}
    row = result_row(cfg, {"baseline_test_accuracy": 0.9}, morf, ["w"])
    assert row == {"model": "lenet5", "dataset": "digits", "batch_size": 16, "lr": 0.001,
                   "val_fraction": 0.2, "lam": 0.8, "baseline_test_accuracy": 0.9,
                   "aopc": {"IMPACTX": 0.5}, "metrics": {"noise": {}}, "sanity": {}, "warnings": ["w"]}
    assert as_row(row) == row  # this schema is read as it is
    earlier = {"hyperparameters": cfg.to_dict(), "baseline_test_accuracy": 0.9, "num_test": 360,
               "morf": morf}  # a run's result.json from before the schema
    lifted = as_row(earlier)
    assert {k: lifted[k] for k in row if k != "warnings"} == {k: v for k, v in row.items() if k != "warnings"}
    assert lifted["num_test"] == 360 and lifted["morf"] == morf


def test_report_of_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err


@pytest.mark.slow
def test_run_all_methods_then_morf_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--epochs", "1", "--max-evals", "24", "--quiet",
            "--method", "impactx", "abn", "wae"]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    for method in ("baseline", "impactx", "abn", "wae"):
        assert 0 <= result[f"{method}_test_accuracy"] <= 1
    assert main(["evaluate", "--out", str(out), "--morf", "--morf-images", "8", "--quiet",
                 "--replacement", "noise", "road"]) == 0
    morf = json.loads((out / "result.json").read_text())["morf"]
    names = {"IMPACTX", "SHAP of IMPACTX", "random", "ABN", "SHAP of ABN", "random (ABN)"}
    assert set(morf["aopc"]) == names
    saved = json.loads((out / "morf" / "morf.json").read_text())
    assert list(saved["metrics"]) == ["noise", "road"]  # every replacement asked, in that order
    for replacement in ("noise", "road"):
        assert set(saved["metrics"][replacement]) == names
        for measure in saved["metrics"][replacement].values():
            for key in ("aopc", "auc_morf", "auc_lerf", "srg"):
                m = measure[key]
                assert m["ci_low"] <= m["mean"] <= m["ci_high"] and m["n"] == 8
        assert (out / "morf" / f"lerf_{replacement}_SHAP_of_ABN.npy").exists()
    assert set(saved["sanity"]) == {"IMPACTX", "ABN"}
    assert (out / "morf" / "examples.png").exists() and (out / "morf" / "morf_mean.png").exists()
    assert main(["report", "--out", str(out)]) == 0
    assert "| lenet5 | digits |" in (out / "summary.md").read_text()
