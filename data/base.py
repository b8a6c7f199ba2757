"""``ImageDataModule``: the base of every Svertka data module (metadata, splits, loaders, augmentation).

Every module keeps its images as one uint8 array ``(N, H, W, C)`` in memory (decoded once;
JPEG sets through the decode cache in ``data.cache``). Eval batches are plain tensor indexing
of a pre-normalized tensor. Training augmentation (``data.augment``) is an albumentations
pipeline: its per-sample part runs in the loader workers, its batched part on the training
device after the transfer (``on_after_batch_transfer``), whatever ``num_workers`` is. The
errors live in ``data.errors``, the datasets and the sampler in ``data.datasets``; the names
below are re-exported so ``from data.base import ...`` keeps working.

    python -c "from data.digits import DigitsDataModule as D; d = D(); d.setup('fit'); print(d)"
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data.augment import Augment, BatchAugment, describe, split_pipeline, train_transform
from data.datasets import (
    ResumableSampler,
    Split,
    TensorBatchDataset,
    TrainDataset,
    batches_done,
    normalize_array,
    passthrough,
    resize_array,
    seeded_split,
    worker_count,
)
from data.errors import DataError, MissingDataError, warn_once
from data.preprocess import PreprocessSpec, eval_transform

Task = Literal["classification", "regression"]
BadImagePolicy = Literal["skip", "error"]


def default_root() -> Path:
    """``$DATASETS_DIR`` if set, else ``./datasets``."""
    return Path(os.environ.get("DATASETS_DIR") or "datasets")


def _size2(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return (input_size, input_size)
    h, w = (int(s) for s in input_size)
    return (h, w)


@functools.cache
def init_defaults(cls: type) -> dict[str, Any]:
    """Every ``__init__`` argument of ``cls`` with a default, as LightningCLI resolves them (``**kwargs`` followed
    into the parents, minus what a subclass gives its parent itself), in the order ``--print_config`` shows."""
    from jsonargparse import ArgumentParser, Namespace

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init", sub_configs=False)
    return parser.get_defaults(skip_validation=True).get("init", Namespace()).as_dict()


class ImageDataModule(LightningDataModule):
    """Base data module: metadata from ``__init__`` on, in-memory splits, fast or augmented loaders.

    Subclasses set ``task`` and the default mean/std (and augmentation) as class attributes, take
    their own arguments plus ``**kwargs`` (passed on to ``super().__init__``, so every argument
    below is declared and documented once, here, and LightningCLI still sees all of them), give
    ``in_channels``, ``class_names`` and ``target`` to ``super().__init__`` themselves, and
    implement ``load_splits()`` returning ``{"train": Split, "val"?: Split, "test"?: Split}``.
    A missing ``val`` is cut from train with ``val_fraction`` and ``seed``.

    Args:
        root: Data root (default: ``$DATASETS_DIR``, else ``./datasets``).
        batch_size: Images per batch, in every split.
        num_workers: Loader worker processes (0: batches are made in the training process).
        val_fraction: Share of train cut off as val when the data set has no val split.
        seed: Seed of the splits, the shuffling and the augmentation.
        input_size: Side (or ``[height, width]``) the images are resized to.
        augment: Training augmentation (``data.augment.Augment``; default: the data set's, usually none).
        mean: Per-channel mean for normalization (default: the data set's).
        std: Per-channel standard deviation for normalization (default: the data set's).
        resize: ``stretch`` to ``input_size``, or ``center_crop`` (keep the aspect ratio, crop the middle).
        cache_dir: Folder for decoded images (default: the user cache; never inside the data root).
        in_channels: 1 (gray) or 3 (RGB); set by the data set.
        class_names: Class names, in label order (classification); set by the data set.
        target: The regression target ``{"name", "min", "max"}``; set by the data set.
        pin_memory: Pinned host batches (default: on when training on CUDA).
        persistent_workers: Keep loader workers alive between epochs (with ``num_workers`` > 0).
    """

    task: Task = "classification"
    default_mean: tuple[float, ...] = (0.5,)
    default_std: tuple[float, ...] = (0.5,)
    default_augment: Augment = Augment()  # used when ``augment`` is None

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
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root) if root else default_root()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # None: on when training on CUDA
        self.persistent_workers = persistent_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment if augment is not None else replace(self.default_augment)  # a copy of its own
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
        self._engine_state: dict[str, Any] | None = None  # restored before the train set exists

    def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's, with dataclasses (``augment``) stored as plain dicts.

        Checkpoints carry ``datamodule_hyper_parameters`` and are read with
        ``torch.load(weights_only=True)``, which refuses any class of ours.
        """
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, **kwargs)
        if not args:  # all arguments: Lightning sees those given through **kwargs only, so add the defaults
            given = dict(self.hparams)
            self.hparams.clear()
            self.hparams.update({**init_defaults(type(self)), **given})
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
            "augmentation": self.augmentation(),
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

    def augmentation(self) -> dict | None:
        """The resolved augmentation pipeline (``A.to_dict`` form), None when off; recorded in bundles."""
        return self.augment.pipeline(self.preprocess_spec.input_size) if self.augment.enabled else None

    def dataset(self, split: str) -> Dataset:
        """The torch Dataset for ``split`` (train is a ``TrainDataset`` when ``augment`` is on)."""
        if split not in self._datasets:
            if split not in self.splits:
                self.setup()
            if split not in self.splits:
                raise DataError(f"{type(self).__name__} has no {split!r} split (has {sorted(self.splits)})")
            s = self.splits[split]
            y = torch.as_tensor(s.targets, dtype=torch.long if self.task == "classification" else torch.float32)
            spec = self.preprocess_spec
            images = resize_array(s.images, spec)  # (N, h, w, C) uint8
            if split == "train" and self.augment.enabled:
                batched = self.augment.backend == "batched"
                per_sample, units = split_pipeline(self.augment.ops(spec.input_size), spec.input_size, batched)
                compose = A.Compose(per_sample) if per_sample else None
                engine = BatchAugment(spec, units, seed=self.seed)
                if self._engine_state:
                    engine.load_state_dict(self._engine_state)
                self._datasets[split] = TrainDataset(images, y, compose, engine)
            else:
                self._datasets[split] = TensorBatchDataset(normalize_array(images, spec), y)
        return self._datasets[split]

    @property
    def engine(self) -> BatchAugment | None:
        """The batched augmentation engine of the train split (None without augmentation)."""
        ds = self._datasets.get("train")
        return ds.engine if isinstance(ds, TrainDataset) else None

    def _loader(self, split: str, sampler: Any = None) -> DataLoader:
        ds = self.dataset(split)
        workers = worker_count(self.num_workers, ds)
        trainer = self._trainer_or_none()
        pin = self.pin_memory
        if pin is None:  # auto: pinned host batches when training on CUDA
            pin = trainer is not None and getattr(trainer.strategy.root_device, "type", "cpu") == "cuda"
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=passthrough,
            pin_memory=bool(pin),
            persistent_workers=workers > 0 and self.persistent_workers,
            generator=torch.Generator().manual_seed(self.seed),  # iter() draws nothing from the global RNG
        )

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by a ``ResumableSampler`` (mid-epoch resume, one shard per rank)."""
        ds = self.dataset("train")
        trainer = self._trainer_or_none()
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=self.seed)
        if isinstance(ds, TrainDataset):
            ds.defer = trainer is not None  # under a Trainer: the batched part runs after the transfer
            ds.engine.seed = self.seed + 7919 * rank  # each rank its own stream
        if trainer is not None:
            epoch, done = batches_done(trainer, -(-len(sampler) // self.batch_size))
            sampler.set_epoch(epoch)
            sampler.start = done * self.batch_size
        return self._loader("train", sampler)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Run the batched augmentation on deferred uint8 train batches, on the device they now live on."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and batch[0].dtype == torch.uint8:
            return self.dataset("train").engine(tuple(batch))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed: the batched engine's generator (the sampler is a function of the loop counters)."""
        engine = self.engine
        return {"augment_engine": engine.state_dict()} if engine is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("augment_engine"):
            self._engine_state = state_dict["augment_engine"]
            if self.engine is not None:
                self.engine.load_state_dict(self._engine_state)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split (val where the data set has no test split)."""
        self.setup()
        return self._loader("test" if "test" in self.splits else "val")

    def _augment_summary(self) -> str | None:
        if not self.augment.enabled:
            return None
        size = self.preprocess_spec.input_size
        return describe(*split_pipeline(self.augment.ops(size), size, self.augment.backend == "batched"))

    def __repr__(self) -> str:
        sizes = {k: len(v.targets) for k, v in self.splits.items()}
        return (
            f"{type(self).__name__}(task={self.task}, num_outputs={self.num_outputs}, in_channels={self.in_channels}, "
            f"input_size={self.preprocess_spec.input_size}, splits={sizes or 'not set up'}, "
            f"augment={self._augment_summary()})"
        )


__all__ = [
    "Augment",
    "BadImagePolicy",
    "BatchAugment",
    "DataError",
    "ImageDataModule",
    "MissingDataError",
    "Split",
    "TensorBatchDataset",
    "TrainDataset",
    "default_root",
    "eval_transform",
    "normalize_array",
    "resize_array",
    "seeded_split",
    "train_transform",
    "warn_once",
]
