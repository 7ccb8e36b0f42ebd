"""The summary report: test accuracy per cell for baseline A, IMPACTX, ABN and WAE beside the
paper's published Table 2, the winning hyperparameters, and an AOPC table per method.

Rows come from a run directory (``result.json``) or a sweep directory (``cells/*/result.json``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from impactx_ray.errors import UserError
from impactx_ray.eval.paper import PAPER_TABLE2
from impactx_ray.io import write_bytes
from impactx_ray.methods import METHODS
from impactx_ray.pipeline.result import HYPER, as_row

NESTED = ("metrics", "sanity")  # morf.json's per-replacement measures and sanity checks


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "–"


def _search_cell(row: dict[str, Any], stage: str) -> str:
    """``optuna+asha: 6 trials (4 stopped early), 11 trial-epochs`` for one stage of a cell."""
    if not row.get(f"{stage}_search"):
        return "–"
    early = row.get(f"{stage}_early_stopped", 0)
    return (f"{row[f'{stage}_search']}: {row.get(f'{stage}_trials')} trials"
            + (f" ({early} stopped early)" if early else "")
            + f", {row.get(f'{stage}_trial_epochs')} trial-epochs")


def collect_rows(out: Path) -> list[dict[str, Any]]:
    """The result rows of a run directory (one) or a sweep directory (one per cell), of any
    version (``pipeline.result.as_row``)."""
    if (out / "result.json").exists():
        return [as_row(json.loads((out / "result.json").read_text()))]
    rows = [as_row(json.loads(p.read_text())) for p in sorted(out.glob("cells/*/result.json"))]
    if not rows:
        raise UserError(f"{out} holds neither result.json (a run) nor cells/*/result.json "
                        "(a sweep); run `impactx run` or sweeps/full_grid.py first")
    return rows


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    acc_head = ([m.title for m in METHODS.values()] +
                [f"paper {m.title}" for m in METHODS.values()])
    head = ["model", "dataset", *acc_head, "batch size", "lr", "val. fraction", "λ"]
    lines = ["# IMPACTX: test accuracy (%) per cell, beside the paper's Table 2", "",
             "Winners selected by validation accuracy; test accuracy is never used for selection. "
             "`–`: not trained here, or not in the paper.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        paper = PAPER_TABLE2.get((r.get("dataset"), r.get("model")), {})
        cells = [str(r.get("model")), str(r.get("dataset"))]
        cells += [_pct(r.get(f"{m}_test_accuracy")) for m in METHODS]
        cells += [f"{paper[m]:.2f}" if m in paper else "–" for m in METHODS]
        cells += [str(r.get(k, "–")) if r.get(k) is not None else "–" for k in HYPER]
        lines.append("| " + " | ".join(cells) + " |")
    searched = [r for r in rows if r.get("stage1_search")]
    if searched:
        lines += ["", "## How the winners were found", "",
                  "Trials run (stopped early by ASHA) and the trial-epochs they took, per stage.",
                  "", "| model | dataset | stage 1 | stage 2 |", "|---|---|---|---|"]
        for r in searched:
            lines.append(f"| {r['model']} | {r['dataset']} | {_search_cell(r, 'stage1')} | "
                         f"{_search_cell(r, 'stage2')} |")
    with_morf = [r for r in rows if r.get("aopc")]
    if with_morf:
        methods = list(dict.fromkeys(m for r in with_morf for m in r["aopc"]))
        lines += ["", "## MoRF: AOPC per method (higher: the map finds the evidence faster)", "",
                  "| model | dataset | " + " | ".join(methods) + " |",
                  "|" + "|".join("---" for _ in range(len(methods) + 2)) + "|"]
        for r in with_morf:
            vals = [f"{r['aopc'][m]:.4f}" if m in r["aopc"] else "–" for m in methods]
            lines.append(f"| {r['model']} | {r['dataset']} | " + " | ".join(vals) + " |")
    return "\n".join(lines + _beyond_morf(rows)) + "\n"


def _ci(m: dict[str, float]) -> str:
    return f"{m['mean']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"


def _beyond_morf(rows: list[dict[str, Any]]) -> list[str]:
    """LeRF/SRG with 95% CIs per replacement, and the sanity checks, of rows that have them."""
    lines: list[str] = []
    for r in (r for r in rows if r.get("metrics")):
        lines += ["", f"## {r['model']} on {r['dataset']}: MoRF, LeRF and SRG [95% CI over images]",
                  "", "| replacement | method | AOPC (MoRF) | AUC MoRF | AUC LeRF | SRG |",
                  "|---|---|---|---|---|---|"]
        for rep, methods in r["metrics"].items():
            for name, m in methods.items():
                lines.append(f"| {rep} | {name} | " + " | ".join(
                    _ci(m[k]) for k in ("aopc", "auc_morf", "auc_lerf", "srg")) + " |")
    for r in (r for r in rows if r.get("sanity")):
        lines += ["", f"## {r['model']} on {r['dataset']}: sanity checks", "",
                  "| model | AOPC − random [95% CI] | beats random | rank corr. after "
                  "cascading randomization | changes with the weights |", "|---|---|---|---|---|"]
        for model, checks in r["sanity"].items():
            for rep, v in checks["random_ranking"].items():
                cascade = checks["cascading_randomization"]
                lines.append(f"| {model} ({rep}) | {_ci(v['aopc_minus_random'])} | "
                             f"{'yes' if v['passed'] else 'NO'} | "
                             f"{cascade['final_rank_correlation']:.3f} | "
                             f"{'yes' if cascade['passed'] else 'NO'} |")
    return lines


def write_summary(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``summary.md`` and ``summary.csv`` into ``out``, print the table, return the paths."""
    md, csv_path = out / "summary.md", out / "summary.csv"
    text = summary_markdown(rows)
    write_bytes(md, text.encode())
    flat = []
    for r in rows:
        paper = PAPER_TABLE2.get((r.get("dataset"), r.get("model")), {})
        flat.append({**{k: v for k, v in r.items() if not isinstance(v, dict)},  # one value each
                     **{f"aopc_{m}": v for m, v in (r.get("aopc") or {}).items()},
                     **{f"paper_{m}_test_accuracy": paper[m] / 100 for m in paper}})
    keys = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(flat)
    write_bytes(csv_path, buf.getvalue().encode())
    print(text, flush=True)
    return [md, csv_path]


def report(out: Path) -> list[Path]:
    """``impactx report --out DIR``: the summary of a run or sweep directory."""
    return write_summary(out, collect_rows(out))
