"""Shared set-up for the serving benchmarks: random-weight bundles, real test images, subprocess servers.

Used by ``benchmarks/serve_load.py`` and ``benchmarks/batch_throughput.py``; not run on its own.
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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, not an installed (editable) copy of another one

import models  # noqa: E402, F401  (registers every architecture)
from data.preprocess import PreprocessSpec  # noqa: E402
from models.bundle import save_bundle  # noqa: E402
from models.registry import get_model  # noqa: E402

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
AGE_DECADES = [f"{10 * i}-{10 * i + 9}" for i in range(9)] + ["90+"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BenchError(Exception):
    """A set-up problem that stops the benchmark: printed as one ``error: ...`` line."""


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: registry name and arguments, its eval preprocessing and labels."""

    key: str  # how the benchmark names it (also the BentoML model name, prefixed)
    arch: str
    kwargs: dict
    spec: PreprocessSpec
    task: str = "classification"
    class_names: tuple[str, ...] | None = None
    target: dict | None = None
    images: str = "fashion"  # "fashion" (28x28 gray PNG) or "utkface" (200x200 RGB JPEG)


SERVE_MODELS = {
    "simple_cnn": BenchModel(
        "simple_cnn",
        "simple_cnn",
        {"in_channels": 1, "num_outputs": 10},
        PreprocessSpec((28, 28), 1, (0.2860,), (0.3530,)),
        class_names=tuple(FASHION_CLASSES),
    ),
    "resnet18": BenchModel(
        "resnet18",
        "resnet18",
        {"in_channels": 3, "num_outputs": 10},
        PreprocessSpec((224, 224), 3, IMAGENET_MEAN, IMAGENET_STD),
        class_names=tuple(AGE_DECADES),
        images="utkface",
    ),
}
BATCH_MODELS = {
    # What a user would run over UTKFace-like folders: an age regressor.
    "simple_cnn": BenchModel(
        "simple_cnn_age64",
        "simple_cnn",
        {"in_channels": 3, "num_outputs": 1, "input_size": 64},
        PreprocessSpec((64, 64), 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        task="regression",
        target={"name": "age", "min": 0.0, "max": 116.0},
        images="utkface",
    ),
    "resnet18": BenchModel(
        "resnet18_age224",
        "resnet18",
        {"in_channels": 3, "num_outputs": 1},
        PreprocessSpec((224, 224), 3, IMAGENET_MEAN, IMAGENET_STD),
        task="regression",
        target={"name": "age", "min": 0.0, "max": 116.0},
        images="utkface",
    ),
}


def print_checks(console: Any, checks: list[tuple[str, bool]]) -> None:
    """One PASS/FAIL line per ``(target, met)`` pair (``console``: a rich Console)."""
    for text, ok in checks:
        console.print(f"  {'[green]PASS[/]' if ok else '[red]FAIL[/]'}  {text}")


def write_json(path: Path | None, args: Any, results: dict, checks: list[tuple[str, bool]]) -> None:
    """Every number of a run (its arguments, results and targets met) to ``path``, if one was given."""
    if path:
        payload = {"args": {**vars(args), "json": str(path)}, "results": results, "targets": dict(checks)}
        path.write_text(json.dumps(payload, indent=2, default=str))


def parse_variant(raw: str, reserved: Sequence[str]) -> tuple[str, Path | None, dict[str, str]]:
    """``"name[@DIR][:K=V,K=V]"`` -> (name, checkout to serve from or None, environment overrides)."""
    head, _, settings = raw.partition(":")
    name, _, folder = head.partition("@")
    try:
        env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    except ValueError:
        raise BenchError(f"--variant {raw!r}: settings must be K=V,K=V") from None
    if not name or name in reserved:
        raise BenchError(f"--variant {raw!r}: give it a name other than {', '.join(reserved)}")
    if folder and not (Path(folder) / "serving" / "service.py").is_file():
        raise BenchError(f"--variant {raw!r}: {folder} holds no serving/service.py")
    return name, Path(folder).resolve() if folder else None, env


def service_workers() -> int:
    """The worker processes our service starts with the ``SVERTKA_*`` settings of this environment."""
    from serving.settings import Settings

    return Settings.from_env({k: v for k, v in os.environ.items() if k != "SVERTKA_MODELS"}).workers


def build_request(host: str, path: str, field: str, name: str, data: bytes) -> bytes:
    """One complete ``POST path`` request (headers + a multipart body carrying ``data`` in ``field``) as bytes."""
    ctype = {".png": "image/png", ".jpg": "image/jpeg"}.get(Path(name).suffix.lower(), "application/octet-stream")
    boundary = "svertkabenchboundary7d1e"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{Path(name).name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, dict[str, str]]:
    """-> (status, body, lower-cased headers) of one HTTP/1.1 response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in (line.partition(":") for line in lines[1:]) if k}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split(" ", 2)[1]), body, headers


def parse_list(raw: str, known: Sequence[str], option: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``known`` (``BenchError`` naming ``option``)."""
    items = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if not items or bad:
        raise BenchError(f"{option} {raw!r}: choose from {', '.join(known)}")
    return items


def build_bundle(m: BenchModel, out_dir: Path, seed: int = 0) -> Path:
    """A bundle with random weights (throughput does not depend on what the weights learned)."""
    torch.manual_seed(seed)
    net = get_model(m.arch, **m.kwargs).eval()
    return save_bundle(
        out_dir / m.key,
        net,
        task=m.task,
        architecture=m.arch,
        architecture_kwargs=m.kwargs,
        preprocess=m.spec,
        class_names=list(m.class_names) if m.class_names else None,
        target=m.target,
        metrics={},
        training_config={"note": "random weights, for benchmarks only"},
    )


def data_root(raw: str | None) -> Path | None:
    """The data sets folder (``--data-root``, else ``$DATASETS_DIR``), or None to use synthetic images."""
    raw = raw or os.environ.get("DATASETS_DIR")
    if not raw:
        return None
    root = Path(raw)
    if not root.is_dir():
        raise BenchError(f"data root {root} (--data-root / DATASETS_DIR) is not a folder")
    return root.resolve()  # absolute: file lists handed to a script in another folder must still resolve


def fashion_png_bytes(root: Path | None, n: int) -> tuple[list[bytes], str]:
    """``n`` Fashion-MNIST test images encoded as PNG (28x28 gray), and where they came from."""
    idx = root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte" if root else None
    if idx is not None and idx.is_file():
        raw = idx.read_bytes()
        if int.from_bytes(raw[:4], "big") != 0x803:
            raise BenchError(f"{idx}: not an IDX image file (bad magic number)")
        arrays = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        source = f"Fashion-MNIST test set ({idx})"
    else:
        arrays = _synthetic(n, 28, 28, 1)[..., 0]
        source = "SYNTHETIC 28x28 images (set DATASETS_DIR for Fashion-MNIST)"
    return [_encode(Image.fromarray(a, "L"), "PNG") for a in arrays], source


def utkface_files(root: Path | None, n: int, scratch: Path) -> tuple[list[Path], str]:
    """``n`` UTKFace JPEG files (read in place), or synthetic 200x200 JPEGs written under ``scratch``."""
    folder = root / "UTKFace" if root else None
    if folder is not None and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.name.endswith(".jpg"))[:n]
        if len(files) < n:
            raise BenchError(f"{folder}: {len(files)} JPEG files, the benchmark needs {n}")
        return files, f"UTKFace ({folder})"
    out = scratch / "synthetic_faces"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, a in enumerate(_synthetic(n, 200, 200, 3)):
        path = out / f"{i:06d}.jpg"
        Image.fromarray(a, "RGB").save(path, quality=90)
        files.append(path)
    return files, "SYNTHETIC 200x200 JPEGs (set DATASETS_DIR for UTKFace)"


def _synthetic(n: int, h: int, w: int, c: int) -> np.ndarray:
    """Smooth gradients plus noise, so the images compress like photos rather than like noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, c), np.uint8)
    for i in range(n):
        a, b = rng.uniform(-1, 1, size=(2, c))
        base = 128 + 100 * np.sin(3 * (a * xx[..., None] + b * yy[..., None]) + i)
        out[i] = np.clip(base + rng.normal(0, 12, size=(h, w, c)), 0, 255).astype(np.uint8)
    return out


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(
    cmd: Sequence[str],
    env: dict[str, str],
    port: int,
    ready_path: str,
    log: Path,
    timeout: float = 120,
    cwd: Path = REPO,
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (in ``cwd``) in its own process group until the block ends; wait until ``GET ready_path``
    answers 200."""
    name = " ".join([Path(cmd[0]).name, *(c for c in cmd[1:3] if not c.startswith("-"))])  # e.g. "bentoml serve"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                raise BenchError(f"server `{name}` exited with {proc.returncode}:\n" + "\n".join(tail))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"server `{name}` not ready after {timeout:.0f} s (log: {log})")
            time.sleep(0.25)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group, SIGKILL it if still alive after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # the leader or workers it left behind
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process ``pid`` and its live descendants (Linux ``/proc``)."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, CPU ticks)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ... utime(11) stime(12)
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, grew = {pid}, True
    while grew:
        new = {p for p, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    total = sum(stats[p][1] for p in tree if p in stats)
    return total / os.sysconf("SC_CLK_TCK")
