"""``ImageDataModule``: the base of every Svertka data module, plus the shared in-memory datasets.

Every module keeps its images as one uint8 array ``(N, H, W, C)`` in memory (decoded once;
JPEG sets through the decode cache in ``data.cache``). Without augmentation the whole array is
normalized once into a float tensor and batches are plain tensor indexing (no per-sample
Python); with augmentation each sample goes through albumentations
(``resize_ops -> augmentations -> normalize_ops`` from ``data.preprocess``).

    python -c "from data.digits import DigitsDataModule as D; d = D(); d.setup('fit'); print(d)"
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data.preprocess import PreprocessSpec, eval_transform, normalize_ops, resize_ops

Task = Literal["classification", "regression"]
BadImagePolicy = Literal["skip", "error"]


class DataError(Exception):
    """A data set that cannot be used as configured (bad file, bad option, bad layout)."""


class MissingDataError(DataError, FileNotFoundError):
    """Expected data files are not there (the message names them and the root)."""


def default_root() -> Path:
    """``$DATASETS_DIR`` if set, else ``./datasets``."""
    return Path(os.environ.get("DATASETS_DIR") or "datasets")


def _size2(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return (input_size, input_size)
    h, w = (int(s) for s in input_size)
    return (h, w)


@dataclass
class Augment:
    """Training augmentation (albumentations), all off by default; set from YAML as ``augment: {hflip: 0.5}``.

    hflip: probability of a horizontal flip (keep 0 for digits: a flipped 2 is no digit).
    shift / scale / rotate: Affine ranges (fraction of size / fraction / degrees), applied with
    probability ``affine_p`` when any of them is non-zero.
    brightness_contrast: RandomBrightnessContrast limit (applied with p=0.5).
    coarse_dropout: probability of cutting one hole of 10-25% of the side.
    random_crop_padding: pad by this many pixels and crop back at random (the CIFAR recipe).
    backend: "batched" (default) runs the same operations on whole uint8 batches in torch (one
    ``grid_sample`` per batch, ~50x faster than per-sample albumentations on 2 cores);
    "albumentations" runs ``train_transform`` per sample (in ``num_workers`` processes).
    """

    hflip: float = 0.0
    shift: float = 0.0
    scale: float = 0.0
    rotate: float = 0.0
    affine_p: float = 0.5
    brightness_contrast: float = 0.0
    coarse_dropout: float = 0.0
    random_crop_padding: int = 0
    backend: Literal["batched", "albumentations"] = "batched"

    def __post_init__(self) -> None:
        for name in ("hflip", "affine_p", "coarse_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("shift", "scale", "rotate", "brightness_contrast", "random_crop_padding"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.backend not in ("batched", "albumentations"):
            raise ValueError(f"augment.backend must be 'batched' or 'albumentations', got {self.backend!r}")

    @property
    def has_affine(self) -> bool:
        return bool(self.shift or self.scale or self.rotate) and self.affine_p > 0

    @property
    def enabled(self) -> bool:
        has_affine = self.has_affine
        others = self.hflip or self.brightness_contrast or self.coarse_dropout or self.random_crop_padding
        return bool(has_affine or others)

    def ops(self, input_size: tuple[int, int]) -> list[A.BasicTransform]:
        """The augmentations, applied after the resize to ``input_size`` and before Normalize."""
        h, w = input_size
        ops: list[A.BasicTransform] = []
        if self.random_crop_padding > 0:
            p = self.random_crop_padding
            ops += [
                A.PadIfNeeded(min_height=h + 2 * p, min_width=w + 2 * p, border_mode=cv2.BORDER_CONSTANT, fill=0),
                A.RandomCrop(height=h, width=w),
            ]
        if self.hflip > 0:
            ops.append(A.HorizontalFlip(p=self.hflip))
        if self.has_affine:
            ops.append(
                A.Affine(
                    translate_percent=(-self.shift, self.shift),
                    scale=(1.0 - self.scale, 1.0 + self.scale),
                    rotate=(-self.rotate, self.rotate),
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    p=self.affine_p,
                )
            )
        if self.brightness_contrast > 0:
            lim = self.brightness_contrast
            ops.append(A.RandomBrightnessContrast(brightness_limit=lim, contrast_limit=lim, p=0.5))
        if self.coarse_dropout > 0:
            ops.append(
                A.CoarseDropout(
                    num_holes_range=(1, 1),
                    hole_height_range=(0.1, 0.25),
                    hole_width_range=(0.1, 0.25),
                    fill=0,
                    p=self.coarse_dropout,
                )
            )
        return ops


def train_transform(spec: PreprocessSpec, augment: Augment) -> A.Compose:
    """uint8 ``(H, W, C)`` -> float ``(C, h, w)``: resize -> augmentations -> Normalize -> ToTensorV2."""
    return A.Compose([*resize_ops(spec), *augment.ops(spec.input_size), *normalize_ops(spec)])


def resize_array(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Apply the eval resize to every image: uint8 ``(N, H, W, C)`` -> ``(N, h, w, C)``.

    Arrays already at the input size are taken as they are (decoded sets are cached at the eval resize).
    """
    if images.shape[1:3] == tuple(spec.input_size):
        return images
    op = A.Compose(resize_ops(spec))
    out = np.empty((len(images), *spec.input_size, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = op(image=img)["image"].reshape(out.shape[1:])
    return out


def normalize_array(images: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 ``(N, h, w, C)`` already at input size -> float ``(N, C, h, w)``, equal to ``eval_transform``.

    A 256-entry lookup table per channel is built by running the spec's own Normalize on the
    values 0..255, so the result matches serving to the bit.
    """
    c = images.shape[3]
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], c, axis=2)  # (1, 256, C)
    lut = A.Compose(normalize_ops(spec))(image=ramp)["image"][:, 0, :].numpy()  # (C, 256)
    out = np.empty((len(images), c, *images.shape[1:3]), dtype=np.float32)  # (N, C, h, w)
    for ch in range(c):
        out[:, ch] = lut[ch][images[..., ch]]  # uint8 indices: no int64 copy of the set
    return torch.from_numpy(out)


class BatchAugment:
    """collate_fn of the batched backend: uint8 ``(B, C, H, W)`` at input size -> augmented, normalized float.

    The same operations as ``Augment.ops`` in the same order (geometry, brightness/contrast,
    dropout, then Normalize), with per-sample random parameters drawn (in numpy, cheaply) from a
    seeded generator; the pixels see one ``grid_sample`` and a few whole-batch tensor ops.
    """

    def __init__(self, spec: PreprocessSpec, augment: Augment, seed: int = 0) -> None:
        self.augment = augment
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.rng = np.random.default_rng(seed)

    def _theta(self, b: int, h: int, w: int) -> torch.Tensor:
        """Per-sample inverse affine maps for ``affine_grid``, ``(B, 2, 3)`` in [-1, 1] coordinates."""
        a, rng = self.augment, self.rng
        m = np.repeat(np.eye(3)[None], b, axis=0)  # forward map in pixels around the centre, (B, 3, 3)
        if a.has_affine:
            on = rng.random(b) < a.affine_p
            ang = np.deg2rad(rng.uniform(-a.rotate, a.rotate, b)) * on
            s = 1.0 + rng.uniform(-a.scale, a.scale, b) * on
            m[:, 0, 0], m[:, 0, 1] = s * np.cos(ang), -s * np.sin(ang)
            m[:, 1, 0], m[:, 1, 1] = s * np.sin(ang), s * np.cos(ang)
            m[:, 0, 2] = rng.uniform(-a.shift, a.shift, b) * w * on
            m[:, 1, 2] = rng.uniform(-a.shift, a.shift, b) * h * on
        if a.random_crop_padding > 0:
            m[:, :2, 2] += rng.integers(-a.random_crop_padding, a.random_crop_padding + 1, (b, 2))
        if a.hflip > 0:
            m[:, 0, :] *= np.where(rng.random(b) < a.hflip, -1.0, 1.0)[:, None]
        d = np.diag([w / 2.0, h / 2.0, 1.0])
        theta = np.linalg.inv(d) @ np.linalg.inv(m) @ d  # output -> input, normalized coordinates
        return torch.from_numpy(theta[:, :2].astype(np.float32))

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x8, y = batch
        a, rng = self.augment, self.rng
        x = x8.float().div_(255.0)  # (B, C, H, W) in [0, 1]
        b, _, h, w = x.shape
        dev = x.device
        if a.has_affine or a.hflip > 0 or a.random_crop_padding > 0:
            grid = torch.nn.functional.affine_grid(self._theta(b, h, w).to(dev), list(x.shape), align_corners=False)
            x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if a.brightness_contrast > 0:
            lim, on = a.brightness_contrast, rng.random(b) < 0.5
            alpha = 1.0 + rng.uniform(-lim, lim, b) * on
            beta = rng.uniform(-lim, lim, b) * on
            x = torch.addcmul(
                torch.from_numpy(beta.astype(np.float32)).view(-1, 1, 1, 1).to(dev),
                x,
                torch.from_numpy(alpha.astype(np.float32)).view(-1, 1, 1, 1).to(dev),
            ).clamp_(0.0, 1.0)
        if a.coarse_dropout > 0:
            hh = np.maximum(np.rint(rng.uniform(0.1, 0.25, b) * h), 1).astype(int)
            ww = np.maximum(np.rint(rng.uniform(0.1, 0.25, b) * w), 1).astype(int)
            y0 = (rng.random(b) * (h - hh + 1)).astype(int)
            x0 = (rng.random(b) * (w - ww + 1)).astype(int)
            rows, cols = np.arange(h), np.arange(w)
            in_r = (rows >= y0[:, None]) & (rows < (y0 + hh)[:, None])  # (B, H)
            in_c = (cols >= x0[:, None]) & (cols < (x0 + ww)[:, None])  # (B, W)
            hole = in_r[:, :, None] & in_c[:, None, :] & (rng.random(b) < a.coarse_dropout)[:, None, None]
            x = x.masked_fill_(torch.from_numpy(hole)[:, None].to(dev), 0.0)
        return (x - self.mean.to(dev)) / self.std.to(dev), y  # (B, C, H, W) float, (B,)


def _passthrough(batch: Any) -> Any:
    """collate_fn for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


class TensorBatchDataset(Dataset):
    """Pre-normalized images ``(N, C, H, W)`` and targets ``(N,)``; a batch is one indexing op."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]  # (B, C, H, W), (B,)


class UInt8BatchDataset(TensorBatchDataset):
    """uint8 images ``(N, C, H, W)`` at input size, augmented and normalized a whole batch at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augmenter: BatchAugment) -> None:
        super().__init__(x, y)
        self.augmenter = augmenter
        self.defer = False  # True: yield uint8 batches; the data module augments them on the model's device

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.augmenter((self.x[i : i + 1], self.y[i : i + 1]))
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = super().__getitems__(indices)  # (B, C, H, W) uint8, (B,)
        return batch if self.defer else self.augmenter(batch)  # (B, C, H, W) float, (B,)


class AugmentedDataset(Dataset):
    """uint8 images ``(N, H, W, C)`` through a per-sample albumentations pipeline."""

    def __init__(self, images: np.ndarray, y: torch.Tensor, transform: A.Compose) -> None:
        self.images, self.y, self.transform = images, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image=self.images[i])["image"], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.transform(image=self.images[i])["image"] for i in indices])
        return x, self.y[torch.as_tensor(indices, dtype=torch.long)]  # (B, C, H, W), (B,)


def _seed_worker(worker_id: int) -> None:
    """Give each worker its own random stream (a forked generator would repeat the parent's)."""
    info = torch.utils.data.get_worker_info()
    seed = int(torch.initial_seed() % 2**32)  # differs per worker and per epoch
    if isinstance(getattr(info, "dataset", None), AugmentedDataset):
        info.dataset.transform.set_random_seed(seed)
    elif isinstance(getattr(info, "dataset", None), UInt8BatchDataset):
        info.dataset.augmenter.rng = np.random.default_rng(seed)


@dataclass
class Split:
    """One split held in memory: uint8 images ``(N, H, W, C)`` and targets ``(N,)``."""

    images: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        if len(self.images) != len(self.targets):
            raise DataError(f"{len(self.images)} images but {len(self.targets)} targets")

    def take(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.targets[idx])


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into parts of the given fractions (last takes the rest)."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts, acc = [], 0.0
    for f in fractions[:-1]:
        acc += f
        cuts.append(int(round(acc * n)))
    return [np.sort(p) for p in np.split(perm, cuts)]


class ImageDataModule(LightningDataModule):
    """Base data module: metadata from ``__init__`` on, in-memory splits, fast or augmented loaders.

    Subclasses set ``task``, ``class_names`` / ``target``, ``in_channels`` and the default
    mean/std before calling ``super().__init__`` (or right after, before ``preprocess_spec`` is
    used), and implement ``load_splits()`` returning ``{"train": Split, "val"?: Split, "test"?: Split}``.
    A missing ``val`` is cut from train with ``val_fraction`` and ``seed``.
    """

    task: Task = "classification"
    default_mean: tuple[float, ...] = (0.5,)
    default_std: tuple[float, ...] = (0.5,)

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 42,
        input_size: int | tuple[int, int] = 28,
        augment: Augment | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize: Literal["stretch", "center_crop"] = "stretch",
        cache_dir: str | None = None,
        in_channels: int = 1,
        class_names: list[str] | None = None,
        target: dict | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root) if root else default_root()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment if augment is not None else Augment()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.in_channels = in_channels
        self.class_names = list(class_names) if class_names is not None else None
        self.target = dict(target) if target is not None else None
        if self.task == "classification" and not self.class_names:
            raise DataError(f"{type(self).__name__}: a classification data set needs class names")
        m = tuple(mean) if mean is not None else self.default_mean
        s = tuple(std) if std is not None else self.default_std
        if len(m) == 1 and in_channels == 3:
            m, s = m * 3, s * 3 if len(s) == 1 else s
        self.preprocess_spec = PreprocessSpec(
            input_size=_size2(input_size), channels=in_channels, mean=m, std=s, resize=resize
        )
        self.splits: dict[str, Split] = {}
        self._datasets: dict[str, Dataset] = {}

    def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's, with dataclasses (``augment``) stored as plain dicts.

        Checkpoints carry ``datamodule_hyper_parameters`` and are read with
        ``torch.load(weights_only=True)``, which refuses any class of ours.
        """
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, **kwargs)
        for key, value in list(self.hparams.items()):
            if is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = asdict(value)
            elif isinstance(value, tuple):
                self.hparams[key] = list(value)

    # ---- metadata (the contract in docs/DESIGN.md) ----
    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.task == "classification" and self.class_names else None

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.task == "classification" else 1

    def bundle_info(self) -> dict:
        """What a bundle needs to use the model without this module."""
        return {
            "task": self.task,
            "class_names": self.class_names,
            "target": self.target,
            "preprocess": self.preprocess_spec.to_dict(),
        }

    # ---- data ----
    def load_splits(self) -> dict[str, Split]:
        """Return uint8 splits ``{"train": ..., "val": ..., "test": ...}`` (val and test optional)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self.load_splits()
        if "val" not in splits and "train" in splits:
            train = splits["train"]
            tr, va = seeded_split(len(train.targets), [1.0 - self.val_fraction, self.val_fraction], self.seed)
            splits["train"], splits["val"] = train.take(tr), train.take(va)
        for name, split in splits.items():
            if split.images.shape[3] != self.in_channels:
                raise DataError(f"{name} images have {split.images.shape[3]} channels, expected {self.in_channels}")
        self.splits = splits

    def dataset(self, split: str) -> Dataset:
        """The torch Dataset for ``split`` (train is augmented when ``augment`` is on)."""
        if split not in self._datasets:
            if split not in self.splits:
                self.setup()
            if split not in self.splits:
                raise DataError(f"{type(self).__name__} has no {split!r} split (has {sorted(self.splits)})")
            s = self.splits[split]
            y = torch.as_tensor(s.targets, dtype=torch.long if self.task == "classification" else torch.float32)
            spec = self.preprocess_spec
            if split == "train" and self.augment.enabled and self.augment.backend == "albumentations":
                self._datasets[split] = AugmentedDataset(s.images, y, train_transform(spec, self.augment))
            elif split == "train" and self.augment.enabled:
                x8 = torch.from_numpy(np.ascontiguousarray(resize_array(s.images, spec).transpose(0, 3, 1, 2)))
                augmenter = BatchAugment(spec, self.augment, seed=self.seed)
                self._datasets[split] = UInt8BatchDataset(x8, y, augmenter)  # (N, C, H, W) uint8
            else:
                self._datasets[split] = TensorBatchDataset(normalize_array(resize_array(s.images, spec), spec), y)
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        # Plain tensor indexing needs no workers; augmentation may run in num_workers processes.
        workers = self.num_workers if isinstance(ds, (AugmentedDataset, UInt8BatchDataset)) else 0
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=_passthrough,
            persistent_workers=workers > 0,
            worker_init_fn=_seed_worker if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        if isinstance(ds, UInt8BatchDataset):  # under a Trainer: augment after the transfer, on its device
            ds.defer = self.trainer is not None and self.num_workers == 0
        return self._loader("train", shuffle=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment deferred uint8 train batches on the device they now live on (GPU when training there)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and batch[0].dtype == torch.uint8:
            return self.dataset("train").augmenter(tuple(batch))
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (val where the data set has no test split)."""
        self.setup()
        return self._loader("test" if "test" in self.splits else "val", shuffle=False)

    def __repr__(self) -> str:
        sizes = {k: len(v.targets) for k, v in self.splits.items()}
        return (
            f"{type(self).__name__}(task={self.task}, num_outputs={self.num_outputs}, in_channels={self.in_channels}, "
            f"input_size={self.preprocess_spec.input_size}, splits={sizes or 'not set up'}, "
            f"augment={asdict(self.augment) if self.augment.enabled else None})"
        )


def warn_once(message: str, items: Sequence[str], limit: int = 10) -> None:
    """One warning listing up to ``limit`` items and the total count."""
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    warnings.warn(f"{message} ({len(items)}): {shown}", UserWarning, stacklevel=3)


__all__ = [
    "Augment",
    "DataError",
    "ImageDataModule",
    "MissingDataError",
    "Split",
    "default_root",
    "eval_transform",
    "normalize_array",
    "resize_array",
    "seeded_split",
    "train_transform",
    "warn_once",
]
