"""The sweep's summary: the paper's Table 2 layout (test accuracy of A and IMPACTX per cell) with
the winning hyperparameters, as Markdown and CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = [("model", "model"), ("dataset", "dataset"),
           ("baseline_test_accuracy", "baseline (A)"), ("impactx_test_accuracy", "IMPACTX"),
           ("batch_size", "batch size"), ("lr", "lr"), ("val_fraction", "val. fraction"),
           ("lam", "λ"), ("stage1_failed", "failed stage-1 trials"),
           ("stage2_failed", "failed stage-2 trials")]


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}" if value < 1 else f"{value:g}"
    return str(value)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(row.get(key, "")) for key, _ in COLUMNS) + " |"
            for row in rows]
    return "\n".join(["# IMPACTX sweep: test accuracy per cell (paper Table 2 layout)", "",
                      "Winners selected by validation accuracy; test accuracy never used for "
                      "selection.", "", header, rule, *body]) + "\n"


def write_summary(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``summary.md`` and ``summary.csv`` into ``out``, print the table, return the paths."""
    md, csv_path = out / "summary.md", out / "summary.csv"
    text = summary_markdown(rows)
    md.write_text(text)
    keys = [k for k, _ in COLUMNS] + sorted({k for r in rows for k in r} - {k for k, _ in COLUMNS})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(text, flush=True)
    return [md, csv_path]
