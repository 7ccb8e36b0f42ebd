"""Image folders with unreadable files, too few classes or relative paths: unreadable files are
skipped with a warning naming each, or refused with --strict, in runs and sweeps; the rest is
refused with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_cli import TINY, fails_cleanly

from impactx_ray.cli import main
from impactx_ray.data import load_dataset
from impactx_ray.errors import UserError

from fixtures_data import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]


# -- image folders ---------------------------------------------------------------------------------
def broken_images(root: Path) -> list[Path]:
    """A two-class folder plus four files PIL cannot read; returns those four."""
    write_imagefolder(root, classes=("cat", "dog"), n_per_class=3, size=(32, 32))
    cat = root / "train" / "cat"
    good = cat / "img_000.png"
    Image.open(good).convert("RGB").save(cat / "whole.jpg", quality=90)
    truncated = cat / "truncated.jpg"
    truncated.write_bytes((cat / "whole.jpg").read_bytes()[:300])
    (cat / "whole.jpg").unlink()
    empty = cat / "empty.jpg"
    empty.write_bytes(b"")
    text = root / "train" / "dog" / "notes.jpg"
    text.write_text("this is text, not a JPEG\n")
    bomb = root / "train" / "dog" / "bomb.png"
    Image.new("L", (400, 400)).save(bomb)  # a "bomb" under the limit the test sets below
    return [bomb, empty, text, truncated]


def test_unreadable_images_are_skipped_with_a_warning_naming_each(tmp_path, monkeypatch):
    bad = broken_images(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # 400x400 = 160,000 pixels: a bomb
    said = []
    train, test = load_dataset(f"imagefolder:{tmp_path}", warn=said.append)
    assert len(train) == 6 and len(test) == 6  # the readable ones, both classes
    (warning,) = said
    assert warning.startswith(f"skipped 4 unreadable image files of 10 in {tmp_path / 'train'}")
    assert [line.split(": ")[0].strip() for line in warning.splitlines()[1:]] == \
        [str(p) for p in sorted(bad, key=lambda p: (p.parent.name, p.name))]
    assert "truncated" in warning and "decompression bomb" in warning


def test_unreadable_images_in_a_run_are_warned_about_or_refused_with_strict(tmp_path, capsys,
                                                                          monkeypatch):
    broken_images(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)
    out = tmp_path / "run"
    dataset = ["--dataset", f"imagefolder:{tmp_path / 'imgs'}"]
    fails_cleanly(capsys, ["run", "--out", str(out), *TINY, *dataset, "--strict"],
                  "image file ", "is unreadable", "drop --strict")
    assert not out.exists()
    # Without --strict the run goes on; the warning is in the output and result.json.
    assert main(["run", "--out", str(out), *TINY, *dataset]) == 0
    err = capsys.readouterr().err
    assert "impactx: warning: skipped 4 unreadable image files of 10" in err
    result = json.loads((out / "result.json").read_text())
    assert any(w.startswith("skipped 4 unreadable image files") for w in result["warnings"])


def test_a_sweep_with_strict_refuses_unreadable_images_before_ray(tmp_path):
    broken_images(tmp_path / "imgs")
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "full_grid.py"), "--smoke",
                           "--datasets", f"imagefolder:{tmp_path / 'imgs'}", "--strict",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("full_grid.py: error: image file ") and "drop --strict" in line
    assert not out.exists()  # refused before the sweep claimed its directory or started Ray


def test_a_one_class_image_folder_is_refused(tmp_path, capsys):
    write_imagefolder(tmp_path / "imgs", classes=("cat",), size=(32, 32))
    fails_cleanly(capsys, ["run", "--out", str(tmp_path / "run"), *TINY, "--dataset",
                           f"imagefolder:{tmp_path / 'imgs'}"], "one class folder ('cat')")
    assert not (tmp_path / "run").exists()


def test_a_class_without_a_readable_image_is_refused(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog"), n_per_class=1, size=(32, 32))
    for f in (tmp_path / "train" / "dog").iterdir():
        f.write_bytes(b"")
    with pytest.raises(UserError, match="class folder dog holds no readable image"):
        load_dataset(f"imagefolder:{tmp_path}", warn=lambda _: None)


def test_a_relative_dataset_path_is_stored_absolute(tmp_path, monkeypatch, capsys):
    write_imagefolder(tmp_path / "imgs", classes=("a", "b"), n_per_class=4, size=(32, 32))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", "run", *TINY, "--dataset", "imagefolder:imgs"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dataset"] == f"imagefolder:{tmp_path / 'imgs'}"
    assert saved["data_root"] == str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a later step from another directory: same data
    assert main(["evaluate", "--out", str(tmp_path / "run"), "--quiet"]) == 0
