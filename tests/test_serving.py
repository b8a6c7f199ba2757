"""The BentoML service, for real: bundles saved to a temporary model store, `bentoml serve` started
as a subprocess, every endpoint and every kind of bad input exercised over HTTP.

    pytest tests/test_serving.py            # one shared server (~20 s to start), plus `bentoml build` (~12 s)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from data.preprocess import load_image, preprocess
from models import get_model
from models.bundle import load_bundle, read_meta

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]  # the quickstart (digits) classifier
AGE_TARGET = {"name": "age", "min": 0.0, "max": 116.0}
MAX_PIXELS = 40_000_000  # the test server's SVERTKA_MAX_PIXELS (the default)
MAX_BODY = 3_000_000  # the test server's SVERTKA_MAX_BODY_BYTES
START_TIMEOUT = 180


# ---------------------------------------------------------------------------------------------
# Bundles, a BentoML home, images
# ---------------------------------------------------------------------------------------------


def _train(out: Path, args: list[str]) -> Path:
    """A real ``python -m training fit`` (in this process), exported to ``out/artifacts/<name>``."""
    from training.cli import main

    old = os.environ.get("SVERTKA_OUTPUT_DIR")
    os.environ["SVERTKA_OUTPUT_DIR"] = str(out)
    try:
        common = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
                  "--trainer.accelerator", "cpu", "--early_stopping_patience", "null"]  # fmt: skip
        assert main(["fit", *args, *common]) == 0
    finally:
        if old is None:
            os.environ.pop("SVERTKA_OUTPUT_DIR", None)
        else:
            os.environ["SVERTKA_OUTPUT_DIR"] = old
    name = args[args.index("--name") + 1]
    return out / "artifacts" / name


def make_bundles(root: Path) -> dict[str, Path]:
    """Two tiny, freshly trained bundles, made by the real training CLI and its export.

    A LeNet-5 digit classifier (the quickstart config: 28x28 grayscale, classes "0".."9", a few
    batches) and a LeNet-5 age regressor on 32x32 RGB images (a CSV data set of 24 generated
    images with an ``age`` column, target range 0-116).
    """
    clf = _train(root, ["-c", str(REPO / "configs" / "quickstart.yaml"), "--name", "clf",
                        "--trainer.limit_train_batches", "10", "--trainer.limit_val_batches", "2"])  # fmt: skip
    faces = root / "faces"
    faces.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        age = int(rng.integers(1, 90))
        img = np.clip(rng.normal(age * 2.5, 30, (32, 32, 3)), 0, 255).astype(np.uint8)  # brighter = older
        Image.fromarray(img).save(faces / f"{i}.png")
        rows.append(f"{i}.png,{age}")
    (faces / "ages.csv").write_text("path,age\n" + "\n".join(rows) + "\n")
    cfg = root / "age.yaml"
    cfg.write_text(
        "model:\n  class_path: training.AgeRegressor\n  init_args: {net: lenet5}\n"
        "data:\n  class_path: data.folder.CSVDataModule\n"
        f"  init_args: {{csv: {faces / 'ages.csv'}, target_column: age, target_min: 0, target_max: 116,\n"
        "    channels: 3, input_size: 32, batch_size: 8, val_fraction: 0.25, test_fraction: 0.25,\n"
        f"    cache_dir: {root / 'cache'}}}\n"
    )
    age = _train(root, ["-c", str(cfg), "--name", "age"])
    return {"clf": clf, "age": age}


@contextmanager
def bentoml_home(home: Path) -> Iterator[None]:
    """Point this process's BentoML at ``home`` (its store paths are cached singletons)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    (home / "models").mkdir(parents=True, exist_ok=True)
    providers = (BentoMLContainer.bentoml_home, BentoMLContainer.model_store_dir, BentoMLContainer.model_store)
    old_env = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store_dir.set(str(home / "models"))
    BentoMLContainer.model_store.set(ModelStore(str(home / "models")))
    try:
        yield
    finally:
        for p in providers:
            p.reset()
        if old_env is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old_env


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample_images() -> dict[str, bytes]:
    """Every common mode, PNG and JPEG; deterministic content with structure (not flat)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8), "RGB")
    gray = rgb.convert("L")
    i16 = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16))  # mode I;16
    assert i16.mode == "I;16"
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    return {
        "rgb.png": encode(rgb),
        "rgb.jpg": encode(rgb, "JPEG", quality=90),
        "gray.png": encode(gray),
        "gray.jpg": encode(gray, "JPEG"),
        "bilevel.png": encode(gray.convert("1")),
        "la.png": encode(gray.convert("LA")),
        "palette.png": encode(rgb.convert("P")),
        "rgba.png": encode(rgba),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "i16.png": encode(i16),
    }


def exif_rotated_jpeg() -> bytes:
    """A 45x20 JPEG whose EXIF orientation (6) says: show me rotated 90 degrees clockwise."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (20, 45, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def reference(bundle: Path, data: bytes) -> np.ndarray:
    """models.bundle + data.preprocess + forward: softmax scores or the clamped regression value."""
    net, meta = load_bundle(bundle)
    x = preprocess(load_image(data, meta.preprocess.channels), meta.preprocess)[None]  # (1, C, H, W)
    with torch.no_grad():
        out = net(x)
    if meta.task == "classification":
        return out.softmax(1)[0].numpy()
    return out[:, 0].clamp(meta.target["min"], meta.target["max"]).numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(home: Path, models: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVERTKA_")}
    env.update(
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="True",
        SVERTKA_MODELS=models,
        SVERTKA_WORKERS="1",
        SVERTKA_TORCH_THREADS="1",
        SVERTKA_MAX_PIXELS=str(MAX_PIXELS),
        SVERTKA_MAX_BODY_BYTES=str(MAX_BODY),
        SVERTKA_MAX_IN_FLIGHT="24",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server we started (it stops its workers), then SIGKILL its process group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Fixtures: one store, one server for the module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Bundles saved into a temporary BENTOML_HOME with models.store."""
    from models.store import bundle_dir_for_tag, save_bundle_to_bentoml

    root = tmp_path_factory.mktemp("serving")
    bundles = make_bundles(root / "bundles")
    home = root / "bentoml"
    with bentoml_home(home):
        clf_tag = save_bundle_to_bentoml(bundles["clf"], "test_clf", labels={"stage": "test"})
        age_tag = save_bundle_to_bentoml(bundles["age"], "test_age")
        bundles["face"] = with_faces(bundles["age"], root / "bundles" / "face")
        face_tag = save_bundle_to_bentoml(bundles["face"], "test_face_age")
        assert bundle_dir_for_tag("test_clf:latest") == bundle_dir_for_tag(clf_tag)
    return {
        "home": home,
        "bundles": bundles,
        "clf_tag": clf_tag,
        "age_tag": age_tag,
        "face_tag": face_tag,
        "root": root,
    }


def with_faces(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` whose bundle.json says its model expects UTKFace-framed face chips."""
    import shutil

    shutil.copytree(bundle, out)
    meta = json.loads((out / "bundle.json").read_text())
    meta["faces"] = {"aligned": True, "landmarks": "dlib_5_point", "size": 200, "padding": 0.25}
    (out / "bundle.json").write_text(json.dumps(meta))
    assert read_meta(out).faces["size"] == 200
    return out


@contextmanager
def start_server(home: Path, models: str, log_path: Path, **env: str) -> Iterator[str]:
    """`bentoml serve` at the repo root on a free port; yields its URL once /readyz says ready, stops it after."""
    port = free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "--port", str(port), "--host", "127.0.0.1"],
            cwd=REPO,
            env=serve_env(home, models, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"bentoml serve not ready after {START_TIMEOUT} s:\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def server(store: dict) -> Iterator[str]:
    """`bentoml serve` at the repo root on a free port, ready (/readyz) before the first test."""
    models = "test_clf,test_age:latest,test_face_age"
    with start_server(store["home"], models, store["root"] / "serve.log") as url:
        yield url


def classify(url: str, data: bytes, name: str = "image.png", **fields) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": (name, data)}, data=fields, timeout=30)


def estimate_age(url: str, data: bytes, name: str = "image.png", **fields) -> httpx.Response:
    return httpx.post(f"{url}/estimate_age", files={"image": (name, data)}, data=fields, timeout=30)


def scores_by_label(body: dict) -> np.ndarray:
    got = {e["label"]: e["score"] for e in body["top_k"]}
    return np.array([got[c] for c in CLASSES])


# ---------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(sample_images()))
def test_classify_every_mode_matches_bundle(server: str, store: dict, name: str) -> None:
    data = sample_images()[name]
    r = classify(server, data, name, top_k=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == store["clf_tag"]
    ref = reference(store["bundles"]["clf"], data)
    np.testing.assert_allclose(scores_by_label(body), ref, atol=1e-5)
    assert body["label"] == CLASSES[int(ref.argmax())]
    assert body["score"] == pytest.approx(float(ref.max()), abs=1e-5)
    assert [e["score"] for e in body["top_k"]] == sorted((e["score"] for e in body["top_k"]), reverse=True)


def test_classify_top_k_and_model_selection(server: str, store: dict) -> None:
    data = sample_images()["rgb.png"]
    default = classify(server, data).json()
    assert len(default["top_k"]) == 5
    for model in ("test_clf", "test_clf:latest", store["clf_tag"]):
        r = classify(server, data, top_k=3, model=model)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["top_k"]) == 3 and body["model"] == store["clf_tag"]
        assert body["top_k"] == default["top_k"][:3]


def test_exif_orientation_is_applied(server: str, store: dict) -> None:
    data = exif_rotated_jpeg()
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("L"))  # (20, 45): as stored, not as shown
    shown = np.rot90(raw, k=-1)  # orientation 6: rotate 90 degrees clockwise -> (45, 20)
    net, meta = load_bundle(store["bundles"]["clf"])
    with torch.no_grad():
        ref = net(preprocess(np.ascontiguousarray(shown)[:, :, None], meta.preprocess)[None]).softmax(1)[0].numpy()
    body = classify(server, data, "rotated.jpg", top_k=10).json()
    np.testing.assert_allclose(scores_by_label(body), ref, atol=1e-5)


def test_estimate_age(server: str, store: dict) -> None:
    for name, data in sample_images().items():
        r = estimate_age(server, data, name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"faces", "model"} and body["model"] == store["age_tag"]
        w, h = Image.open(io.BytesIO(data)).size
        (face,) = body["faces"]  # a bundle without a faces entry: the whole image is the one "face"
        assert face["box"] == [0, 0, w, h] and face["score"] is None
        assert 0.0 <= face["age"] <= 116.0
        assert face["age"] == pytest.approx(float(reference(store["bundles"]["age"], data)[0]), abs=1e-4)


def test_estimate_age_faces_in_a_photo(server: str, store: dict) -> None:
    """A face bundle: the astronaut's one face, its box on the face, the age of its aligned chip;
    detect=false takes the upload as the chip; no face is an empty list; max_faces is checked."""
    from skimage import data as skdata

    from data.faces import FaceAligner

    photo = skdata.astronaut()
    png = encode(Image.fromarray(photo))
    r = estimate_age(server, png, model="test_face_age")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == store["face_tag"] and len(body["faces"]) == 1
    face = body["faces"][0]
    x0, y0, x1, y1 = face["box"]
    assert 170 <= (x0 + x1) / 2 <= 275 and 75 <= (y0 + y1) / 2 <= 180 and face["score"] > 0.5
    chip = FaceAligner()(photo)[0].chip
    assert face["age"] == pytest.approx(
        float(reference(store["bundles"]["face"], encode(Image.fromarray(chip)))[0]), abs=1e-4
    )
    r = estimate_age(server, png, model="test_face_age", detect="false")
    (whole,) = r.json()["faces"]
    assert whole["box"] == [0, 0, 512, 512] and whole["score"] is None
    assert whole["age"] == pytest.approx(float(reference(store["bundles"]["face"], png)[0]), abs=1e-4)
    two = encode(Image.fromarray(np.concatenate([photo, photo[:, ::-1]], axis=1)))
    faces = estimate_age(server, two, model="test_face_age").json()["faces"]
    assert len(faces) == 2
    assert len(estimate_age(server, two, model="test_face_age", max_faces="1").json()["faces"]) == 1
    r = estimate_age(server, encode(Image.new("RGB", (640, 480), (120, 120, 120))), model="test_face_age")
    assert r.status_code == 200 and r.json()["faces"] == []
    for bad in ("0", "1000", "x"):
        r = estimate_age(server, png, model="test_face_age", max_faces=bad)
        assert r.status_code == 400 and "max_faces" in r.text, r.text
    r = estimate_age(server, b"not an image", model="test_face_age")
    assert r.status_code == 400 and "error" in r.json()


def test_models_endpoint(server: str, store: dict) -> None:
    def shown_metrics(key: str) -> dict:  # what GET /models shows: the bundle's test metrics
        metrics = read_meta(store["bundles"][key]).metrics
        return {k: pytest.approx(v) for k, v in metrics.items() if k.startswith("test")}

    for r in (httpx.get(f"{server}/models"), httpx.post(f"{server}/models")):
        assert r.status_code == 200, r.text
        models = {m["tag"]: m for m in r.json()["models"]}
        assert list(models) == [store["clf_tag"], store["age_tag"], store["face_tag"]]
        clf, age = models[store["clf_tag"]], models[store["age_tag"]]
        assert clf["task"] == "classification" and clf["class_names"] == CLASSES
        assert clf["input"]["height"] == 28 and clf["input"]["channels"] == 1
        assert clf["metrics"] == shown_metrics("clf") and "test/acc" in clf["metrics"]
        assert age["task"] == "regression" and age["target"] == AGE_TARGET
        assert age["input"]["width"] == 32 and age["input"]["channels"] == 3
        assert age["metrics"] == shown_metrics("age") and "test/mae" in age["metrics"]
        # SVERTKA_RUNTIME's default on a CPU: ONNX Runtime over each bundle's model.onnx
        assert clf["runtime"] == age["runtime"] == "onnx"


def test_page_is_served_self_contained(server: str) -> None:
    """The page at / (tests/test_page.py drives it in Chromium): one HTML file, a CSP, nothing from elsewhere."""
    r = httpx.get(f"{server}/", headers={"accept": "text/html"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    for external in ('src="http', "src='http", 'href="http', "@import", "url(http", "//fonts."):
        assert external not in r.text, external
    docs = httpx.get(f"{server}/docs")  # BentoML's OpenAPI page moved here from /
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_models_endpoint_shows_the_loaded_version(server: str, store: dict) -> None:
    """A newer save of a served name (or deleting that save) changes nothing in what is served."""
    import bentoml

    from models.store import save_bundle_to_bentoml

    before = httpx.get(f"{server}/models").json()
    with bentoml_home(store["home"]):
        newer = save_bundle_to_bentoml(store["bundles"]["clf"], "test_clf")
        assert newer != store["clf_tag"] and str(bentoml.models.get("test_clf:latest").tag) == newer
        try:
            assert httpx.get(f"{server}/models").json() == before
            assert classify(server, sample_images()["rgb.png"]).json()["model"] == store["clf_tag"]
        finally:
            bentoml.models.delete(newer)  # test_clf:latest is the served version again
    assert httpx.get(f"{server}/models").json() == before
    assert [m["tag"] for m in before["models"]] == [store["clf_tag"], store["age_tag"], store["face_tag"]]


def test_burst_beyond_admission_limit_gets_503_then_serves(server: str, store: dict) -> None:
    """80 requests at once against SVERTKA_MAX_IN_FLIGHT=24: 503s with Retry-After, at once; then all is well."""
    rng = np.random.default_rng(5)
    data = encode(Image.fromarray(rng.integers(0, 256, (1500, 1500), dtype=np.uint8)))  # ~0.05 s to decode
    barrier = threading.Barrier(80)

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=60) as client:
            client.get(f"{server}/livez")  # connect first, then all send together
            barrier.wait()
            return client.post(f"{server}/classify", files={"image": ("a.png", data)}, data={"top_k": "10"})

    with ThreadPoolExecutor(80) as pool:
        answers = list(pool.map(one, range(80)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 24, codes
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"].isdigit() and "busy" in _reason(r)
    expected = reference(store["bundles"]["clf"], data)
    for r in answers:
        if r.status_code == 200:
            np.testing.assert_allclose(scores_by_label(r.json()), expected, atol=1e-5)
    r = classify(server, data, top_k=10)
    assert r.status_code == 200
    np.testing.assert_allclose(scores_by_label(r.json()), expected, atol=1e-5)
    stats = httpx.get(f"{server}/stats").json()
    assert stats["refused"] >= codes.count(503) and stats["in_flight"] <= 1


def test_concurrent_requests_batched_and_correct(server: str, store: dict) -> None:
    images = list(sample_images().items())
    expected = {name: classify(server, data, name, top_k=10).json() for name, data in images}
    jobs = [images[i % len(images)] for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: classify(server, job[1], job[0], top_k=10), jobs))
    for (name, _), r in zip(jobs, results, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(scores_by_label(r.json()), scores_by_label(expected[name]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: 4xx with a JSON reason, and the server keeps serving
# ---------------------------------------------------------------------------------------------


def _reason(r: httpx.Response) -> str:
    body = r.json()
    assert isinstance(body, dict) and "error" in body, body
    return json.dumps(body).lower()


BAD_UPLOADS = {
    "not an image": (b"hello, I am a text file\n", "not a recognized image"),
    "truncated": (sample_images()["rgb.png"][:200], "truncated"),
    "truncated jpeg": (sample_images()["rgb.jpg"][:300], "truncated"),
    "empty": (b"", "empty"),
    "too many pixels": (encode(Image.new("L", (6400, 6400))), "over the limit"),
    # Pillow would hand EPS to a Ghostscript subprocess (no timeout) when gs is installed: not opened at all
    "postscript": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n", "not a recognized image"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
@pytest.mark.parametrize("route", ["classify", "estimate_age"])
def test_bad_images_are_4xx(server: str, case: str, route: str) -> None:
    data, words = BAD_UPLOADS[case]
    r = httpx.post(f"{server}/{route}", files={"image": ("x.png", data)}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert words in _reason(r)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels in its header (and holds almost nothing)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(7000, 7000), (100_000, 100_000)])
def test_decompression_bomb_refused_from_header(server: str, size: tuple[int, int]) -> None:
    t = time.monotonic()
    r = classify(server, png_header_only(*size))
    assert r.status_code == 400 and "pixels" in _reason(r)
    assert time.monotonic() - t < 5


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def ztxt_bomb_png() -> bytes:
    """A valid 8x8 PNG (~190 KB) with a zTXt chunk that inflates to 200 MB (Pillow: ValueError)."""
    import zlib

    comp = zlib.compressobj(9)
    text = b"".join(comp.compress(b"\0" * (1 << 20)) for _ in range(200)) + comp.flush()
    png = encode(Image.new("L", (8, 8), 7))
    return png[:33] + png_chunk(b"zTXt", b"Comment\0\0" + text) + png[33:]  # after IHDR (8 + 25 bytes)


def huge_flat_png() -> bytes:
    """A real 6200x6200 (38 Mpx) grayscale PNG of ~40 KB: what its size says is nothing like its pixels."""
    import struct
    import zlib

    w = h = 6200
    comp = zlib.compressobj(9)
    row = b"\0" + b"\x80" * w  # filter byte + one grey row
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def cielab_tiff() -> bytes:
    """A TIFF in the CIELab colour space (PIL mode LAB)."""
    rng = np.random.default_rng(2)
    return encode(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "LAB"), "TIFF")


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(3)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")[:700]


HOSTILE = {"ztxt bomb": ztxt_bomb_png, "38 Mpx png": huge_flat_png, "cielab tiff": cielab_tiff,
           "truncated jpeg": truncated_jpeg}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_uploads_are_4xx_or_correct(server: str, store: dict, case: str) -> None:
    """Each: a 4xx with a reason, or a 200 equal to the bundle's own answer, within 2 s (never a 5xx)."""
    data = HOSTILE[case]()
    if case == "38 Mpx png":
        assert len(data) < 60_000
    t = time.monotonic()
    r = classify(server, data, "x.bin", top_k=10)
    elapsed = time.monotonic() - t
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        np.testing.assert_allclose(scores_by_label(r.json()), reference(store["bundles"]["clf"], data), atol=1e-5)
    else:
        assert 400 <= r.status_code < 500 and _reason(r)
    assert case not in ("ztxt bomb", "truncated jpeg") or r.status_code == 400
    assert case not in ("38 Mpx png", "cielab tiff") or r.status_code == 200
    assert elapsed < 2.0, f"{case}: {elapsed:.2f} s"


def test_batch_script_error_rows_for_hostile_files(store: dict, tmp_path: Path) -> None:
    """The batch script: a bad file is an error row, never a crash; the good ones are predicted."""
    import pandas as pd

    from serving import batch

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a_ztxt.png").write_bytes(ztxt_bomb_png())
    (folder / "b_lab.tif").write_bytes(cielab_tiff())
    (folder / "c_trunc.jpg").write_bytes(truncated_jpeg())
    (folder / "d_good.png").write_bytes(sample_images()["rgb.png"])
    out = tmp_path / "out.csv"
    args = ["--model", str(store["bundles"]["clf"]), "--input", str(folder), "--output", str(out), "--workers", "0"]
    assert batch.main(args) == 0
    table = pd.read_csv(out).set_index(pd.read_csv(out)["path"].map(lambda p: Path(p).name))
    assert table.loc["a_ztxt.png", "error"] and table.loc["c_trunc.jpg", "error"]
    assert pd.isna(table.loc["b_lab.tif", "error"]) and pd.isna(table.loc["d_good.png", "error"])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"data": {"top_k": "3"}}, "image"),  # missing file field
        ({"files": {"photo": ("a.png", b"x")}}, "photo"),  # a file in an unknown field
        ({"data": {"image": "http://example.com/a.png"}}, "file part"),  # text instead of a file
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, "multipart"),
        ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, "multipart"),
        ({}, "multipart"),  # empty body
    ],
)
def test_malformed_requests_are_400(server: str, kwargs: dict, words: str) -> None:
    r = httpx.post(f"{server}/classify", timeout=30, **kwargs)
    assert r.status_code == 400, r.text
    assert words in _reason(r)


@pytest.mark.parametrize(
    "method, path, status, words",
    [
        ("GET", "/classify", 405, "use POST"),  # BentoML's router
        ("PUT", "/estimate_age", 405, "use POST"),
        ("GET", "/predict", 404, "POST /classify"),  # the GET routes' app mounted at /
        ("POST", "/classify/extra", 404, "POST /estimate_age"),
        ("DELETE", "/models", 405, "not allowed"),
    ],
)
def test_wrong_path_or_method_is_a_json_4xx(server: str, method: str, path: str, status: int, words: str) -> None:
    """The routers' own 404 and 405 (plain text before) say what exists, in the one error shape."""
    r = httpx.request(method, f"{server}{path}", timeout=30)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    assert words in r.json()["error"] and path in r.json()["error"]
    if status == 405:
        assert r.headers["allow"]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"top_k": "0"}, "top_k"),
        ({"top_k": "11"}, "top_k"),
        ({"top_k": "three"}, "top_k"),
        ({"model": "no_such_model"}, "unknown model"),
        ({"model": "test_age"}, "regression"),
        ({"model": "test_clf:no_such_version"}, "unknown model"),
    ],
)
def test_bad_parameters_are_400(server: str, fields: dict, words: str) -> None:
    r = classify(server, sample_images()["rgb.png"], **fields)
    assert r.status_code == 400, r.text
    assert words in _reason(r)


def test_wrong_task_for_estimate_age(server: str) -> None:
    r = estimate_age(server, sample_images()["rgb.png"], model="test_clf")
    assert r.status_code == 400 and "classification" in _reason(r)


def test_body_over_limit_is_413(server: str) -> None:
    big = os.urandom(MAX_BODY + 1000)
    r = classify(server, big)  # with a Content-Length
    assert r.status_code == 413 and "svertka_max_body_bytes" in _reason(r)

    boundary = "svertkaboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: streamed, counted as it arrives
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    r = httpx.post(
        f"{server}/classify",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )
    assert r.status_code == 413 and "svertka_max_body_bytes" in _reason(r)

    # A small Content-Length beside Transfer-Encoding: chunked: h11 reads the chunks, so they are still counted.
    host, port = server.removeprefix("http://").split(":")
    head = (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks()) + b"0\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before the whole body is sent
            sock.sendall(head + chunked)
        answer = b""
        while b"\r\n\r\n" not in answer and (part := sock.recv(65536)):
            answer += part
    # 413 when the body is counted; uvicorn >= 0.5x refuses both headers together in its HTTP parser (a 400
    # before any of the body is read: request smuggling). Either way the chunks never reach a handler.
    assert answer.startswith((b"HTTP/1.1 413", b"HTTP/1.1 400")), answer[:200]


def test_server_still_serves_after_bad_input(server: str, store: dict) -> None:
    data = sample_images()["gray.png"]
    r = classify(server, data, top_k=10)
    assert r.status_code == 200
    np.testing.assert_allclose(scores_by_label(r.json()), reference(store["bundles"]["clf"], data), atol=1e-5)
    assert httpx.get(f"{server}/readyz").status_code == 200


# ---------------------------------------------------------------------------------------------
# Parity: HTTP == batch script == models.bundle, on the same files
# ---------------------------------------------------------------------------------------------


def test_parity_http_batch_bundle(server: str, store: dict, tmp_path: Path) -> None:
    import pandas as pd

    from serving import batch

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in sample_images().items():
        (folder / name).write_bytes(data)
    names = sorted(sample_images())
    for task, bundle in (("clf", store["bundles"]["clf"]), ("age", store["bundles"]["age"])):
        out = tmp_path / f"{task}.csv"
        assert batch.main(["--model", str(bundle), "--input", str(folder), "--output", str(out), "--top-k", "10",
                           "--workers", "0", "--batch-size", "4"]) == 0  # fmt: skip
        labels = {"label": str, **{f"top{j}_label": str for j in range(1, 11)}}  # class names "0".."9" stay text
        table = pd.read_csv(out, dtype=labels if task == "clf" else None)
        assert [Path(p).name for p in table["path"]] == names
        for name, row in zip(names, table.itertuples(index=False), strict=True):
            data = (folder / name).read_bytes()
            ref = reference(bundle, data)
            if task == "clf":
                http = scores_by_label(classify(server, data, name, top_k=10).json())
                from_batch = {getattr(row, f"top{j}_label"): getattr(row, f"top{j}_score") for j in range(1, 11)}
                np.testing.assert_allclose([from_batch[c] for c in CLASSES], ref, atol=1e-5)
                np.testing.assert_allclose(http, ref, atol=1e-5)
            else:
                http = estimate_age(server, data, name).json()["faces"][0]["age"]
                assert row.age == pytest.approx(float(ref[0]), abs=1e-5)
                assert http == pytest.approx(float(ref[0]), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Start-up failures, in-process use, bentoml build
# ---------------------------------------------------------------------------------------------


def failed_start(env: dict[str, str]) -> tuple[list[str], str]:
    """``bentoml serve`` that must refuse to start, with no traceback: its lines that say "error", and its stderr."""
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    return [line for line in (r.stdout + r.stderr).splitlines() if "error" in line.lower()], r.stderr


def test_missing_model_stops_start_with_clear_message(store: dict) -> None:
    lines, stderr = failed_start(serve_env(store["home"], "test_clf,no_such_model:v1"))
    assert len(lines) == 1 and "no_such_model:v1" in lines[0] and "SVERTKA_MODELS" in lines[0], stderr[-2000:]


def test_tampered_onnx_stops_start_with_clear_message(store: dict, tmp_path: Path) -> None:
    """A model.onnx that differs from its sha256 in bundle.json: the service refuses to start, one line."""
    import shutil

    from models.store import save_bundle_to_bentoml

    copy = tmp_path / "tampered"
    shutil.copytree(store["bundles"]["clf"], copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    home = tmp_path / "bentoml"
    with bentoml_home(home):
        save_bundle_to_bentoml(copy, "tampered_clf")
    lines, stderr = failed_start(serve_env(home, "tampered_clf"))
    assert len(lines) == 1 and "tampered_clf" in lines[0] and "model.onnx: sha256 does not match" in lines[0], stderr


def test_face_model_without_landmarks_stops_start_with_clear_message(store: dict, tmp_path: Path) -> None:
    lines, stderr = failed_start(
        serve_env(store["home"], "test_face_age", SVERTKA_LANDMARKS=str(tmp_path / "missing.dat"))
    )
    assert len(lines) == 1 and "test_face_age" in lines[0] and "landmark model is missing" in lines[0], stderr


def test_predictor_directly_clamps_and_formats(store: dict, tmp_path: Path) -> None:
    from serving.predictor import Predictor

    reg = get_model("lenet5", in_channels=3, num_outputs=1)
    with torch.no_grad():
        reg.head.bias.fill_(1000.0)
    _, meta = load_bundle(store["bundles"]["age"])
    p = Predictor((reg, meta), device="cpu")
    x = torch.zeros(2, 3, 32, 32)
    assert p.predict_tensors(x).tolist() == [116.0, 116.0]
    assert p.format(p.predict_tensors(x)[0]) == {"age": 116.0}
    with torch.no_grad():
        reg.head.bias.fill_(-1000.0)
    assert p.predict_tensors(x).tolist() == [0.0, 0.0]

    clf = Predictor(store["bundles"]["clf"], device="cpu")
    result = clf.predict_files([sample_images()["rgb.png"]], top_k=3)[0]
    assert set(result) == {"label", "score", "top_k"} and len(result["top_k"]) == 3
    assert clf.info()["class_names"] == CLASSES


@contextmanager
def service_module(store: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``serving.service`` imported in this process against the test store (it checks the models on import)."""
    import importlib

    monkeypatch.setenv("SVERTKA_MODELS", "test_clf,test_age")
    monkeypatch.setenv("SVERTKA_WORKERS", "1")
    with bentoml_home(store["home"]):
        sys.modules.pop("serving.service", None)
        try:
            yield importlib.import_module("serving.service")
        finally:
            sys.modules.pop("serving.service", None)


def test_batcher_batches_concurrent_inputs(store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    sizes: list[int] = []

    def double(batch: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        sizes.append(len(batch))
        time.sleep(0.02)  # a slow forward: requests queue up behind it
        return batch * 2

    async def main(batcher) -> list[torch.Tensor]:
        xs = [torch.full((1, 2, 2), float(i)) for i in range(40)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in xs))
        return [o.equal(x * 2) for o, x in zip(outs, xs, strict=True)]

    with service_module(store, monkeypatch) as service:
        assert all(asyncio.run(main(service.Batcher(double, max_batch_size=16, wait_ms=0))))
    assert sum(sizes) == 40 and max(sizes) == 16 and len(sizes) <= 5


def test_batcher_runs_fast_forwards_on_the_event_loop_and_slow_ones_in_its_thread(
    store: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading

    threads: dict[str, list[str]] = {"fast": [], "slow": [], "busy": []}

    def forward(kind: str, seconds: float):
        def fn(batch: torch.Tensor) -> torch.Tensor:
            threads[kind].append(threading.current_thread().name)
            time.sleep(seconds)
            return batch + 1

        return fn

    async def main(batcher) -> None:
        loop_thread = threading.current_thread().name
        for i in range(8):  # one at a time: each its own batch
            assert (await batcher.submit(torch.full((1, 2, 2), float(i)))).equal(torch.full((1, 2, 2), i + 1.0))
        threads["loop"] = [loop_thread]

    with service_module(store, monkeypatch) as service:
        # "fast" gets a 1 s allowance: inline whatever the machine's load; "slow" sleeps 4x its 5 ms allowance
        fast = service.Batcher(forward("fast", 0.0), max_batch_size=4, wait_ms=0, inline_ms=1000)
        asyncio.run(main(fast))
        slow = service.Batcher(forward("slow", 0.02), max_batch_size=4, wait_ms=0, inline_ms=5)
        asyncio.run(main(slow))
        # Other requests in flight in the worker: the forward thread, so the loop reads them meanwhile.
        busy = service.Batcher(forward("busy", 0.0), max_batch_size=4, wait_ms=0, inline_ms=5, load=lambda: 9)

        async def four(batcher) -> list[torch.Tensor]:
            return [await batcher.submit(torch.zeros(1, 2, 2)) for _ in range(4)]

        assert all(out.equal(torch.ones(1, 2, 2)) for out in asyncio.run(four(busy)))
        assert busy.inline == 0 and len(threads["busy"]) == 4 and all(t.startswith("forward") for t in threads["busy"])
    assert threads["fast"][0].startswith("forward")  # the first forward's time is unknown: the thread
    assert threads["fast"][-1] == threads["loop"][0] and fast.inline == 7  # then measured fast: inline
    assert all(t.startswith("forward") for t in threads["slow"]) and slow.inline == 0


def test_batcher_gives_a_lone_slow_forward_every_thread(store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One input of a lone client runs at ``solo`` threads when its forward is slow (or not yet timed); a fast
    forward, a batch, or a worker with other clients: ``threads``."""

    def forward(seconds: float, seen: list[tuple[int, int]]):
        def fn(batch: torch.Tensor) -> torch.Tensor:
            seen.append((len(batch), torch.get_num_threads()))
            time.sleep(seconds)
            return batch

        return fn

    load = [1]  # one request, one client

    async def main(batcher, steps: list[int | str]) -> None:
        for step in steps:
            if isinstance(step, str):  # "busy": other clients came
                load[0] = 5
                continue
            await asyncio.gather(*(batcher.submit(torch.zeros(1, 2, 2)) for _ in range(step)))

    threads = torch.get_num_threads()
    slow_seen: list[tuple[int, int]] = []
    fast_seen: list[tuple[int, int]] = []
    with service_module(store, monkeypatch) as service:
        try:
            # "slow" sleeps 4x its 5 ms allowance; "fast" gets a 1 s allowance, fast whatever the machine's load
            slow = service.Batcher(forward(0.02, slow_seen), 4, 0, inline_ms=5, load=lambda: load[0], threads=1, solo=2)
            asyncio.run(main(slow, [1, 1, 4, "busy", 1]))
            load[0] = 1
            fast = service.Batcher(
                forward(0.0, fast_seen), 4, 0, inline_ms=1000, load=lambda: load[0], threads=1, solo=2
            )
            asyncio.run(main(fast, [1, 1, 1]))
        finally:
            torch.set_num_threads(threads)
    assert slow_seen == [(1, 2), (1, 2), (4, 1), (1, 1)]
    assert fast_seen == [(1, 2), (1, 1), (1, 1)]  # the first one's time is unknown: as if slow


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_service_in_process_through_asgi(store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same service class, without a server: Svertka.to_asgi() under Starlette's TestClient."""
    from starlette.testclient import TestClient

    with service_module(store, monkeypatch) as service, TestClient(service.Svertka.to_asgi()) as client:
        data = sample_images()["rgb.jpg"]
        r = client.post("/classify", files={"image": ("a.jpg", data)}, data={"top_k": "10"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(scores_by_label(r.json()), reference(store["bundles"]["clf"], data), atol=1e-5)
        r = client.post("/estimate_age", files={"image": ("a.jpg", b"not an image")})
        assert r.status_code == 400 and "error" in r.json()
        assert client.get("/models").json()["models"][1]["tag"] == store["age_tag"]


def test_bentoml_build_packs_service_and_models(store: dict) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=serve_env(store["home"], "test_clf,test_age"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import yaml

    bentos = list((store["home"] / "bentos" / "svertka").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento, info = bentos[0].parent, yaml.safe_load(bentos[0].read_text())
    assert info["service"] == "serving.service:Svertka"
    # BentoML 1.4 records the models by tag; they travel with the Bento on export/containerize
    assert [m["tag"] for m in info["services"][0]["models"]] == [store["clf_tag"], store["age_tag"]]
    assert {e["name"]: e["value"] for e in info["envs"]}["SVERTKA_MODELS"] == "test_clf:latest,test_age:latest"
    for f in ("serving/service.py", "serving/predictor.py", "serving/static/index.html", "models/bundle.py",
              "data/preprocess.py"):  # fmt: skip
        assert (bento / "src" / f).is_file(), f


def test_full_collections_run_on_a_timer_not_on_pythons_schedule(store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's automatic full collections are off; a thread runs one every N seconds."""
    import gc

    full: list[float] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(time.monotonic())

    threshold = gc.get_threshold()
    with service_module(store, monkeypatch) as service:
        gc.callbacks.append(seen)
        stop = service.full_collections_every(0.2)
        try:
            assert gc.get_threshold()[:2] == threshold[:2] and gc.get_threshold()[2] >= 10**9
            deadline = time.monotonic() + 10
            while len(full) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            gc.callbacks.remove(seen)
            gc.set_threshold(*threshold)
    assert len(full) >= 2 and full[1] - full[0] >= 0.1
