"""``UTKFaceDataModule``: age regression from UTKFace's ``[age]_[gender]_[race]_[date].jpg.chip.jpg`` files.

The age is the text before the first ``_``; gender and race are kept when they parse (the real
set has names with a space, a missing dot or a missing race field: all are read). Names
without an age are skipped with one warning. Split by a hash of the file name (80/10/10 by
default), so it does not depend on the listing order or on which other files are present.

    python -c "from data.utkface import UTKFaceDataModule as D; d = D(); d.setup(); print(d)"
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from data.base import Augment, MissingDataError, warn_once
from data.folder import FileDataModule, face_framing
from data.imagefile import IMAGE_SUFFIXES

_FIELD = re.compile(r"^\s*(\d+)\s*$")


def parse_name(name: str) -> dict | None:
    """``"24_0_1_2017...jpg.chip.jpg"`` -> ``{"age": 24, "gender": 0, "race": 1}``; None without an age.

    Gender (0/1) and race (0..4) are None when their field is missing or not a small number
    (e.g. ``39_1_20170116174525125.jpg.chip.jpg`` has no race).
    """
    fields = name.split("_")
    m = _FIELD.match(fields[0])
    if len(fields) < 2 or not m:
        return None

    def small(i: int, hi: int) -> int | None:
        f = _FIELD.match(fields[i]) if i < len(fields) else None
        return int(f.group(1)) if f and len(f.group(1)) == 1 and int(f.group(1)) <= hi else None

    return {"age": int(m.group(1)), "gender": small(1, 1), "race": small(2, 4)}


def name_split(name: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the file name's hash: same name, same split, on any machine."""
    u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def index_folder(folder: Path) -> pd.DataFrame:
    """One row per image that parses: ``path, name, age, gender, race`` (gender/race nullable Int64).

    Image files whose names do not parse are skipped and listed in one warning.
    """
    rows, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parsed = parse_name(p.name)
        if parsed is None:
            skipped.append(p.name)
        else:
            rows.append({"path": str(p), "name": p.name, **parsed})
    if skipped:
        warn_once(f"UTKFace: skipped files in {folder} whose names do not start with an age", skipped)
    df = pd.DataFrame(rows, columns=["path", "name", "age", "gender", "race"])
    return df.astype({"age": "int64", "gender": "Int64", "race": "Int64"})


class UTKFaceDataModule(FileDataModule):
    """Faces -> age (regression), RGB, ``target = {"name": "age", "min": age_min, "max": age_max}``.

    ``root`` holds ``UTKFace/`` (or is that folder). y is the age in years (float). UTKFace's files
    are dlib-aligned 200x200 chips; the bundle records their framing (the 5 landmarks' measured
    places, ``data.faces.UTKFACE_POINTS``; or dlib's template with ``face_padding`` when it is
    set), so serving detects and aligns faces the same way. Photos named the same way but
    not aligned (your own): ``align_faces: true`` aligns each once into the cache (``data.face_chips``).
    YAML: ``class_path: data.utkface.UTKFaceDataModule``, ``init_args: {input_size: 64, batch_size: 128}``

    Args:
        folder: The sub-folder of ``root`` with the images (``root`` itself when it has none).
        input_size: Side (or ``[height, width]``) the images are resized to.
        age_min: Youngest age a model predicts.
        age_max: Oldest age a model predicts.
        face_size: Side of the face chips, in pixels (UTKFace's are 200).
        face_padding: dlib's template with this padding instead of UTKFace's measured landmark places.
        **kwargs: ``FileDataModule``'s and ``ImageDataModule``'s other arguments (``augment``
            defaults to flips, small shifts, rotations and brightness/contrast changes).
    """

    task = "regression"
    default_augment = Augment(hflip=0.5, shift=0.05, scale=0.05, rotate=10.0, brightness_contrast=0.1)

    def __init__(
        self,
        *,
        folder: str = "UTKFace",
        input_size: int | tuple[int, int] = 64,
        age_min: float = 0.0,
        age_max: float = 116.0,
        face_size: int = 200,
        face_padding: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            input_size=input_size,
            in_channels=3,
            class_names=None,
            target={"name": "age", "min": float(age_min), "max": float(age_max)},
            faces=face_framing(face_size, face_padding),  # the files are (or become) dlib-framed chips
            **kwargs,
        )
        self.folder = folder
        self.index: pd.DataFrame | None = None
        self.save_hyperparameters()

    @property
    def image_folder(self) -> Path:
        sub = self.root / self.folder
        return sub if sub.is_dir() else self.root

    def file_table(self) -> pd.DataFrame:
        folder = self.image_folder
        if not folder.is_dir():
            raise MissingDataError(
                f"UTKFace: no folder {self.root / self.folder} (data root {self.root}); set --data.root "
                f"(or $DATASETS_DIR) to the folder holding {self.folder}/"
            )
        self.index = index_folder(folder)
        if self.index.empty:
            raise MissingDataError(f"UTKFace: no [age]_[gender]_[race]_[date].jpg.chip.jpg images in {folder}")
        split = [name_split(n, self.val_fraction, self.test_fraction) for n in self.index["name"]]
        return pd.DataFrame({"path": self.index["path"], "target": self.index["age"].astype("float32"), "split": split})


def link_split(root: str | Path, out: str | Path, split: str = "test", folder: str = "UTKFace",
               val_fraction: float = 0.1, test_fraction: float = 0.1) -> int:  # fmt: skip
    """Make ``out/`` a folder of symlinks to one split's images plus ``out/labels.csv`` (name, age, ...).

    The split is the data module's (same fractions, same file-name hash), so a bundle run over
    ``out/`` with ``python -m serving.batch --truth out/labels.csv`` scores the fit's test set.
    """
    dm = UTKFaceDataModule(root=str(root), folder=folder, val_fraction=val_fraction, test_fraction=test_fraction)
    table = dm.file_table()
    index = dm.index.loc[table["split"] == split]
    if index.empty:
        raise MissingDataError(f"UTKFace: the {split!r} split is empty")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # whole folder or nothing
    try:
        for src, name in zip(index["path"], index["name"], strict=True):
            (tmp / name).symlink_to(Path(src).resolve())
        index.drop(columns="path").to_csv(tmp / "labels.csv", index=False)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(index)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(
        prog="python -m data.utkface",
        description="Write one split of UTKFace as a folder of symlinks + labels.csv (for serving.batch --truth).",
    )
    p.add_argument("--root", default=os.environ.get("DATASETS_DIR"), help="folder holding UTKFace/ ($DATASETS_DIR)")
    p.add_argument("--folder", default="UTKFace")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--out", required=True, help="new (or empty) folder")
    args = p.parse_args(argv)
    if not args.root:
        print("error: --root not given and $DATASETS_DIR is not set", file=sys.stderr)
        return 2
    try:
        n = link_split(args.root, args.out, args.split, args.folder, args.val_fraction, args.test_fraction)
    except (MissingDataError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} {args.split} images linked in {args.out} (true ages in {Path(args.out) / 'labels.csv'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
