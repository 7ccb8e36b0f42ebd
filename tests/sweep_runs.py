"""Reading a sweep's MLflow SQLite store in tests: its trial runs, and waiting for the first
stage-1 epoch."""

import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest


def unprefixed(key: str | None) -> str | None:
    """A run key without its sweep's id (``1a2b3c4d/lenet5-digits/stage1`` -> ``lenet5-digits/stage1``)."""
    return re.sub(r"^[0-9a-f]{8}/", "", key) if key else key


# a trial run a resumed stage superseded (sweep/stage.py): no trial of the stage holds it
SUPERSEDED = ("exists (select 1 from tags s where s.run_uuid = {run} and s.key = 'impactx.superseded' "
              "and s.value = 'true')")


def trial_runs(db: Path, superseded: bool = False) -> list[tuple[str, str, str]]:
    """(impactx.key, status, parent key) of every trial run in an MLflow SQLite store, keys
    without the sweep's id: the stages' trials, or (``superseded``) the runs they superseded."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "select t.value, r.status, (select p.value from tags p where p.run_uuid = "
        "(select q.value from tags q where q.run_uuid = r.run_uuid and "
        "q.key = 'mlflow.parentRunId') and p.key = 'impactx.key') "
        "from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'impactx.key' "
        f"and t.value like '%/stage%/%' and {'' if superseded else 'not '}"
        + SUPERSEDED.format(run="r.run_uuid")).fetchall()
    con.close()
    return [(unprefixed(k), status, unprefixed(parent)) for k, status, parent in rows]


def wait_for_trial_metrics(db: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            con = sqlite3.connect(db)
            n = con.execute("select count(*) from metrics m join tags t on m.run_uuid = "
                            "t.run_uuid where t.key = 'impactx.key' and t.value like "
                            "'%/stage1/%'").fetchone()[0]
            con.close()
            if n:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.3)
    pytest.fail("the smoke sweep never reported a stage-1 epoch")
