"""Decode a list of image files once, at the eval resize, into one uint8 array (cached on disk).

The cache file is ``<cache_dir>/<key>.npy`` (+ ``.json`` listing bad files), where ``key`` hashes
the file list with sizes and mtimes and the resize parameters: a changed file or size means a
new key. The cache folder is never inside the data root (a read-only root stays untouched).

    python -c "from data.cache import default_cache_dir; print(default_cache_dir())"
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data._decode import decode, init_worker
from data.base import BadImagePolicy, DataError, warn_once
from data.preprocess import PreprocessSpec

CACHE_VERSION = 1
POOL_MIN_FILES = 2000  # below this a process pool costs more than it saves


def default_cache_dir() -> Path:
    """``$SVERTKA_CACHE`` if set, else ``~/.cache/svertka``."""
    return Path(os.environ.get("SVERTKA_CACHE") or Path.home() / ".cache" / "svertka")


def cache_key(paths: Sequence[Path], spec: PreprocessSpec) -> str:
    """Hash of (path, size, mtime) of every file and the resize parameters."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, list(spec.input_size), spec.channels, spec.resize]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.fspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # missing: decoded as a bad image later
            h.update(f"{os.fspath(p)}\0missing\n".encode())
    return h.hexdigest()[:32]


def _decode_all(paths: list[str], spec: PreprocessSpec, progress: bool) -> list[tuple[np.ndarray | None, str | None]]:
    from tqdm.auto import tqdm

    bar = dict(total=len(paths), desc=f"decoding {len(paths)} images (once; cached)", disable=not progress, unit="img")
    workers = min(os.cpu_count() or 1, 8)
    if len(paths) < POOL_MIN_FILES or workers < 2:
        init_worker(spec)
        return [decode(p) for p in tqdm(paths, **bar)]
    # spawn, not fork: the parent may hold torch/OpenMP thread pools that a fork would copy broken.
    # ProcessPoolExecutor, not multiprocessing.Pool: Pool's terminate() on leaving a `with` block hung
    # for good once (its workers had exited holding the result queue's lock); the executor shuts down
    # by joining its workers and raises BrokenProcessPool if one dies, instead of waiting forever.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(spec,)) as pool:
        return list(tqdm(pool.map(decode, paths, chunksize=64), **bar))


def decode_cached(
    paths: Sequence[Path],
    spec: PreprocessSpec,
    cache_dir: Path | None = None,
    data_root: Path | None = None,
    on_bad_image: BadImagePolicy = "skip",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` at ``spec``'s eval resize: ``(images uint8 (M, h, w, C), kept indices (M,))``.

    Unreadable files are skipped with one warning naming them (``on_bad_image="skip"``) or
    stop everything with a ``DataError`` naming the file (``"error"``).
    """
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    paths = [Path(p) for p in paths]
    cache_dir = Path(cache_dir or default_cache_dir()).expanduser().resolve()
    if data_root is not None and cache_dir.is_relative_to(Path(data_root).resolve()):
        raise DataError(f"cache_dir {cache_dir} is inside the data root {data_root}; choose a folder outside it")
    key = cache_key(paths, spec)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        images, bad = np.load(npy), info["bad"]
    else:
        results = _decode_all([os.fspath(p) for p in paths], spec, progress)
        bad = [[i, msg] for i, (_, msg) in enumerate(results) if msg is not None]
        good = [arr for arr, msg in results if msg is None]
        images = np.stack(good) if good else np.zeros((0, *spec.input_size, spec.channels), np.uint8)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f"{key}.tmp.npy"
            np.save(tmp, images)
            os.replace(tmp, npy)
            meta.write_text(json.dumps({"bad": bad, "files": len(paths), "spec": spec.to_dict()}))
        except OSError as e:  # a read-only home: keep going in memory
            warnings.warn(
                f"could not write the decode cache to {cache_dir} ({e}); decoding again next time", stacklevel=2
            )
    if bad and on_bad_image == "error":
        i, msg = bad[0]
        raise DataError(f"unreadable image {paths[i]}: {msg} (set on_bad_image: skip to leave such files out)")
    if bad:
        warn_once("skipped unreadable images", [f"{paths[i]} ({msg})" for i, msg in bad])
    bad_idx = {i for i, _ in bad}
    kept = np.array([i for i in range(len(paths)) if i not in bad_idx], dtype=np.int64)
    return images, kept
