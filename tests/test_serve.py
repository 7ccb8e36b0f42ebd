"""``impactx serve`` on Ray Serve and ``impactx predict`` on a trained run: answers equal to the
offline prediction, malformed requests answered 400 in one line, the server still serving."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from impactx_ray.predict import Predictor
from impactx_ray.serve.deployment import BadRequest, decode

from cluster import LocalCluster, free_ports, stop_session
from tolerances import assert_batch_close

BIN = Path(sys.executable).parent


def png(image_chw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_chw).transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("body, content_type, needle", [
    (b"", "image/png", "empty body"),
    (b"hello", "image/png", "not an image"),
    (b"{", "application/json", "not JSON"),
    (b'{"pixels": 1}', "application/json", '"image" key'),
    (json.dumps({"image": [[1, 2, 3]]}).encode(), "application/json", "(1, 3)"),
    (json.dumps({"image": [[[1, 2], [3]]]}).encode(), "application/json", "rectangular"),
    (json.dumps({"image": np.full((32, 32, 3), 300).tolist()}).encode(), "application/json", "0..255"),
    (json.dumps({"image": np.full((32, 32, 3), 0.5).tolist()}).encode(), "application/json", "integers"),
    (b"\x93NUMPY garbage", "application/x-npy", ".npy"),
])
def test_malformed_bodies_are_one_line_bad_requests(body, content_type, needle):
    with pytest.raises(BadRequest) as e:
        decode(body, content_type, (32, 32))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bodies_decode_to_the_same_image(digits):
    _, test = digits
    hwc = test.images[7].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    np.save(buf, hwc)
    assert np.array_equal(decode(png(test.images[7]), "image/png", (32, 32)), hwc)
    assert np.array_equal(decode(json.dumps({"image": hwc.tolist()}).encode(), "application/json", (32, 32)), hwc)
    assert np.array_equal(decode(buf.getvalue(), "application/x-npy", (32, 32)), hwc)
    big = np.kron(hwc, np.ones((2, 2, 1), np.uint8))  # 64×64: resized back as training resizes
    assert decode(png(big.transpose(2, 0, 1)), "image/png", (32, 32)).shape == (32, 32, 3)


@pytest.mark.slow
def test_a_running_serve_proxy_elsewhere_is_said_in_one_line():
    from impactx_ray.serve.command import proxy_note

    assert proxy_note(("127.0.0.1", 8000), ("127.0.0.1", 8000)) is None
    note = proxy_note(("127.0.0.1", 8001), ("0.0.0.0", 8000))
    assert "\n" not in note and "its HTTP proxy at 0.0.0.0:8000" in note
    assert "--host 127.0.0.1 --port 8001 do not apply" in note


def test_predict_on_a_folder_has_the_runs_test_accuracy(trained_run, digits, tmp_path):
    _, test = digits
    folder = tmp_path / "digits-test"
    folder.mkdir()
    for i in range(len(test)):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    to = tmp_path / "predicted"
    proc = subprocess.run([str(BIN / "impactx"), "predict", "--out", str(trained_run), str(folder),
                           "--to", str(to), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((to / "predictions.csv").open()))
    labels = [test.classes[int(y)] for y in test.labels]
    correct = sum(r["class"] == labels[int(Path(r["file"]).stem)] for r in rows)
    result = json.loads((trained_run / "result.json").read_text())  # a float32 fraction of 360
    assert len(rows) == len(test) and correct == round(result["impactx_test_accuracy"] * len(test))
    assert len(list((to / "overlays").glob("*.png"))) == len(test)


@pytest.mark.slow
def test_serve_answers_concurrent_clients_as_offline_and_refuses_bad_requests(trained_run, digits, tmp_path):
    _, test = digits
    n, clients = 200, 8
    checkpoint = trained_run / "stage2" / "model.pt"
    offline = Predictor.from_checkpoint(checkpoint).predict(test.images[:n].permute(0, 2, 3, 1).numpy())
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/"
    with LocalCluster(tmp_path / "cluster", num_cpus=2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.ports['--port']}"}
        log = tmp_path / "serve.log"
        server = subprocess.Popen([str(BIN / "impactx"), "serve", "--out", str(trained_run), "--port", str(port),
                                   "--max-batch-size", "16"], env=env, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, log.read_text()[-3000:]
                try:
                    info = requests.get(url, timeout=5)
                    if info.status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):  # not up, or still deploying
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            assert info.json() == {"method": "impactx", "classes": test.classes, "image_size": [32, 32]}

            def ask(i: int) -> dict:  # even: the PNG file's bytes; odd: a JSON array
                if i % 2 == 0:
                    r = requests.post(url, data=png(test.images[i]), headers={"content-type": "image/png"},
                                      timeout=60)
                else:
                    r = requests.post(url, json={"image": test.images[i].permute(1, 2, 0).tolist()}, timeout=60)
                assert r.status_code == 200, r.text
                return r.json()

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(ask, range(n)))
            wall = time.perf_counter() - start
            print(f"serve: {n} requests from {clients} clients in {wall:.1f} s ({n / wall:.1f} requests/s)")
            assert wall < 120
            assert [a["class"] for a in answers] == offline.labels.tolist()
            assert [a["class_name"] for a in answers] == offline.names()
            # equal up to float32 rounding: a request is batched with others than offline
            assert_batch_close(np.float32([a["probabilities"] for a in answers]), offline.probabilities)
            assert_batch_close(np.float32([a["map"] for a in answers]), offline.maps)
            for body, ctype in ((b"", "image/png"), (b"not an image", "image/png"),
                                (json.dumps({"image": [[0, 0, 0]]}).encode(), "application/json")):
                r = requests.post(url, data=body, headers={"content-type": ctype}, timeout=30)
                assert r.status_code == 400 and "\n" not in r.json()["error"], r.text
            again = requests.post(url, data=png(test.images[0]), headers={"content-type": "image/png"}, timeout=30)
            assert again.status_code == 200 and again.json()["class"] == answers[0]["class"]
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: Serve shut down, the command ends
            assert server.wait(timeout=120) == 0, log.read_text()[-3000:]
            said = log.read_text()  # whole now: Serve can answer before the command prints its address
            assert "stopped serving" in said
            assert f"impactx model of run {trained_run} at {url} (1 replica)" in said and "already runs" not in said
        finally:
            if server.poll() is None:
                stop_session(server)
