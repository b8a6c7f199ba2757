"""Data modules: digits, IDX parsing (MNIST layout), folder/CSV/UTKFace on generated files, caching, augmentation.

.venv/bin/pytest tests/test_data.py            # offline, seconds
DATASETS_DIR=/work/shared/datasets .venv/bin/pytest tests/test_data.py -m datasets
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import data.cache
from data.base import Augment, DataError, MissingDataError, train_transform
from data.digits import DigitsDataModule
from data.folder import CSVDataModule, ImageFolderDataModule
from data.mnist import FashionMNISTDataModule, MNISTDataModule, read_idx
from data.preprocess import PreprocessSpec, eval_transform
from data.utkface import UTKFaceDataModule, index_folder, link_split, parse_name

REPO = Path(__file__).resolve().parents[1]


# ---------- package import ----------
def test_data_package_is_light_and_lazy() -> None:
    code = "import sys, data; assert not {'lightning', 'torch'} & set(sys.modules), 'data/__init__ imports too much'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    from data import CSVDataModule as C
    from data import DigitsDataModule as D

    assert D is DigitsDataModule and C is CSVDataModule


# ---------- digits ----------
def test_digits_metadata_shapes_and_split() -> None:
    dm = DigitsDataModule(batch_size=32)
    assert (dm.task, dm.num_outputs, dm.num_classes, dm.in_channels) == ("classification", 10, 10, 1)
    assert dm.class_names == [str(i) for i in range(10)] and dm.target is None
    info = dm.bundle_info()
    assert info["preprocess"]["input_size"] == [28, 28] and info["task"] == "classification"
    dm.setup("fit")
    sizes = {k: len(v.targets) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == pytest.approx(0.2 * 1797, abs=1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.min() >= 0 and y.max() <= 9
    assert abs(float(dm.dataset("train").x.mean())) < 0.3  # normalized, not raw 0..255
    xt, _ = next(iter(dm.predict_dataloader()))
    assert xt.shape[1:] == (1, 28, 28)
    # the same seed gives the same split; another seed another one
    again = DigitsDataModule(batch_size=32)
    again.setup()
    assert np.array_equal(again.splits["test"].images, dm.splits["test"].images)
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not np.array_equal(other.splits["test"].images, dm.splits["test"].images)
    assert dm.hparams["batch_size"] == 32  # the data config is recorded


def test_hparams_record_every_argument_given_or_not() -> None:
    """Arguments that reach the base through ``**kwargs`` are recorded with their defaults too; metadata is not."""
    utk = UTKFaceDataModule(seed=3, age_max=90)
    assert utk.hparams["seed"] == 3 and utk.hparams["age_max"] == 90 and utk.hparams["input_size"] == 64
    assert utk.hparams["num_workers"] == 0 and utk.hparams["on_bad_image"] == "skip"  # the bases' arguments
    assert not {"in_channels", "class_names", "target", "faces"} & set(utk.hparams)  # set by the data set itself
    assert DigitsDataModule().hparams["batch_size"] == 64  # the subclass's own default


def test_prenormalized_tensor_equals_eval_transform() -> None:
    dm = DigitsDataModule(input_size=32)
    dm.setup()
    ds = dm.dataset("val")
    tf = eval_transform(dm.preprocess_spec)
    for i in (0, 7, len(ds) - 1):
        ref = tf(image=dm.splits["val"].images[i])["image"]
        assert ref.shape == ds.x[i].shape == (1, 32, 32)
        torch.testing.assert_close(ds.x[i], ref, atol=1e-6, rtol=0)


def test_normalize_array_is_eval_transform_to_the_bit_across_chunks() -> None:
    from data.datasets import normalize_array

    spec = PreprocessSpec(input_size=(64, 64), channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = np.random.default_rng(0).integers(0, 256, (800, 64, 64, 3), dtype=np.uint8)  # 3 chunks of 341
    x = normalize_array(images, spec)
    tf = eval_transform(spec)
    assert x.shape == (800, 3, 64, 64) and x.dtype == torch.float32
    for i in (0, 340, 341, 682, 799):  # first and last image of each chunk
        assert torch.equal(x[i], tf(image=images[i])["image"])


# ---------- augmentation ----------
AUG = Augment(hflip=0.5, shift=0.1, scale=0.1, rotate=15, affine_p=1.0, brightness_contrast=0.2, coarse_dropout=0.5,
              random_crop_padding=2)  # fmt: skip


@pytest.mark.parametrize("channels", [1, 3])
def test_albumentations_pipeline_keeps_channel_axis(channels: int) -> None:
    spec = PreprocessSpec(input_size=(24, 20), channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    img = np.random.default_rng(0).integers(0, 256, (30, 33, channels), dtype=np.uint8)
    out = train_transform(spec, AUG)(image=img)["image"]
    assert out.shape == (channels, 24, 20) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", ["batched", "albumentations"])
@pytest.mark.parametrize("channels", [1, 3])
def test_augmented_loader_shapes(tmp_path: Path, backend: str, channels: int) -> None:
    root = make_folder(tmp_path / "imgs", n_per_class=6, mode="L" if channels == 1 else "RGB")
    aug = Augment(**{**AUG.__dict__, "backend": backend})
    dm = ImageFolderDataModule(str(root), channels=channels, input_size=16, batch_size=8, augment=aug,
                               cache_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.0)  # fmt: skip
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, channels, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.isfinite(x).all()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    x2, _ = next(iter(loader))
    assert not torch.equal(x, x2)  # another epoch: other samples, other draws
    xv, _ = next(iter(dm.val_dataloader()))  # eval is never augmented
    assert xv.shape[1:] == (channels, 16, 16)


def test_batched_identity_augment_is_exact() -> None:
    """hflip twice-free check: with only flips, the batched path equals a flip of the eval tensor."""
    with pytest.warns(UserWarning, match="mirrored"):
        dm = DigitsDataModule(augment=Augment(hflip=1.0))
    dm.setup()
    x, y = dm.dataset("train").__getitems__([0, 1, 2])
    ref = DigitsDataModule()
    ref.setup()
    xr, yr = ref.dataset("train").__getitems__([0, 1, 2])
    torch.testing.assert_close(x, xr.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(y, yr)


# ---------- IDX (MNIST layout) ----------
def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def make_mnist(root: Path, folder: str, compress: bool, n_train: int = 50, n_test: int = 20) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, compress)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_idx_parsing_read_only_root(tmp_path: Path, compress: bool) -> None:
    root = tmp_path / "datasets"
    truth = make_mnist(root, "MNIST", compress)
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = sorted(str(p) for p in root.rglob("*"))
    try:
        dm = MNISTDataModule(root=str(root), batch_size=16, val_fraction=0.2)
        dm.setup()
        assert {k: len(v.targets) for k, v in dm.splits.items()} == {"train": 40, "val": 10, "test": 20}
        assert np.array_equal(dm.splits["test"].images[..., 0], truth["t10k"][0])
        assert np.array_equal(dm.splits["test"].targets, truth["t10k"][1])
        x, y = next(iter(dm.test_dataloader()))
        assert x.shape == (16, 1, 28, 28) and y.dtype == torch.long
        assert sorted(str(p) for p in root.rglob("*")) == before  # nothing written into the root
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")  # says 5, holds 2
    with pytest.raises(DataError, match="x-idx1-ubyte"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)


def test_missing_mnist_files_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as e:
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_fashion_class_names() -> None:
    dm = FashionMNISTDataModule()
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot" and dm.num_outputs == 10


# ---------- folders and CSVs ----------
def make_folder(root: Path, n_per_class: int = 4, mode: str = "RGB", classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            shape = (20 + i, 18) if mode == "L" else (20 + i, 18, 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8) // 2 + 100 * ci
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(arr.astype(np.uint8), mode).save(root / cls / f"{i}.{ext}")
    return root


def test_only_raster_formats_are_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPS never reaches Pillow's EPS plugin (which runs Ghostscript); the usual formats, MPO JPEGs included, open."""
    from PIL import EpsImagePlugin

    from data.imagefile import ImageError, load_image

    def never(*args, **kwargs):
        raise AssertionError("Pillow's EPS plugin was asked to read the upload")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    with pytest.raises(ImageError, match="not a recognized image file .accepted: JPEG, PNG"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", channels=3)

    img = Image.new("RGB", (12, 8), (200, 30, 60))
    for fmt, kwargs in [
        ("JPEG", {}), ("MPO", {"save_all": True, "append_images": [img]}), ("PNG", {}), ("WEBP", {}), ("GIF", {}),
        ("BMP", {}), ("TIFF", {}), ("PPM", {}), ("TGA", {}), ("ICO", {}), ("PCX", {}),
    ]:  # fmt: skip
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        assert load_image(buf.getvalue(), channels=3).shape == (8, 12, 3), fmt


def test_decoding_a_file_with_corrupt_exif_warns_nothing() -> None:
    """The pixels decode; Pillow's bare "Corrupt EXIF data" warning is not passed on."""
    from data.imagefile import load_image

    buf = io.BytesIO()
    Image.new("RGB", (10, 6), (10, 200, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff"  # one IFD claiming 65535 entries, then nothing
    broken = jpeg[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + jpeg[2:]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert load_image(broken, channels=3).shape == (6, 10, 3)
    assert not seen, [str(w.message) for w in seen]


def test_image_folder_classes_split_cache_and_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "imgs", n_per_class=10)
    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(root / "dog" / "gray.png")  # grayscale into RGB set
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cache = tmp_path / "cache"
    kw = dict(channels=3, input_size=12, batch_size=4, cache_dir=str(cache), val_fraction=0.2, test_fraction=0.2)
    dm = ImageFolderDataModule(str(root), **kw)
    assert dm.class_names == ["cat", "dog"] and dm.num_outputs == 2 and dm.in_channels == 3
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dm.setup()
    msgs = [str(x.message) for x in w if "unreadable" in str(x.message)]
    assert len(msgs) == 1 and "broken.jpg" in msgs[0] and "(1)" in msgs[0]
    assert sum(len(s.targets) for s in dm.splits.values()) == 21  # 22 files, one broken
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 12, 12) and y.dtype == torch.long
    assert list(cache.glob("*.npy")) and not list(root.rglob("*.npy"))  # cache outside the data root

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data.cache, "decode", no_decode)
    again = ImageFolderDataModule(str(root), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.setup()  # a cache hit: no decoding
    assert np.array_equal(again.splits["train"].images, dm.splits["train"].images)
    monkeypatch.undo()

    with pytest.raises(DataError, match="broken.jpg"):
        ImageFolderDataModule(str(root), on_bad_image="error", **kw).setup()
    with pytest.raises(DataError, match="inside the data root"):
        ImageFolderDataModule(str(root), **{**kw, "cache_dir": str(root / ".cache")}).setup()


def test_image_folder_separate_val_dir_grayscale(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", n_per_class=5, mode="L")
    val = make_folder(tmp_path / "val", n_per_class=2, mode="RGB")  # RGB files, read as gray
    dm = ImageFolderDataModule(str(train), val_dir=str(val), channels=1, input_size=10, batch_size=3,
                               cache_dir=str(tmp_path / "c"), test_fraction=0.0)  # fmt: skip
    dm.setup()
    assert len(dm.splits["train"].targets) == 10 and len(dm.splits["val"].targets) == 4
    assert "test" not in dm.splits
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 1, 10, 10)
    with pytest.raises(MissingDataError, match="nope"):
        ImageFolderDataModule(str(tmp_path / "nope"))


def test_csv_classification_and_regression(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    root = make_folder(ds / "imgs", n_per_class=6)
    files = sorted(root.rglob("*.*"))
    rel = [str(p.relative_to(ds)) for p in files]
    split = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    pd.DataFrame(
        {"path": rel, "label": [p.parent.name for p in files], "age": np.arange(12) * 3.0, "split": split}
    ).to_csv(ds / "labels.csv", index=False)
    csv = str(ds / "labels.csv")
    cls = CSVDataModule(csv, input_size=8, batch_size=4, cache_dir=str(tmp_path / "c"))
    assert cls.task == "classification" and cls.class_names == ["cat", "dog"]
    cls.setup()
    assert {k: len(v.targets) for k, v in cls.splits.items()} == {"train": 8, "val": 2, "test": 2}
    x, y = next(iter(cls.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.long
    reg = CSVDataModule(csv, target_column="age", input_size=8, batch_size=4, channels=1,
                        cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert reg.task == "regression" and reg.num_outputs == 1 and reg.class_names is None
    assert reg.target == {"name": "age", "min": 0.0, "max": 33.0}
    reg.setup()
    x, y = next(iter(reg.test_dataloader()))
    assert x.shape == (2, 1, 8, 8) and y.dtype == torch.float32 and y.shape == (2,)
    assert set(y.tolist()) <= {float(a) for a in np.arange(12) * 3.0}
    with pytest.raises(DataError, match="no column 'nope'"):
        CSVDataModule(csv, label_column="nope")
    with pytest.raises(MissingDataError, match="missing.csv"):
        CSVDataModule(str(tmp_path / "missing.csv"))


# ---------- UTKFace ----------
ODD_NAMES = [
    "24_0_1_20170116220224657 .jpg.chip.jpg",  # space
    "55_0_0_20170116232725357jpg.chip.jpg",  # missing dot
    "39_1_20170116174525125.jpg.chip.jpg",  # race missing
]


def test_utkface_name_parsing() -> None:
    assert parse_name(ODD_NAMES[0]) == {"age": 24, "gender": 0, "race": 1}
    assert parse_name(ODD_NAMES[1]) == {"age": 55, "gender": 0, "race": 0}
    assert parse_name(ODD_NAMES[2]) == {"age": 39, "gender": 1, "race": None}
    for junk in ("face.jpg", "x_1_2_3.jpg.chip.jpg", "12.jpg", "_1_2.jpg"):
        assert parse_name(junk) is None


def test_utkface_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ds" / "UTKFace"
    folder.mkdir(parents=True)
    names = [*ODD_NAMES, *(f"{a}_{a % 2}_{a % 5}_2017011{a:03d}.jpg.chip.jpg" for a in range(1, 40, 2))]
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / n, format="JPEG")
    for junk in ("face.jpg", "x_1_2_3.jpg.chip.jpg"):
        (folder / junk).write_bytes(b"junk")
    (folder / "README.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        index = index_folder(folder)
    skipped = [str(x.message) for x in w]
    assert len(skipped) == 1 and "(2)" in skipped[0] and "face.jpg" in skipped[0]
    assert len(index) == len(names) and str(index["race"].dtype) == "Int64"
    assert index.set_index("name").loc[ODD_NAMES[2], "race"] is pd.NA

    dm = UTKFaceDataModule(root=str(tmp_path / "ds"), input_size=16, batch_size=4, cache_dir=str(tmp_path / "c"),
                           val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    assert (dm.task, dm.num_outputs, dm.in_channels) == ("regression", 1, 3)
    assert dm.target == {"name": "age", "min": 0.0, "max": 116.0} and dm.augment.hflip > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    assert sum(len(s.targets) for s in dm.splits.values()) == len(names)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.float32 and y.shape == (4,)
    # the split depends on the name only
    dm2 = UTKFaceDataModule(root=str(tmp_path / "ds"), input_size=16, cache_dir=str(tmp_path / "c"), seed=7,
                            val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm2.setup()
    assert np.array_equal(dm2.splits["test"].targets, dm.splits["test"].targets)
    with pytest.raises(MissingDataError, match="UTKFace"):
        UTKFaceDataModule(root=str(tmp_path / "empty")).setup()
    # the test split as a folder of links + labels.csv (for serving.batch --truth): same files as dm's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = link_split(tmp_path / "ds", tmp_path / "test_split", "test", val_fraction=0.2, test_fraction=0.2)
    labels = pd.read_csv(tmp_path / "test_split" / "labels.csv")
    assert n == len(labels) == len(dm.splits["test"].targets)
    assert sorted(labels["age"]) == sorted(dm.splits["test"].targets.astype(int).tolist())
    assert all((tmp_path / "test_split" / name).is_symlink() for name in labels["name"])
    with pytest.raises(FileExistsError, match="not empty"):
        link_split(tmp_path / "ds", tmp_path / "test_split", "test")


# ---------- LightningCLI-style config ----------
def test_yaml_config_instantiates(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data:\n  class_path: data.DigitsDataModule\n  init_args:\n    batch_size: 16\n    input_size: 32\n"
        "    augment: {shift: 0.1, rotate: 10}\n"
    )
    parser = ArgumentParser()
    parser.add_argument("-c", action="config")
    parser.add_subclass_arguments(LightningDataModule, "data")
    dm = parser.instantiate(parser.parse_args(["-c", str(cfg)])).data
    assert isinstance(dm, DigitsDataModule) and dm.augment.shift == 0.1 and dm.preprocess_spec.input_size == (32, 32)


# ---------- the real data sets ----------
@pytest.mark.datasets
@pytest.mark.parametrize(
    "cls, train_counts",
    [
        (MNISTDataModule, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
        (FashionMNISTDataModule, [6000] * 10),
    ],
)
def test_real_mnist_sets(cls, train_counts: list[int]) -> None:
    dm = cls(val_fraction=0.1)
    dm.setup()
    train_labels = np.concatenate([dm.splits["train"].targets, dm.splits["val"].targets])
    assert len(train_labels) == 60000 and len(dm.splits["test"].targets) == 10000
    assert np.bincount(train_labels).tolist() == train_counts
    assert dm.splits["test"].images.shape == (10000, 28, 28, 1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and y.dtype == torch.long


def test_trainer_gets_float_batches_with_deferred_augmentation(tmp_path: Path) -> None:
    """Under a Trainer, batched augmentation runs after the device transfer; training_step sees floats."""
    from lightning.pytorch import LightningModule, Trainer

    class Probe(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
            self.seen: list[torch.dtype] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(x.dtype)
            assert x.shape[1:] == (1, 28, 28) and y.dtype == torch.long
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            assert batch[0].dtype == torch.float32

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = DigitsDataModule(batch_size=16, augment=Augment(shift=0.1, rotate=10))
    model = Probe()
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, limit_train_batches=3,
                      limit_val_batches=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.seen == [torch.float32] * 3
    assert dm.dataset("train").defer  # augmentation ran in on_after_batch_transfer
    # the data config lands in checkpoints as plain types (read with weights_only=True)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["augment"]["shift"] == 0.1


@pytest.mark.datasets
def test_real_utkface_index() -> None:
    root = Path(os.environ["DATASETS_DIR"]) / "UTKFace"
    index = index_folder(root)  # the odd names of the real set all parse
    assert len(index) == 19362 and index["age"].between(1, 116).all()
    assert index["race"].isna().sum() == 3 and index["gender"].isna().sum() == 0
    split = UTKFaceDataModule(root=os.environ["DATASETS_DIR"]).file_table()["split"].value_counts()
    assert split["train"] > 0.75 * len(index) and split["test"] > 0.08 * len(index)


@pytest.mark.slow
@pytest.mark.datasets
def test_real_utkface_decode(tmp_path: Path) -> None:
    dm = UTKFaceDataModule(input_size=32, cache_dir=str(tmp_path))  # ~1 min: decodes 19,362 JPEGs
    dm.setup()
    assert sum(len(s.targets) for s in dm.splits.values()) == 19362
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (128, 3, 32, 32) and y.dtype == torch.float32
