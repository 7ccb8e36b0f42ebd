"""The tracking journal (sweep/journal.py) and the tracker in front of MLflow (sweep/tracking.py)
when the server does not answer; the outage of a real server mid-sweep is in test_faults.py."""

import socket
import time

import pytest

from impactx_ray.sweep.journal import Journal


def test_records_wait_in_order_and_survive_a_line_cut_short(tmp_path):
    journal = Journal(tmp_path / "j")
    for i in range(3):
        journal.append({"op": "metrics", "key": "k", "step": i})
    journal.mark_applied()
    assert [r["step"] for r in journal.pending()] == [1, 2]
    with journal.path.open("a") as f:  # a driver killed while appending
        f.write('{"op": "metr')
    again = Journal(tmp_path / "j")
    assert [r["step"] for r in again.pending()] == [1, 2]
    again.append({"op": "finish", "key": "k"})  # starts on a line of its own
    assert [r["op"] for r in Journal(tmp_path / "j").pending()] == ["metrics", "metrics", "finish"]
    assert Journal.at(tmp_path / "j") is Journal.at(tmp_path / "j" / ".." / "j")  # one per dir


def test_kept_files_outlive_their_source_until_applied(tmp_path):
    journal = Journal(tmp_path / "j")
    source = tmp_path / "history.json"
    source.write_text("[1]")
    kept = journal.keep_file(source)
    source.unlink()  # Tune rotated the checkpoint away
    journal.append({"op": "artifact", "key": "k", "path": kept})
    assert open(kept).read() == "[1]"
    journal.mark_applied()
    assert not (tmp_path / "j" / "files").exists()  # all in MLflow: the copies go


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow
def test_an_unreachable_server_blocks_no_caller_and_stops_in_one_line_past_the_limit(tmp_path):
    from impactx_ray.sweep.tracking import Tracker, TrackingOutage

    said = []
    tracker = Tracker(f"http://127.0.0.1:{closed_port()}", experiment="t", journal=tmp_path / "j",
                      outage_limit_s=5.0, log=said.append)
    start = time.monotonic()
    tracker.start("sweep", "sweep")
    tracker.metrics("sweep", {"acc": 0.5}, step=1)  # within the retry interval: not even tried
    assert time.monotonic() - start < 15  # MLflow's short client retries, once
    assert len(tracker.journal.pending()) == 2
    assert said and said[0].startswith(f"tracking: MLflow at {tracker.uri} does not answer")
    assert tracker.behind().startswith("tracking behind: 2 records waiting for MLflow")
    time.sleep(5.5)
    with pytest.raises(TrackingOutage) as e:
        tracker.finish("sweep")
        tracker.flush(force=True)
    line = str(e.value)
    assert "\n" not in line and "has not answered for" in line and "3 records wait in" in line


@pytest.mark.slow
def test_a_record_the_server_refuses_is_said_and_skipped(tmp_path):
    """A param name MLflow refuses: one line, and the records after it are logged
    (kept at the head of the journal, it would stop every later record, on every resume)."""
    from mlflow import MlflowClient

    from impactx_ray.sweep.tracking import Tracker

    said = []
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, experiment="t", journal=tmp_path / "j", log=said.append)
    tracker.start("run", "run")
    tracker.params("run", {"bad!name": 1})  # MLflow allows letters, digits and _-. :/ only
    tracker.metrics("run", {"acc": 0.5}, step=1)
    assert len(said) == 1 and said[0].startswith("tracking: MLflow refused a record (params of "
                                                 "run run): ") and said[0].endswith("; skipped")
    assert tracker.journal.pending() == []
    assert MlflowClient(uri).get_run(tracker.id_of("run")).data.metrics == {"acc": 0.5}
