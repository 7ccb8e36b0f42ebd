"""Look at a sweep in the MLflow UI with a real browser (headless Chromium), as a researcher would:
the experiment's runs page must list the nested stage and trial runs, and the compare page of a
stage's trials must offer the parallel-coordinates plot. Screenshots of both are written.

    python sweeps/check_mlflow_ui.py --out runs/smoke            # a sweep with the embedded store
    python sweeps/check_mlflow_ui.py --tracking-uri http://127.0.0.1:5000 --name smoke-1a2b3c

Needs Debian's `chromium` (apt-get install chromium). Starts `mlflow ui` on a free port of
127.0.0.1 for an embedded store; exit status 0 when everything was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars", "--window-size=1600,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(url: str, *extra: str, budget_ms: int = 20000) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("check_mlflow_ui.py: error: chromium not found; apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--virtual-time-budget={budget_ms}", *extra, url],
                              capture_output=True, text=True, timeout=180)
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="sweep directory (embedded store <out>/mlflow.db)")
    p.add_argument("--tracking-uri", help="an MLflow server instead of --out's store")
    p.add_argument("--name", help="the sweep's name (default: from <out>/sweep.json)")
    p.add_argument("--screenshots", type=Path, default=Path("."), help="where the PNGs go")
    args = p.parse_args(argv)
    record = json.loads((args.out / "sweep.json").read_text()) if args.out else {}
    experiment_name = f"impactx/{args.name}" if args.name else record.get("experiment")
    server = None
    uri = args.tracking_uri
    if uri is None:
        port = free_port()
        store = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                                   store, "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(experiment_name)
        runs = client.search_runs([experiment.experiment_id], max_results=500)
        trials = [r for r in runs if r.data.tags.get("impactx.stage") == "stage1"
                  and "impactx.trial_id" in r.data.tags]
        args.screenshots.mkdir(parents=True, exist_ok=True)
        runs_url = f"{uri}/#/experiments/{experiment.experiment_id}/runs"
        dom = chromium(runs_url, "--dump-dom")
        chromium(runs_url, f"--screenshot={args.screenshots.resolve() / 'mlflow-runs.png'}")
        # the trials of stage 1, found by their tags: what a researcher filters on
        trials_url = runs_url + "?searchFilter=" + urllib.parse.quote(
            "tags.`impactx.stage` = 'stage1' and tags.`impactx.method` = 'baseline'")
        trials_dom = chromium(trials_url, "--dump-dom")
        chromium(trials_url, f"--screenshot={args.screenshots.resolve() / 'mlflow-trials.png'}")
        ids = json.dumps([r.info.run_id for r in trials])
        compare_url = (f"{uri}/#/compare-runs?runs={urllib.parse.quote(ids)}"
                       f"&experiments={urllib.parse.quote(json.dumps([experiment.experiment_id]))}")
        compare_dom = chromium(compare_url, "--dump-dom")
        chromium(compare_url, f"--screenshot={args.screenshots.resolve() / 'mlflow-compare.png'}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    text = re.sub(r"<[^>]+>", "", dom)  # the page's words, without markup
    checks = {
        "the sweep's run on the runs page": f"sweep {experiment_name.split('/', 1)[-1]}" in dom,
        f"all {len(runs)} runs nested under it": f"{len(runs)} matching runs" in text,
        "the stage-1 trials, filtered by tag, grouped under their stage run":
            len(trials) >= 2 and f"{trials[0].data.tags['impactx.cell']} stage1" in trials_dom,
        "the compare page's parallel coordinates": "Parallel Coordinates" in compare_dom,
        "every stage-1 trial on the compare page": all(r.info.run_name in compare_dom
                                                       for r in trials),
    }
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'MISSING'} {what}")
    print("screenshots: " + ", ".join(str(args.screenshots / f"mlflow-{page}.png")
                                      for page in ("runs", "trials", "compare")))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
