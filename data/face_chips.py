"""Align raw photos into face chips once (cached), so a model can train on unaligned photos.

    from data.face_chips import align_files
    chips, errors = align_files(photo_paths, FaceFraming(200, points=UTKFACE_POINTS))  # path or None each

Each photo's largest face (``data.faces.FaceAligner``: dlib HOG + 5 landmarks + a chip cut
to the framing) is written as a PNG under ``<cache>/faces/``, named by a hash of the photo's
path, size, mtime and the framing/detection settings: a second run reads the chips back, a
changed photo or setting makes new ones. The cache is never inside the data root. Data
modules use it through ``align_faces: true`` (``data.folder.CSVDataModule``,
``data.utkface.UTKFaceDataModule``); their bundles then record the framing, and serving
aligns uploads the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from data.base import DataError
from data.faces import DetectSettings, FaceAligner, FaceFraming
from data.preprocess import ImageError, load_image

CHIPS_VERSION = 1


def _key(path: Path, framing: FaceFraming, settings: DetectSettings) -> str:
    st = os.stat(path)
    raw = json.dumps([CHIPS_VERSION, os.fspath(path), st.st_size, st.st_mtime_ns, framing.to_dict(), repr(settings)])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def align_files(
    paths: Sequence[str | Path],
    framing: FaceFraming,
    settings: DetectSettings | None = None,
    cache_dir: Path | None = None,
    data_root: Path | None = None,
    progress: bool = True,
) -> tuple[list[Path | None], dict[int, str]]:
    """``(chip path or None per photo, {index: why not})``: the largest face of each photo as a cached PNG."""
    from PIL import Image
    from tqdm.auto import tqdm

    from data.cache import default_cache_dir

    settings = settings or DetectSettings()
    root = Path(cache_dir or default_cache_dir()).expanduser().resolve() / "faces"
    if data_root is not None and root.is_relative_to(Path(data_root).resolve()):
        raise DataError(f"cache_dir {root} is inside the data root {data_root}; choose a folder outside it")
    root.mkdir(parents=True, exist_ok=True)
    aligner: FaceAligner | None = None  # built on the first miss: a warm cache needs no dlib
    chips: list[Path | None] = []
    errors: dict[int, str] = {}
    for i, p in enumerate(tqdm(paths, desc="aligning faces (once; cached)", unit="photo", disable=not progress)):
        path = Path(p)
        try:
            key = _key(path, framing, settings)
        except OSError as e:
            chips.append(None)
            errors[i] = f"cannot read ({e.strerror or e})"
            continue
        chip, miss = root / f"{key}.png", root / f"{key}.none"
        if not chip.is_file() and not miss.is_file():
            aligner = aligner or FaceAligner(framing, settings)
            try:
                faces = aligner(load_image(path, channels=3), max_faces=1)
            except ImageError as e:
                faces, reason = [], str(e)
            else:
                reason = "no face found"
            if faces:
                tmp = chip.with_name(f".{chip.name}.{os.getpid()}.png")
                Image.fromarray(faces[0].chip).save(tmp)
                os.replace(tmp, chip)
            else:
                miss.write_text(reason)
        if chip.is_file():
            chips.append(chip)
        else:
            chips.append(None)
            errors[i] = miss.read_text()
    return chips, errors
