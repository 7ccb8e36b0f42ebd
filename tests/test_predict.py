"""Using a trained model: the Predictor (class, probabilities, the method's own map), the
overlays, and ``impactx predict`` on files, with its one-line errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from impactx_ray.cli import main
from impactx_ray.config import RunConfig
from impactx_ray.errors import UserError
from impactx_ray.methods import BASELINE, METHODS, ModelSpec, checkpoint_meta, load_model
from impactx_ray.models import ImpactX, create_backbone
from impactx_ray.predict import Predictor, as_model_input
from impactx_ray.predict.overlay import overlay
from impactx_ray.train.checkpoint import save_checkpoint

from tolerances import assert_batch_close

CFG = RunConfig(model="lenet5", dataset="digits", epochs=1, max_evals=40)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, digits):
    """A run directory with untrained baseline and IMPACTX checkpoints (shapes, files, errors)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(CFG.to_dict()))
    train, _ = digits
    torch.manual_seed(0)
    m = create_backbone("lenet5", 10)
    done = {"val_accuracy": 0.1, "best_epoch": 1, "seconds": 0.0}
    save_checkpoint(out / "stage1" / "model.pt", m.state_dict(),
                    {**checkpoint_meta(BASELINE, CFG, train), **done})
    impactx = ImpactX.from_backbone(m, image_size=32, channels=3)
    save_checkpoint(out / "stage2" / "model.pt", impactx.state_dict(),
                    {**checkpoint_meta(METHODS["impactx"], CFG, train, stage1_hash="x"), **done})
    return out


def fails_cleanly(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("impactx: error:"), err
    for needle in needles:
        assert needle in err, err


def test_uint8_hwc_and_float_chw_inputs_are_the_same_batch():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    x = as_model_input(hwc, (32, 32))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert float(x[1, 2, 5, 7]) == np.float32(hwc[1, 5, 7, 2]) / np.float32(255.0)  # as training divides
    assert torch.equal(as_model_input(x, (32, 32)), x)


@pytest.mark.parametrize("images, needle", [
    (np.zeros((2, 3, 32, 32), np.uint8), "N×32×32×3"),       # uint8 must be HWC
    (np.zeros((2, 32, 32, 3), np.float32), "N×3×32×32"),     # float must be CHW
    (np.zeros((2, 28, 28, 3), np.uint8), "(2, 28, 28, 3)"),  # another size
    (np.zeros((32, 32, 3), np.uint8), "(32, 32, 3)"),        # no batch axis
    (np.zeros((0, 32, 32, 3), np.uint8), "non-empty"),
    (np.full((1, 3, 32, 32), 2.0, np.float32), "[0, 1]"),
    (np.zeros((1, 32, 32, 3), np.int32), "int32"),
])
def test_bad_inputs_are_one_line_errors(images, needle):
    with pytest.raises(UserError) as e:
        as_model_input(images, (32, 32))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_predictions_are_the_models_own(untrained_run, digits):
    _, test = digits
    path = untrained_run / "stage2" / "model.pt"
    model, _ = load_model(path, ModelSpec("lenet5", 10))
    predictor = Predictor.from_checkpoint(path)
    x = test.float_images(slice(0, 300))
    pred = predictor.predict(test.images[:300].permute(0, 2, 3, 1).numpy(), batch_size=128)
    with torch.no_grad():
        logits = torch.cat([model(c) for c in x.split(128)])
        maps = torch.cat([model.explain(c) for c in x.split(128)])
    assert np.array_equal(pred.labels, logits.argmax(1).numpy())
    assert np.array_equal(pred.probabilities, torch.softmax(logits, 1).numpy())
    assert np.array_equal(pred.maps, maps.numpy()) and pred.maps.shape == (300, 3, 32, 32)
    assert pred.classes == [str(i) for i in range(10)]  # from the checkpoint
    top = pred.top(0)
    assert len(top) == 5 and top[0][0] == pred.names()[0]
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    answer = pred.answer(0)  # JSON-able, float32 values exactly
    assert np.array_equal(np.float32(json.loads(json.dumps(answer))["map"]), pred.maps[0])
    baseline = Predictor.from_checkpoint(untrained_run / "stage1" / "model.pt").predict(x)
    assert baseline.maps is None and not Predictor.from_checkpoint(untrained_run / "stage1" / "model.pt").has_map


def test_overlay_size_and_colour_scale():
    image = np.full((3, 32, 32), 100, np.uint8)
    m = np.zeros((3, 32, 32), np.float32)
    m[:, 3, 4] = 0.5  # the most positive pixel
    m[:, 20, 9] = -0.25  # a negative one, half as strong
    out = overlay(image, m)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8  # 32×32 upscaled 8×
    assert tuple(out[3 * 8 + 4, 4 * 8 + 4]) == (255, 0, 0)  # bwr's positive end
    assert tuple(out[0, 0]) == (100, 100, 100)  # where the map is 0, the image (grey)
    r, g, b = (int(v) for v in out[20 * 8, 9 * 8])
    assert b > r and b > g  # against the class: blue
    attention = np.zeros((1, 96, 96), np.float32)
    attention[0, 50, 60] = 1.0
    out = overlay(np.zeros((3, 96, 96), np.uint8), attention, signed=False)
    assert out.shape == (288, 288, 3) and tuple(out[150, 180]) == (128, 0, 0)  # jet's top end


def test_predict_writes_csv_maps_and_overlays(untrained_run, digits, tmp_path, capsys):
    _, test = digits
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"d{i}.png")
    Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(folder / "sub" / "big.jpg")  # resized
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--out", str(untrained_run), str(folder), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable file of 5" in captured.err and "broken.png" in captured.err
    to = untrained_run / "predictions" / "impactx"
    rows = list(csv.DictReader((to / "predictions.csv").open()))
    assert [Path(r["file"]).name for r in rows] == ["d0.png", "d1.png", "d2.png", "big.jpg"]
    assert rows[3]["map"] == "maps/sub__big.npy" and (to / "overlays" / "sub__big.png").exists()
    assert np.load(to / rows[0]["map"]).shape == (3, 32, 32)
    assert len(rows[0]["top5"].split(";")) == 5
    expected = Predictor.from_checkpoint(untrained_run / "stage2" / "model.pt").predict(
        test.images[:3].permute(0, 2, 3, 1).numpy())
    assert [r["class"] for r in rows[:3]] == expected.names()
    assert_batch_close(np.load(to / "maps" / "d1.npy"), expected.maps[1])  # 4 images in its batch, not 3


def test_predict_errors_are_one_line(untrained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    fails_cleanly(capsys, ["predict", "--out", str(untrained_run), str(empty)], str(empty), "no images")
    fails_cleanly(capsys, ["predict", "--out", str(untrained_run), str(tmp_path / "nope.png")], "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    fails_cleanly(capsys, ["predict", "--out", str(untrained_run), str(bad)], "readable image", "bad.png")
    fails_cleanly(capsys, ["predict", "--out", str(untrained_run), "--method", "abn", str(bad)],
                  "no ABN model", "--method abn")
    fails_cleanly(capsys, ["predict", "--out", str(tmp_path), str(bad)], "not a run directory")
