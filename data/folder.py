"""Your own images: a folder per class (``ImageFolderDataModule``) or a CSV (``CSVDataModule``).

Files are decoded once with ``data.preprocess.load_image`` at the eval resize and cached (see
``data.cache``); unreadable files are skipped with one warning (``on_bad_image: skip``) or stop
the run naming the file (``on_bad_image: error``).

    python -c "from data.folder import ImageFolderDataModule as D; d = D(root='photos'); d.setup(); print(d)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.base import (
    BadImagePolicy,
    DataError,
    ImageDataModule,
    MissingDataError,
    Split,
    seeded_split,
    warn_once,
)
from data.cache import decode_cached
from data.faces import UTKFACE_POINTS, FaceFraming
from data.imagefile import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")


def face_framing(size: int = 200, padding: float | None = None) -> dict:
    """A ``faces`` framing: UTKFace's landmark places (the default), or dlib's template with ``padding``."""
    if padding is None:
        return FaceFraming(size, points=UTKFACE_POINTS).to_dict()
    return FaceFraming(size, padding).to_dict()


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden ones left out), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(s.startswith(".") for s in p.parts[-2:])
    )


class FileDataModule(ImageDataModule):
    """Base for sets of image files: subclasses return a table ``path, target, split`` from ``file_table()``.

    ``split`` may be None everywhere (then a seeded train/val/test split by ``val_fraction`` and
    ``test_fraction``), or name each row's split; a missing val split is cut from train.

    Args:
        test_fraction: Share held out as the test split when the files name no split.
        on_bad_image: ``skip`` unreadable files with one warning, or stop at the first (``error``).
        align_faces: The files are photos: align each one's largest face once into a cached chip.
        faces: The face framing (``data.faces.FaceFraming`` as a dict) of the chips; set by the data set.
        **kwargs: ``ImageDataModule``'s arguments.
    """

    def __init__(
        self,
        *args,
        test_fraction: float = 0.1,
        on_bad_image: BadImagePolicy = "skip",
        align_faces: bool = False,
        faces: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.align_faces = align_faces
        if align_faces and not faces:
            faces = face_framing()
        self.faces = FaceFraming.from_dict(faces) if faces else None
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if not 0.0 <= test_fraction < 1.0 or self.val_fraction + test_fraction >= 1.0:
            raise ValueError(f"need 0 <= test_fraction and val_fraction + test_fraction < 1, got {test_fraction}")
        self.test_fraction = test_fraction
        self.on_bad_image = on_bad_image

    def file_table(self) -> pd.DataFrame:
        """Columns ``path`` (absolute), ``target`` (class index or number), ``split`` (train/val/test or None)."""
        raise NotImplementedError

    def bundle_info(self) -> dict:
        """The base's, plus the face framing when the model is trained on aligned face chips."""
        return {**super().bundle_info(), "faces": self.faces.to_dict() if self.faces else None}

    def _aligned(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with each photo replaced by its largest face's chip; photos without one left out."""
        from data.face_chips import align_files

        assert self.faces is not None
        chips, errors = align_files(list(table["path"]), self.faces, cache_dir=self.cache_dir, data_root=self.root)
        if errors and self.on_bad_image == "error":
            i, why = next(iter(errors.items()))
            raise DataError(f"{table['path'].iloc[i]}: {why} (set on_bad_image: skip to leave such photos out)")
        if errors:
            warn_once("align_faces: left out photos", [f"{table['path'].iloc[i]} ({why})" for i, why in errors.items()])
        out = table.assign(path=[str(c) if c is not None else None for c in chips])
        return out[out["path"].notna()]

    def load_splits(self) -> dict[str, Split]:
        table = self.file_table().reset_index(drop=True)
        if table.empty:
            raise MissingDataError(f"{type(self).__name__}: no image files found under {self.root}")
        if self.align_faces:
            table = self._aligned(table).reset_index(drop=True)
            if table.empty:
                raise DataError(f"{type(self).__name__}: align_faces found no face in any photo under {self.root}")
        images, kept = decode_cached(
            list(table["path"]),
            self.preprocess_spec,
            self.cache_dir,
            data_root=self.root,
            on_bad_image=self.on_bad_image,
        )
        if len(kept) == 0:
            raise DataError(
                f"{type(self).__name__}: none of the {len(table)} image files under {self.root} is readable"
            )
        table = table.iloc[kept].reset_index(drop=True)
        dtype = np.int64 if self.task == "classification" else np.float32
        data = Split(images, table["target"].to_numpy(dtype=dtype))
        if table["split"].isna().all():
            fractions = [1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction]
            parts = seeded_split(len(table), fractions, self.seed)
            named = zip(SPLITS, parts, strict=True)
            return {name: data.take(idx) for name, idx in named if name == "train" or len(idx)}
        split = table["split"].fillna("train").astype(str).str.strip().str.lower()
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise DataError(f"{type(self).__name__}: unknown split values {unknown}; use train, val or test")
        out = {name: data.take(np.flatnonzero(split.to_numpy() == name)) for name in SPLITS}
        return {name: s for name, s in out.items() if name == "train" or len(s.targets)}


class ImageFolderDataModule(FileDataModule):
    """One sub-folder per class under ``root`` (class names = sorted folder names).

    ``val_dir`` / ``test_dir`` (same sub-folders) give separate splits; otherwise a seeded split
    of ``root`` by ``val_fraction`` / ``test_fraction``.
    YAML: ``class_path: data.folder.ImageFolderDataModule``, ``init_args: {root: photos/train, val_dir: photos/val}``

    Args:
        root: The folder with one sub-folder per class (the train split, or all of the data).
        val_dir: A folder with the same sub-folders: the val split.
        test_dir: A folder with the same sub-folders: the test split.
        channels: 1 (gray) or 3 (RGB): what the images are converted to.
        batch_size: Images per batch, in every split.
        input_size: Side (or ``[height, width]``) the images are resized to.
        test_fraction: Share held out as the test split when there is no ``test_dir``.
        **kwargs: ``FileDataModule``'s and ``ImageDataModule``'s other arguments.
    """

    task = "classification"

    def __init__(
        self,
        root: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        channels: int = 3,
        *,
        batch_size: int = 64,
        input_size: int | tuple[int, int] = 64,
        test_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        folder = Path(root) if root else None
        if folder is None or not folder.is_dir():
            raise MissingDataError(f"ImageFolderDataModule: root {root!r} is not a folder (one sub-folder per class)")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise MissingDataError(f"ImageFolderDataModule: {folder} has no class sub-folders")
        super().__init__(
            root=root,
            batch_size=batch_size,
            input_size=input_size,
            in_channels=channels,
            class_names=classes,
            target=None,
            test_fraction=0.0 if test_dir else test_fraction,
            align_faces=False,  # photos of anything: no face stage
            faces=None,
            **kwargs,
        )
        self.val_dir = Path(val_dir) if val_dir else None
        self.test_dir = Path(test_dir) if test_dir else None
        for d in (self.val_dir, self.test_dir):
            if d is not None and not d.is_dir():
                raise MissingDataError(f"ImageFolderDataModule: {d} is not a folder")
        self.save_hyperparameters()

    def _rows(self, folder: Path, split: str | None) -> list[dict]:
        index = {name: i for i, name in enumerate(self.class_names)}
        rows = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name not in index:
                raise DataError(f"{sub}: class folder not in the training classes {self.class_names}")
            rows += [{"path": str(p), "target": index[sub.name], "split": split} for p in list_images(sub)]
        return rows

    def file_table(self) -> pd.DataFrame:
        has_val = self.val_dir is not None
        rows = self._rows(self.root, "train" if (has_val or self.test_dir) else None)
        if has_val:
            rows += self._rows(self.val_dir, "val")
        if self.test_dir is not None:
            rows += self._rows(self.test_dir, "test")
        return pd.DataFrame(rows, columns=["path", "target", "split"])


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise MissingDataError(f"CSV file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as CSV ({e})") from None


class CSVDataModule(FileDataModule):
    """A CSV with a path column and a label (classification) or numeric target (regression) column.

    Paths are relative to the CSV's folder (or absolute). An optional ``split`` column holds
    train/val/test. Classification class names: ``class_names`` if given, else the sorted labels.
    ``align_faces: true``: the files are photos; each one's largest face is aligned once into a
    cached chip (``data.face_chips``; photos without a face are left out with a warning) and the bundle
    records the framing (``face_size``; UTKFace's landmark places, or dlib's template with
    ``face_padding`` when it is set), so serving detects and aligns the same way.
    YAML: ``class_path: data.folder.CSVDataModule``, ``init_args: {csv: faces.csv, target_column: age}``

    Args:
        csv: The CSV file (relative to ``root`` when not found as given).
        path_column: Column of image paths, relative to the CSV's folder or absolute.
        label_column: Column of class labels (classification).
        target_column: Column of numbers (regression instead of classification).
        split_column: Optional column of train/val/test.
        class_names: The classes in label order (default: the sorted labels).
        target_min: Lowest value a regression predicts (default: the column's minimum).
        target_max: Highest value a regression predicts (default: the column's maximum).
        channels: 1 (gray) or 3 (RGB): what the images are converted to.
        root: Where a relative ``csv`` is looked for when not found as given.
        batch_size: Images per batch, in every split.
        input_size: Side (or ``[height, width]``) the images are resized to.
        align_faces: The files are photos: align each one's largest face once into a cached chip.
        face_size: Side of the aligned face chips, in pixels.
        face_padding: dlib's template with this padding instead of UTKFace's landmark places.
        **kwargs: ``FileDataModule``'s and ``ImageDataModule``'s other arguments.
    """

    def __init__(
        self,
        csv: str,
        path_column: str = "path",
        label_column: str | None = "label",
        target_column: str | None = None,
        split_column: str = "split",
        class_names: list[str] | None = None,
        target_min: float | None = None,
        target_max: float | None = None,
        channels: int = 3,
        root: str | None = None,
        *,
        batch_size: int = 64,
        input_size: int | tuple[int, int] = 64,
        align_faces: bool = False,
        face_size: int = 200,
        face_padding: float | None = None,
        **kwargs: Any,
    ) -> None:
        csv_path = Path(csv)
        if not csv_path.is_absolute() and not csv_path.exists() and root:
            csv_path = Path(root) / csv_path
        df = _read_csv(csv_path)
        self.task = "regression" if target_column else "classification"
        column = target_column or label_column
        for col in (path_column, column):
            if col is None or col not in df.columns:
                raise DataError(f"{csv_path}: no column {col!r} (columns: {list(df.columns)})")
        df = df.dropna(subset=[path_column, column])
        target = None
        if self.task == "regression":
            values = pd.to_numeric(df[column], errors="coerce")
            if values.isna().any():
                bad = df.loc[values.isna(), column].astype(str).head(5).tolist()
                raise DataError(f"{csv_path}: column {column!r} must be numeric for regression, got {bad}")
            lo = float(values.min()) if target_min is None else float(target_min)
            hi = float(values.max()) if target_max is None else float(target_max)
            target = {"name": column, "min": lo, "max": hi}
            df = df.assign(_target=values.astype("float32"))
        else:
            labels = df[column]
            if pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all():
                labels = labels.astype("int64")
            names = [str(v) for v in sorted(labels.unique())]
            if class_names is not None:
                unknown = sorted(set(names) - set(class_names))
                if unknown:
                    raise DataError(f"{csv_path}: labels {unknown} are not in class_names {class_names}")
                names = list(class_names)
            index = {n: i for i, n in enumerate(names)}
            df = df.assign(_target=[index[str(v)] for v in labels])
        super().__init__(
            root=str(csv_path.parent.resolve()),
            batch_size=batch_size,
            input_size=input_size,
            in_channels=channels,
            class_names=names if self.task == "classification" else None,
            target=target,
            align_faces=align_faces,
            faces=face_framing(face_size, face_padding) if align_faces else None,
            **kwargs,
        )
        base = csv_path.parent
        paths = [str(p if Path(p).is_absolute() else base / p) for p in df[path_column].astype(str)]
        split = df[split_column] if split_column in df.columns else pd.Series([None] * len(df), index=df.index)
        self.csv_path = csv_path
        self._table = pd.DataFrame({"path": paths, "target": df["_target"].to_numpy(), "split": split.to_numpy()})
        self.save_hyperparameters()

    def file_table(self) -> pd.DataFrame:
        return self._table
