"""The face stage (data.faces), face bundles, aligned training data and the batch script's face rows.

    pytest tests/test_faces.py     # ~30 s; needs dlib-bin and the 5-point model (`python -m data.faces fetch`)

Real photographs: scikit-image's astronaut (Eileen Collins, NASA, public domain), shipped with
scikit-image (a dev dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data.faces import DLIB_5_POINT_TEMPLATE, UTKFACE_POINTS, DetectSettings, FaceAligner, FaceFraming, FaceStageError
from data.preprocess import PreprocessSpec, preprocess
from models import get_model
from models.bundle import BundleError, load_bundle, read_meta, save_bundle

# The astronaut's face, read off the photo by eye (512x512): forehead at y~75, chin at y~180,
# cheeks at x~170 and x~275.
ASTRONAUT_FACE = (170, 75, 275, 180)
AGE_TARGET = {"name": "age", "min": 0.0, "max": 116.0}


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8 RGB


def iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def face_bundle(out: Path, faces: dict | None = {"size": 200, "padding": 0.25}) -> Path:  # noqa: B006
    """A small untrained age regressor on 32x32 RGB that records a face framing (or none)."""
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "num_outputs": 1}
    spec = PreprocessSpec(input_size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    net = get_model("lenet5", **kwargs)
    return save_bundle(out, net, task="regression", architecture="lenet5", architecture_kwargs=kwargs,
                       preprocess=spec, target=AGE_TARGET, faces=faces)  # fmt: skip


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


def test_astronaut_one_face_on_the_face(aligner: FaceAligner) -> None:
    """The shipped settings report exactly one face on the astronaut, and its box is on her face."""
    faces = aligner(astronaut())
    assert len(faces) == 1, [(f.box, f.score) for f in faces]
    face = faces[0]
    assert iou(face.box, ASTRONAUT_FACE) > 0.6, face.box
    assert face.score > 0.5
    assert len(face.landmarks) == 5
    x0, y0, x1, y1 = face.box
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in face.landmarks)  # eyes and nose inside the box
    assert face.chip.shape == (200, 200, 3) and face.chip.dtype == np.uint8


def test_low_threshold_finds_the_false_positive_the_default_drops(aligner: FaceAligner) -> None:
    """The threshold matters: at -0.5 HOG also reports a low-scoring non-face (the 'facts' of issue 11)."""
    loose = FaceAligner(settings=DetectSettings(threshold=-0.5, lone_threshold=-0.5))
    found = loose.detect(astronaut())
    scores = sorted((f.score for f in found), reverse=True)
    assert len(scores) > 1
    assert max(scores[1:]) < DetectSettings().threshold < scores[0]


def test_chip_realigns_to_itself(aligner: FaceAligner) -> None:
    """A chip pasted into a bigger scene and aligned again gives back (nearly) the same chip: the framing
    is stable, which is what makes serving's chips match the training chips."""
    chip = aligner(astronaut())[0].chip
    rng = np.random.default_rng(0)
    scene = rng.integers(60, 120, (480, 640, 3), dtype=np.uint8)
    scene[100:300, 300:500] = chip
    again = aligner(scene)
    assert len(again) == 1
    assert iou(again[0].box, (300, 100, 500, 300)) > 0.5
    assert np.abs(again[0].chip.astype(float) - chip).mean() < 20  # same face, same place (a pixel or two off)
    shifted = np.roll(chip, 20, axis=1)
    assert np.abs(shifted.astype(float) - chip).mean() > np.abs(again[0].chip.astype(float) - chip).mean()


def test_lone_threshold_keeps_only_the_best_weak_face() -> None:
    """Below ``threshold`` only a photo's best candidate is kept, and only if it reaches ``lone_threshold``."""
    img = astronaut()
    strict = FaceAligner(settings=DetectSettings(threshold=5.0, lone_threshold=-0.5)).detect(img)
    assert len(strict) == 1 and strict[0].score > 1.0  # the real face, not the weaker false positive
    assert FaceAligner(settings=DetectSettings(threshold=5.0, lone_threshold=4.0)).detect(img) == []


def test_grayscale_and_min_face(aligner: FaceAligner) -> None:
    gray = np.asarray(Image.fromarray(astronaut()).convert("L"))
    faces = aligner(gray)
    assert len(faces) == 1 and faces[0].chip.shape == (200, 200, 1)
    small = np.asarray(Image.fromarray(astronaut()).resize((256, 256)))  # the face is ~45 px now
    assert FaceAligner(settings=DetectSettings(min_face=80)).detect(small) == []
    found = FaceAligner(settings=DetectSettings(min_face=40)).detect(small)
    assert len(found) == 1 and iou(found[0].box, tuple(v / 2 for v in ASTRONAUT_FACE)) > 0.5


def test_aligner_is_picklable_and_thread_safe(aligner: FaceAligner) -> None:
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    clone = pickle.loads(pickle.dumps(aligner))
    img = astronaut()
    with ThreadPoolExecutor(3) as pool:
        boxes = list(pool.map(lambda _: clone(img)[0].box, range(6)))
    assert set(boxes) == {aligner(img)[0].box}


def test_bundle_faces_entry_round_trip(tmp_path: Path) -> None:
    b = face_bundle(tmp_path / "b", {"size": 100, "padding": 0.3})
    assert read_meta(b).faces == {"aligned": True, "landmarks": "dlib_5_point", "size": 100, "padding": 0.3}
    assert read_meta(face_bundle(tmp_path / "none", None)).faces is None
    with pytest.raises(BundleError, match="padding"):
        face_bundle(tmp_path / "bad", {"size": 100, "padding": -1})


def test_bundle_faces_points_round_trip_and_checks(tmp_path: Path) -> None:
    pts = [[0.75, 0.3], [0.6, 0.3], [0.22, 0.3], [0.37, 0.3], [0.49, 0.59]]
    b = face_bundle(tmp_path / "b", {"size": 100, "points": pts})
    assert read_meta(b).faces == {"aligned": True, "landmarks": "dlib_5_point", "size": 100, "points": pts}
    for bad in (pts[:4], [[0.5, 1.5]] * 5, "utkface"):
        with pytest.raises(BundleError, match="points"):
            face_bundle(tmp_path / "bad", {"size": 100, "points": bad})


def test_points_framing_cuts_what_get_face_chip_cuts(aligner: FaceAligner) -> None:
    """Landmark places equal to dlib's template with a padding cut the very chip get_face_chip cuts."""
    img = astronaut()
    pad = 0.25
    pts = (np.asarray(DLIB_5_POINT_TEMPLATE) + pad) / (2 * pad + 1)
    by_points = FaceAligner(FaceFraming(200, points=pts.tolist()))(img)[0].chip
    assert np.array_equal(by_points, aligner(img)[0].chip)  # the shipped aligner: padding 0.25
    utk = FaceAligner(FaceFraming(200, points=UTKFACE_POINTS))(img)[0].chip
    assert utk.shape == (200, 200, 3) and not np.array_equal(utk, by_points)


def test_calibrate_measures_the_framing_chips_were_cut_with(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m data.faces calibrate` on chips cut to UTKFace's points finds those points again."""
    import json

    from data.faces import main

    img = astronaut()
    framing = FaceFraming(200, points=UTKFACE_POINTS)
    for i, flip in enumerate((False, True)):
        chip = FaceAligner(framing)(img[:, ::-1] if flip else img)[0].chip
        Image.fromarray(chip).save(tmp_path / f"chip{i}.jpg", quality=95)
    assert main(["calibrate", str(tmp_path / "*.jpg")]) == 0
    out = capsys.readouterr().out
    assert "found in 2 of 2 chips" in out
    measured = np.asarray(json.loads(out.strip().splitlines()[-1])["points"])
    assert np.abs(measured - np.asarray(UTKFACE_POINTS)).max() < 0.02  # a few pixels of a 200 px chip
    assert np.abs(measured - (np.asarray(DLIB_5_POINT_TEMPLATE) + 0.25) / 1.5).max() > 0.015  # not padding 0.25's


def test_missing_landmark_model_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from serving import batch
    from serving.predictor import Predictor

    b = face_bundle(tmp_path / "b")
    monkeypatch.setenv("SVERTKA_LANDMARKS", str(tmp_path / "nowhere.dat"))
    with pytest.raises(FaceStageError, match="data.faces fetch"):
        Predictor(b, device="cpu")
    (tmp_path / "img").mkdir()
    Image.fromarray(astronaut()).save(tmp_path / "img" / "a.png")
    out = tmp_path / "o.csv"
    capsys.readouterr()
    assert batch.main(["--model", str(b), "--input", str(tmp_path / "img"), "--output", str(out)]) == 1
    assert not out.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "landmark" in lines[0], lines
    # a bundle without the entry needs no face stage
    Predictor(face_bundle(tmp_path / "plain", None), device="cpu")


def test_predictor_faces_and_no_detect(tmp_path: Path) -> None:
    from serving.predictor import Predictor

    p = Predictor(face_bundle(tmp_path / "b"), device="cpu")
    img = astronaut()
    prep = p.prepare(img)
    assert len(prep.faces) == 1 and prep.inputs.shape == (1, 3, 32, 32) and prep.size == (512, 512)
    out = p.face_results(prep, p.predict_tensors(prep.inputs))
    chip = FaceAligner()(img)[0].chip
    net, meta = load_bundle(tmp_path / "b")
    with torch.no_grad():
        ref = float(net(preprocess(chip, meta.preprocess)[None])[0, 0].clamp(0, 116))
    assert out[0]["age"] == pytest.approx(ref, abs=1e-5) and out[0]["box"] == list(prep.faces[0]["box"])
    whole = p.prepare(img, detect=False)
    assert whole.faces == [{"box": [0, 0, 512, 512], "score": None}]
    assert len(p.prepare(np.full((480, 640, 3), 128, np.uint8)).faces) == 0
    two = np.concatenate([img, img[:, ::-1]], axis=1)  # the astronaut and her mirror image
    assert len(p.prepare(two).faces) == 2 and len(p.prepare(two, max_faces=1).faces) == 1


def mixed_photos(folder: Path) -> Path:
    """``folder`` with one.jpg (one face), two.png (two faces), blank.png (none) and text.jpg (not an image)."""
    folder.mkdir()
    img = astronaut()
    Image.fromarray(img).save(folder / "one.jpg", quality=92)
    Image.fromarray(np.concatenate([img, img[:, ::-1]], axis=1)).save(folder / "two.png")
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(folder / "blank.png")
    (folder / "text.jpg").write_text("not an image")
    return folder


def test_batch_mixed_folder_rows_per_face(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Faces, no faces, broken files: one row per face, one per faceless or broken file, exit 0."""
    from serving import batch

    photos = mixed_photos(tmp_path / "photos")
    (photos / "cut.jpg").write_bytes((photos / "one.jpg").read_bytes()[:3000])
    b = face_bundle(tmp_path / "b")
    out = tmp_path / "ages.csv"
    capsys.readouterr()
    cmd = ["--model", str(b), "--input", str(photos), "--batch-size", "2"]
    assert batch.main([*cmd, "--output", str(out), "--workers", "1"]) == 0  # a worker process: the aligner pickled
    stderr = capsys.readouterr().err
    t = pd.read_csv(out)
    assert list(t.columns) == ["path", "face", "box_x0", "box_y0", "box_x1", "box_y1", "face_score", "age", "error"]
    by = {Path(p).name: g for p, g in t.groupby("path")}
    assert sorted(by) == ["blank.png", "cut.jpg", "one.jpg", "text.jpg", "two.png"]
    assert len(t) == 6  # 1 + 2 faces, 1 faceless, 2 broken
    assert list(by["two.png"]["face"]) == [0, 1] and by["two.png"]["error"].isna().all()
    one = by["one.jpg"].iloc[0]
    assert iou((one.box_x0, one.box_y0, one.box_x1, one.box_y1), ASTRONAUT_FACE) > 0.6 and one.face_score > 0.5
    assert 0 <= one.age <= 116
    assert by["blank.png"]["error"].tolist() == ["no face found"] and by["blank.png"]["face"].isna().all()
    for name in ("cut.jpg", "text.jpg"):
        assert by[name]["error"].notna().all() and by[name]["error"].iloc[0] != "no face found"
    assert "3 predicted, 1 without a face, 2 unreadable" in stderr
    # --no-detect: the files are chips; one row per file, the whole image as the box
    out2 = tmp_path / "chips.csv"
    assert batch.main([*cmd, "--output", str(out2), "--workers", "0", "--no-detect"]) == 0
    t2 = pd.read_csv(out2)
    assert len(t2) == 5 and t2.loc[t2["path"].str.endswith("two.png"), "box_x1"].item() == 1024


def test_batch_truth_scores_chips_and_faces(tmp_path: Path) -> None:
    """--truth works for a face model: with --no-detect on chips, and with detection (largest face)."""
    from serving import batch

    chips = tmp_path / "chips"
    chips.mkdir()
    chip = FaceAligner()(astronaut())[0].chip
    for i in range(3):
        Image.fromarray(np.roll(chip, i, axis=0)).save(chips / f"{i}.png")
    (chips / "labels.csv").write_text("name,age\n0.png,30\n1.png,40\n2.png,50\n")
    b = face_bundle(tmp_path / "b")
    for flag in ("--no-detect", "--detect"):
        out = tmp_path / f"o{flag}.csv"
        assert batch.main(["--model", str(b), "--input", str(chips), "--output", str(out), "--workers", "0",
                           "--truth", str(chips / "labels.csv"), flag]) == 0  # fmt: skip
        metrics = pd.read_json(out.with_name(out.name + ".metrics.json"), typ="series")
        t = pd.read_csv(out)
        want = np.abs(t.groupby("path")["age"].first().to_numpy() - np.array([30, 40, 50])).mean()
        assert metrics["n"] == 3 and metrics["mae"] == pytest.approx(want, abs=1e-4)


def photo_csv(tmp_path: Path) -> Path:
    """Six unaligned photos of the astronaut (different places and backgrounds) and a blank one, with ages."""
    photos = tmp_path / "photos"
    photos.mkdir()
    img = astronaut()
    rows = []
    for i in range(6):
        scene = np.full((400, 600, 3), 40 * i, np.uint8)
        scene[50 + 10 * i : 50 + 10 * i + 300, 100 : 100 + 300] = np.asarray(Image.fromarray(img).resize((300, 300)))
        Image.fromarray(scene).save(photos / f"{i}.png")
        rows.append(f"{i}.png,{20 + i}")
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(photos / "blank.png")
    rows.append("blank.png,50")
    (photos / "ages.csv").write_text("path,age\n" + "\n".join(rows) + "\n")
    return photos / "ages.csv"


def test_align_faces_data_option(tmp_path: Path) -> None:
    """A CSV of unaligned photos: each largest face aligned once into the cache, faceless photos left out,
    the framing recorded for the bundle; a second set-up reads the cached chips."""
    from data.folder import CSVDataModule

    kw = dict(csv=str(photo_csv(tmp_path)), target_column="age", input_size=32, align_faces=True,
              face_size=64, cache_dir=str(tmp_path / "cache"), val_fraction=0.2, test_fraction=0.0)  # fmt: skip
    with pytest.warns(UserWarning, match="align_faces"):
        dm = CSVDataModule(**kw)
        dm.setup()
    n = sum(len(s.targets) for s in dm.splits.values())
    assert n == 6  # the blank photo has no face
    chips = sorted((tmp_path / "cache" / "faces").glob("*.png"))
    assert len(chips) == 6 and Image.open(chips[0]).size == (64, 64)
    assert dm.bundle_info()["faces"] == FaceFraming(64, points=UTKFACE_POINTS).to_dict()  # UTKFace's framing
    mtimes = [c.stat().st_mtime_ns for c in chips]
    dm2 = CSVDataModule(**kw)
    with pytest.warns(UserWarning):
        dm2.setup()
    assert [c.stat().st_mtime_ns for c in chips] == mtimes  # read back, not made again
    assert CSVDataModule(**{**kw, "align_faces": False}).bundle_info()["faces"] is None


def test_faces_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data.faces import main

    Image.fromarray(astronaut()).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("x")
    assert main([str(tmp_path / "a.png"), str(tmp_path / "bad.png")]) == 0
    a, bad = capsys.readouterr().out.strip().splitlines()
    assert a.count("box=") == 1 and "error" in bad


def test_fit_on_unaligned_photos_exports_a_face_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real training CLI on a CSV of photos with align_faces: its bundle records the framing and the
    predictor then finds the face in a photo and scores its chip."""
    from serving.predictor import Predictor
    from training.cli import main

    csv = photo_csv(tmp_path)
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path / "out"))
    cfg = tmp_path / "age.yaml"
    cfg.write_text(
        "model:\n  class_path: training.AgeRegressor\n  init_args: {net: lenet5}\n"
        "data:\n  class_path: data.folder.CSVDataModule\n"
        f"  init_args: {{csv: {csv}, target_column: age, target_min: 0, target_max: 116, input_size: 32,\n"
        f"    batch_size: 4, val_fraction: 0.34, test_fraction: 0.0, align_faces: true, face_size: 100,\n"
        f"    cache_dir: {tmp_path / 'cache'}}}\n"
    )
    args = ["fit", "-c", str(cfg), "--name", "faces", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--early_stopping_patience", "null"]  # fmt: skip
    with pytest.warns(UserWarning, match="align_faces"):
        assert main(args) == 0
    bundle = tmp_path / "out" / "artifacts" / "faces"
    assert read_meta(bundle).faces == {"aligned": True, "landmarks": "dlib_5_point", "size": 100,
                                       "points": [list(p) for p in UTKFACE_POINTS]}  # fmt: skip
    p = Predictor(bundle, device="cpu")
    prep = p.prepare(astronaut())
    assert len(prep.faces) == 1 and 0 <= p.face_results(prep, p.predict_tensors(prep.inputs))[0]["age"] <= 116
