"""In-memory splits, the datasets over them and the resumable train sampler.

Every data module keeps its images as one uint8 array ``(N, H, W, C)``. Eval splits are
normalized once into a float tensor (a batch is one indexing op). The train split is a
``TrainDataset``: uint8 batches, with the per-sample albumentations part of the augmentation
run here (in loader workers) and the batched part either here or, under a Trainer, on the
training device after the transfer (``ImageDataModule.on_after_batch_transfer``).

    python -c "from data.datasets import seeded_split; print(seeded_split(10, [0.8, 0.2], 0))"
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from data.augment import BatchAugment, sample_seed
from data.errors import DataError
from data.preprocess import PreprocessSpec, normalize_ops, resize_ops


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
    out = torch.empty((len(images), c, *images.shape[1:3]), dtype=torch.float32)  # (N, C, h, w)
    step = max(1, (1 << 22) // max(1, images[0].size))  # ~4 M values a chunk: int32 indices stay small
    for ch in range(c):
        table = torch.from_numpy(lut[ch])
        for i in range(0, len(images), step):  # index_select: ~15x numpy's fancy indexing by uint8
            idx = torch.from_numpy(images[i : i + step, ..., ch]).to(torch.int32)
            out[i : i + step, ch] = torch.index_select(table, 0, idx.reshape(-1)).view(idx.shape)
    return out


def passthrough(batch: Any) -> Any:
    """collate_fn for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


class TensorBatchDataset(Dataset):
    """Pre-normalized images ``(N, C, H, W)`` and targets ``(N,)``; a batch is one indexing op."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        i = i[0] if isinstance(i, tuple) else i
        return self.x[i], self.y[i]

    def __getitems__(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor([i[0] if isinstance(i, tuple) else i for i in items], dtype=torch.long)
        return self.x[idx], self.y[idx]  # (B, C, H, W), (B,)


class TrainDataset(Dataset):
    """The augmented train split: uint8 images at input size -> batches.

    ``per_sample`` (albumentations, may be None) runs on each image, seeded by the sampler's
    ``(index, seed)`` items; the result is a uint8 batch ``(B, C, H, W)``. With ``defer`` the
    batch is returned as it is (the data module runs ``engine`` on the device); otherwise
    ``engine`` (the batched ops + Normalize) runs here.
    """

    def __init__(self, images: np.ndarray, y: torch.Tensor, per_sample: A.Compose | None, engine: BatchAugment) -> None:
        self.images = images if per_sample is not None else None  # (N, H, W, C) for albumentations
        self.x8 = (
            None if per_sample is not None else torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        )
        self.y, self.per_sample, self.engine = y, per_sample, engine
        self.shape = images.shape[1:]
        self.defer = False

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def uint8_batch(self, items: list[Any]) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` for sampler items (``int`` or ``(index, seed)``)."""
        idx = [i[0] if isinstance(i, tuple) else i for i in items]
        if self.per_sample is None:
            return self.x8[torch.as_tensor(idx, dtype=torch.long)]
        out = np.empty((len(items), *self.shape), dtype=np.uint8)  # (B, H, W, C)
        for k, item in enumerate(items):
            if isinstance(item, tuple):
                self.per_sample.set_random_seed(item[1])
            img = self.per_sample(image=self.images[idx[k]])["image"]
            if img.dtype != np.uint8 or img.size != out[k].size:
                raise DataError(
                    f"augment: the per-sample ops must keep a uint8 image of shape {self.shape}, "
                    f"got {img.dtype} {img.shape}"
                )
            out[k] = img.reshape(self.shape)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def __getitems__(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor([i[0] if isinstance(i, tuple) else i for i in items], dtype=torch.long)
        batch = (self.uint8_batch(items), self.y[idx])  # (B, C, H, W) uint8, (B,)
        return batch if self.defer else self.engine(batch)  # float (B, C, H, W) when not deferred


class ResumableSampler(DistributedSampler):
    """Shuffled, sharded per rank, and resumable mid-epoch; yields ``(index, seed)`` items.

    The order is a function of ``(seed, epoch)`` (as ``DistributedSampler``); ``start`` skips
    the first samples of this rank's epoch (a run resumed mid-epoch); each item carries the
    albumentations seed of its position, so per-sample augmentation does not depend on the
    number of workers and replays exactly on resume.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        for pos in range(self.start, len(indices)):
            yield indices[pos], sample_seed(self.seed, self.epoch, self.rank, pos)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}


def worker_count(requested: int, dataset: Dataset) -> int:
    """Loader workers: only per-sample albumentations work is worth a process; indexing is not."""
    return requested if isinstance(dataset, TrainDataset) and dataset.per_sample is not None else 0


def batches_done(trainer: Any, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches of it already trained)`` from a (possibly restored) trainer's fit loop.

    Lightning 2.6 restores its loop counters but restarts a plain loader from the top of its
    epoch; the sampler skips what these counters say was trained (0 at an epoch's end).
    """
    loop = trainer.fit_loop
    epoch = int(loop.epoch_progress.current.processed)
    done = int(loop.epoch_loop.batch_progress.current.processed)
    limit = trainer.limit_train_batches
    total = min(batches_per_epoch, limit) if isinstance(limit, int) else int(batches_per_epoch * float(limit or 1.0))
    return epoch, (done if done < total else 0)


__all__ = [
    "ResumableSampler",
    "Split",
    "TensorBatchDataset",
    "TrainDataset",
    "normalize_array",
    "passthrough",
    "resize_array",
    "seeded_split",
]
