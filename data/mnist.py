"""MNIST and Fashion-MNIST from torchvision's raw layout, parsed here (never written to the root).

Reads ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (or
``FashionMNIST/``), gzip or plain, straight into numpy; a read-only data root works as is.
``download: true`` fetches missing files with torchvision into ``root`` first.

    python -c "from data.mnist import FashionMNISTDataModule as D; d = D(); d.setup(); print(d)"
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from data.base import DataError, ImageDataModule, MissingDataError, Split

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (plain or ``.gz``) into a numpy array of its declared shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path}: IDX header says shape {tuple(dims)} ({expected} bytes) but has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims)).astype(dtype.newbyteorder("="))


def find_raw_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, the uncompressed one first."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class MNISTDataModule(ImageDataModule):
    """MNIST digits (60,000 train / 10,000 test, 28x28 gray), classes "0".."9".

    ``root`` holds ``MNIST/raw/`` (torchvision's layout); val is cut from train with
    ``val_fraction`` and ``seed``. YAML: ``class_path: data.mnist.MNISTDataModule``.

    Args:
        download: Fetch missing files with torchvision into ``root`` first (online).
        **kwargs: ``ImageDataModule``'s arguments.
    """

    folder = "MNIST"
    torchvision_name = "MNIST"
    task = "classification"
    default_mean = (0.1307,)
    default_std = (0.3081,)
    classes = [str(i) for i in range(10)]
    hflip_ok = False

    def __init__(self, *, download: bool = False, **kwargs: Any) -> None:
        super().__init__(in_channels=1, class_names=list(self.classes), target=None, **kwargs)
        self.download = download
        if self.augment.hflip and not self.hflip_ok:
            warnings.warn(f"augment.hflip on {self.folder}: mirrored digits are not digits", UserWarning, stacklevel=2)
        self.save_hyperparameters()

    @property
    def raw_folder(self) -> Path:
        return self.root / self.folder / "raw"

    def _missing(self) -> list[str]:
        names = [n for pair in SPLIT_FILES.values() for n in pair]
        return [n for n in names if find_raw_file(self.raw_folder, n) is None]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            from torchvision import datasets

            cls = getattr(datasets, self.torchvision_name)
            for train in (True, False):
                cls(root=str(self.root), train=train, download=True)

    def load_splits(self) -> dict[str, Split]:
        self.prepare_data()  # a no-op unless download=True and files are missing
        missing = self._missing()
        if missing:
            raise MissingDataError(
                f"{self.folder} not found under data root {self.root}: missing {', '.join(missing)} "
                f"(plain or .gz) in {self.raw_folder}. Set --data.root (or $DATASETS_DIR) to the folder that "
                f"holds {self.folder}/raw/, or pass --data.download true when online."
            )
        splits = {}
        for split, (img_name, lbl_name) in SPLIT_FILES.items():
            images = read_idx(find_raw_file(self.raw_folder, img_name))
            labels = read_idx(find_raw_file(self.raw_folder, lbl_name)).astype(np.int64)
            if images.ndim != 3 or images.dtype != np.uint8:
                raise DataError(f"{self.raw_folder / img_name}: expected uint8 images (N, H, W), got {images.shape}")
            if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(self.classes):
                raise DataError(f"{self.raw_folder / lbl_name}: labels outside 0..{len(self.classes) - 1}")
            splits[split] = Split(images[..., None], labels)
        return splits


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando articles, 60,000 / 10,000, 28x28 gray), 10 clothing classes.

    ``root`` holds ``FashionMNIST/raw/``. YAML: ``class_path: data.mnist.FashionMNISTDataModule``.
    """

    folder = "FashionMNIST"
    torchvision_name = "FashionMNIST"
    default_mean = (0.2860,)
    default_std = (0.3530,)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    hflip_ok = True
