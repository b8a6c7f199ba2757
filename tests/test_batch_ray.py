"""The Ray engine of the batch script: same rows as the local engine, a killed actor, atomic outputs.

pytest tests/test_batch_ray.py      (needs the ``ray`` extra: pip install -e '.[dev,ray]')

One local Ray session (``num_cpus=2``, as the issue asks; the engine fills it with a pool of two
actors) serves every in-process test; ``serving.batch`` reuses a running session.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from serving import batch

ray = pytest.importorskip("ray")
batch_ray = pytest.importorskip("serving.batch_ray")

REPO = Path(__file__).resolve().parents[1]
ACTOR_TITLE = b"ray::Forward"


def make_bundles(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_batch import make_bundles as make  # the tiny bundles of the local engine's tests

    return make(root)


@pytest.fixture(scope="module")
def ray_session() -> None:
    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("batch_ray")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        arr = rng.integers(0, 256, (24 + i % 7, 30, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(["RGB", "L", "RGBA"][i % 3])
        img.save(images / ("sub" if i % 2 else "") / f"img{i:02d}.{'jpg' if img.mode != 'RGBA' else 'png'}")
    # a large photo (1.1 megapixels) beside the small ones
    big = np.linspace(0, 255, 1100 * 1000 * 3).reshape(1000, 1100, 3).astype(np.uint8)
    Image.fromarray(big).save(images / "sub" / "large.jpg")
    (images / "corrupt.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (images / "sub" / "truncated.png").write_bytes(buf.getvalue()[:300])
    return {"root": root, "bundles": make_bundles(root / "bundles"), "images": images}


def run(*args: str | Path) -> int:
    return batch.main([str(a) for a in args] + ["--no-progress"])


def numbers(table: pd.DataFrame) -> np.ndarray:
    return table.select_dtypes("number").to_numpy(dtype=float)


def assert_same_rows(ours: pd.DataFrame, local: pd.DataFrame) -> None:
    """Same columns, paths, labels and errors; numbers within 1e-6."""
    assert list(ours.columns) == list(local.columns)
    assert ours["path"].tolist() == local["path"].tolist()
    assert ours["error"].fillna("").tolist() == local["error"].fillna("").tolist()
    text = [c for c in ours.columns if c.endswith("label")]
    assert (
        ours[text].astype(object).fillna("").to_numpy().tolist()
        == local[text].astype(object).fillna("").to_numpy().tolist()
    )
    a, b = numbers(ours), numbers(local)
    assert a.shape == b.shape and a.shape[1] >= 1
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= 1e-6


def test_same_rows_as_the_local_engine(ray_session: None, setup: dict, tmp_path: Path) -> None:
    for name, extra in (("clf", ["--top-k", "3"]), ("age", [])):
        local, ours, folder = tmp_path / f"{name}_local.csv", tmp_path / f"{name}_ray.parquet", tmp_path / f"{name}/"
        common = ["--model", setup["bundles"][name], "--input", setup["images"], "--batch-size", "4", *extra]
        assert run(*common, "--output", local, "--workers", "0") == 0
        assert run(*common, "--output", ours, "--output", f"{folder}/", "--engine", "ray") == 0
        expected = pd.read_csv(local)
        table = pd.read_parquet(ours)
        assert len(table) == 33 and table["error"].notna().sum() == 2
        assert_same_rows(table, expected)
        assert_same_rows(pd.read_parquet(folder), expected)  # the dataset folder holds the same rows, in order
        errors = dict(zip(table["path"].map(lambda p: Path(p).name), table["error"], strict=True))
        assert "not a recognized image" in errors["corrupt.png"] and "truncated" in errors["truncated.png"].lower()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_csv_input_with_a_missing_file_keeps_its_order(ray_session: None, setup: dict, tmp_path: Path) -> None:
    images = setup["images"]
    listed = ["sub/img03.jpg", "missing.png", "img00.jpg", "corrupt.png", "img02.png"]
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": listed}).to_csv(csv, index=False)
    for name in listed:
        if (images / name).exists():
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).symlink_to(images / name)
    out = tmp_path / "out.csv"
    assert run("--model", setup["bundles"]["clf"], "--input", csv, "--output", out, "--engine", "ray") == 0
    table = pd.read_csv(out)
    assert table["path"].tolist() == listed
    assert table["error"].notna().tolist() == [False, True, False, True, False]
    assert "no such file" in table["error"].iloc[1]


def test_face_bundle_gives_face_rows_like_the_local_engine(ray_session: None, tmp_path: Path) -> None:
    """A face bundle: one row per face, a faceless photo's row, broken files' rows; the same as --engine local."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_faces import astronaut, face_bundle, mixed_photos

    photos = mixed_photos(tmp_path / "photos")
    img = astronaut()
    # a large photo: detected at full size, so its box is in the photo's pixels
    canvas = np.full((1000, 1100, 3), 90, np.uint8)
    canvas[300 : 300 + img.shape[0], 400 : 400 + img.shape[1]] = img
    Image.fromarray(canvas).save(photos / "big.png")
    common = ["--model", face_bundle(tmp_path / "b"), "--input", photos, "--batch-size", "2"]
    local, ours = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert run(*common, "--output", local, "--workers", "0") == 0
    assert run(*common, "--output", ours, "--engine", "ray") == 0
    expected, table = pd.read_csv(local), pd.read_csv(ours)
    assert list(table.columns) == ["path", "face", "box_x0", "box_y0", "box_x1", "box_y1", "face_score", "age", "error"]
    names = table["path"].map(lambda p: Path(p).name).tolist()
    assert names == ["big.png", "blank.png", "one.jpg", "text.jpg", "two.png", "two.png"]
    assert table["error"].iloc[1] == "no face found" and "not a recognized image" in table["error"].iloc[3]
    assert table["face"].tolist()[4:] == [0, 1] and table["face_score"].iloc[2] > 0
    big, one = table.iloc[0], table.iloc[2]  # the same face, 400 px right and 300 px down
    assert [big["box_x0"] - 400, big["box_y0"] - 300, big["box_x1"] - 400, big["box_y1"] - 300] == pytest.approx(
        [one["box_x0"], one["box_y0"], one["box_x1"], one["box_y1"]], abs=4
    )
    assert_same_rows(table, expected)


def test_the_pool_fills_the_cluster(ray_session: None) -> None:
    """Without ``--workers``: one actor per CPU (per GPU for GPU actors) of the cluster, here 2 CPUs, no GPU."""
    common = ["--model", "m", "--input", "i", "--output", "o.csv", "--engine", "ray"]
    assert batch_ray.pool_size(batch.parse_args(common)) == 2
    assert batch_ray.pool_size(batch.parse_args([*common, "--cpus-per-worker", "0.5"])) == 4
    assert batch_ray.pool_size(batch.parse_args([*common, "--cpus-per-worker", "3"])) == 1  # at least one
    assert batch_ray.pool_size(batch.parse_args([*common, "--workers", "3"])) == 3


def _actor_pids() -> list[int]:
    """Processes whose title is the engine's model actor (Ray renames its worker processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(ACTOR_TITLE):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the actor's process through /proc")
def test_killed_actor_loses_and_duplicates_no_row(
    ray_session: None, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = tmp_path / "many.csv"
    files = sorted(str(p) for p in setup["images"].rglob("img*"))
    pd.DataFrame({"path": files * 8}).to_csv(listing, index=False)  # 240 rows, 60 batches of 4
    killed: dict[str, int] = {}
    seen: set[int] = set()

    class KillOnFirstBlock:
        """The driver's progress bar: on the first block received, SIGKILL the model actor."""

        def __init__(self, total: int, progress: bool | None) -> None:
            self.total, self.done = total, 0

        def update(self, n: int) -> None:
            self.done += n
            pids = _actor_pids()
            seen.update(pids)
            if not killed and pids and self.done < self.total:
                killed["pid"], killed["done"] = pids[0], self.done
                os.kill(pids[0], signal.SIGKILL)

        def close(self) -> None:
            pass

    monkeypatch.setattr(batch_ray, "progress_bar", KillOnFirstBlock)
    out, local = tmp_path / "out.csv", tmp_path / "local.csv"
    common = ["--model", setup["bundles"]["age"], "--input", listing, "--batch-size", "4"]
    assert run(*common, "--output", out, "--engine", "ray", "--workers", "1") == 0  # one actor: a new one must come
    assert killed and killed["done"] < 240, "the actor was not killed mid-job"
    assert seen - {killed["pid"]}, "no new actor took over"
    table = pd.read_csv(out)
    assert len(table) == 240 and table["error"].isna().all()
    assert table["path"].tolist() == files * 8  # every row exactly once, in order
    assert run(*common, "--output", local, "--workers", "0") == 0
    assert_same_rows(table, pd.read_csv(local))


def test_failed_or_interrupted_job_leaves_no_output(
    ray_session: None, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, folder = tmp_path / "labels.csv", tmp_path / "labels"
    out.write_text("previous results\n")
    args = ["--model", setup["bundles"]["clf"], "--input", setup["images"], "--batch-size", "4", "--engine", "ray",
            "--output", out, "--output", f"{folder}/"]  # fmt: skip
    monkeypatch.setattr(batch_ray, "ROWS_PER_FILE", 4)  # several part files
    write = pd.DataFrame.to_parquet
    parts: list[str] = []

    def second_part_fails(self: pd.DataFrame, path: Path, **kw: object) -> None:
        if len(parts) == 1:
            raise OSError(28, "No space left on device")
        parts.append(str(path))
        write(self, path, **kw)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", second_part_fails)
    assert run(*args) == 1
    assert len(parts) == 1 and ".tmp-" in parts[0]  # one part was written, under the temporary name
    monkeypatch.setattr(pd.DataFrame, "to_parquet", write)

    class Interrupt:
        def __init__(self, total: int, progress: bool | None) -> None:
            pass

        def update(self, n: int) -> None:
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    monkeypatch.setattr(batch_ray, "progress_bar", Interrupt)
    assert run(*args) == 130
    assert out.read_text() == "previous results\n"  # untouched: whole or not at all
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]

    monkeypatch.undo()  # and the same job, undisturbed, writes 32 rows, the folder in several part files
    monkeypatch.setattr(batch_ray, "ROWS_PER_FILE", 4)
    assert run(*args) == 0
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) > 1 and all(len(pd.read_parquet(p)) >= 4 for p in parts[:-1])
    assert pd.concat([pd.read_parquet(p) for p in parts])["path"].tolist() == pd.read_csv(out)["path"].tolist()
    assert len(pd.read_csv(out)) == 33
    assert run(*args) == 1  # the dataset folder exists now: refused, not overwritten


def test_ray_engine_from_the_command_line(setup: dict, tmp_path: Path) -> None:
    """A user's run: its own local Ray sized for this machine, a summary line, exit 0."""
    out = tmp_path / "ages.csv"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.batch",
            "--model",
            str(setup["bundles"]["age"]),
            "--input",
            str(setup["images"]),
            "--output",
            str(out),
            "--engine",
            "ray",
            "--no-progress",
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"wrote 33 rows to {out}: 31 predicted, 2 unreadable;") and "files/s" in summary
    assert len(pd.read_csv(out)) == 33
    # Ray's own notices that tell a user nothing to do: the token mode Ray chose, the bars we replace
    assert "Token authentication" not in r.stderr and "Progress bars disabled" not in r.stderr, r.stderr


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="looks for Ray's processes through /proc")
def test_bad_option_stops_the_local_ray_started_early(setup: dict, tmp_path: Path) -> None:
    """``--engine ray`` starts a local Ray as the script begins (serving/ray_start.py); an option found bad
    after that is still one line, exit 1, no output, and that Ray is stopped (the command returns)."""
    out = tmp_path / "out.csv"
    cmd = [sys.executable, "-m", "serving.batch", "--model", str(setup["bundles"]["age"]), "--input",
           str(setup["images"]), "--output", str(out), "--engine", "ray", "--batch-size", "0"]  # fmt: skip
    ray_tmp = Path(tempfile.mkdtemp(prefix="svr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == ["error: --batch-size must be at least 1, got 0"], r.stderr
        assert list(tmp_path.iterdir()) == []
        assert list((ray_tmp / "ray").glob("session_2*")), "no local Ray was started early"
        left = [p for p in _cmdlines() if str(ray_tmp).encode() in p]
        assert not left, left  # its processes are gone
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("bad", [["--workers"], ["--cpus-per-worker", "abc"]])
def test_early_start_leaves_a_bad_option_to_the_script(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    """The early start's own parser prints nothing and starts nothing: the script's parser says what is wrong, once."""
    from serving import ray_start

    ray_start.start_early(["--engine", "ray", *bad])
    assert ray_start._early is None
    assert capsys.readouterr().err == ""


def _cmdlines() -> list[bytes]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((entry / "cmdline").read_bytes())
    return out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "ray", "--address", f"127.0.0.1:{_closed_port()}"], "no Ray head answers there"),
        (["--address", "auto"], "--address needs --engine ray"),
        (["--engine", "ray", "--workers", "0"], "--workers must be 1 or more with --engine ray"),
        (["--engine", "ray", "--num-gpus-per-worker", "-1"], "--num-gpus-per-worker must be 0 or more"),
    ],
)
def test_bad_ray_options_one_line_no_output(
    setup: dict, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out.csv"
    assert run("--model", setup["bundles"]["clf"], "--input", setup["images"], "--output", out, *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_joins_a_ray_cluster_started_with_ray_start(setup: dict, tmp_path: Path) -> None:
    """``ray start --head``, then ``--address HOST:PORT``: the code and the bundle travel with the job."""
    port = _closed_port()
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false", "--block"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: killed as a whole below, other Rays untouched
    )
    try:
        out, folder = tmp_path / "ages.parquet", tmp_path / "ages"
        cmd = [sys.executable, "-m", "serving.batch", "--model", str(setup["bundles"]["age"]), "--input",
               str(setup["images"]), "--output", str(out), "--output", f"{folder}/", "--engine", "ray",
               "--address", f"127.0.0.1:{port}", "--no-progress"]  # fmt: skip
        for _ in range(60):  # the head takes a few seconds to listen
            env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the head's token is in ~/.ray/auth_token
            r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
            if "no Ray head answers there" not in r.stderr:
                break
        assert r.returncode == 0, r.stderr[-2000:]
        local = tmp_path / "local.csv"
        assert run("--model", setup["bundles"]["age"], "--input", setup["images"], "--output", local) == 0
        assert_same_rows(pd.read_parquet(out), pd.read_csv(local))
        assert_same_rows(pd.read_parquet(folder), pd.read_csv(local))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=15)
        os.killpg(head.pid, signal.SIGKILL)  # `ray start --block` leaves the GCS behind on SIGTERM
        head.wait(timeout=30)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # what `ray stop` would remove
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
