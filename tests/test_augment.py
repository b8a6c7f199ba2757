"""The batched augmentation engine against albumentations, op by op, and the pipeline split.

PYTHONPATH=. .venv/bin/pytest tests/test_augment.py

Each batched op gets the same parameters as albumentations (p=1 with degenerate ranges, or the
very parameters passed to albumentations' ``apply``) and must give the same pixels within
rounding (albumentations works on uint8, the engine in float).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from data.augment import Augment, BatchAugment, split_pipeline
from data.preprocess import PreprocessSpec

H, W = 20, 24


def _images(c: int, b: int = 4) -> np.ndarray:
    """Smooth random uint8 images ``(B, H, W, C)`` (interpolation differences stay at rounding level)."""
    rng = np.random.default_rng(c)
    small = rng.integers(0, 256, (b, H // 4, W // 4, c)).astype(np.float32)
    big = np.stack([cv2.resize(im, (W, H), interpolation=cv2.INTER_LINEAR).reshape(H, W, c) for im in small])
    return np.clip(big, 0, 255).astype(np.uint8)


def _engine(units: list, c: int) -> BatchAugment:
    spec = PreprocessSpec(input_size=(H, W), channels=c, mean=(0.0,) * c, std=(1.0,) * c)
    return BatchAugment(spec, units, seed=0)  # mean 0, std 1: the output is the image in [0, 1]


def _engine_out(engine: BatchAugment, imgs: np.ndarray, params: list | None = None) -> np.ndarray:
    x8 = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    if params is None:
        params = engine.sample(len(imgs), H, W, x8.device)
    out = engine.apply(x8, params)
    return (out.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.float64)  # (B, H, W, C) in 0..255


def _close(ours: np.ndarray, ref: np.ndarray, tol: float = 1.0, border: int = 0) -> None:
    ref = np.asarray(ref, dtype=np.float64).reshape(ours.shape)
    if border:
        ours, ref = ours[:, border:-border, border:-border], ref[:, border:-border, border:-border]
    diff = np.abs(ours - ref)
    assert diff.max() <= tol, f"max diff {diff.max():.2f} (mean {diff.mean():.3f})"


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("op_cls", [A.HorizontalFlip, A.VerticalFlip])
def test_flips_match_albumentations(op_cls: type, c: int) -> None:
    imgs = _images(c)
    op = op_cls(p=1.0)
    _close(_engine_out(_engine([[op]], c), imgs), np.stack([op(image=im)["image"] for im in imgs]), tol=1e-3)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"rotate": (17.0, 17.0)},
        {"scale": (1.2, 1.2)},
        {"scale": {"x": (0.85, 0.85), "y": (1.1, 1.1)}},
        {"translate_percent": (0.1, 0.1)},
        {"translate_px": {"x": (-3, -3), "y": (2, 2)}},
        {"rotate": (-25.0, -25.0), "scale": (0.9, 0.9), "translate_percent": (-0.15, -0.15)},
    ],
)
def test_affine_matches_albumentations(kwargs: dict, c: int) -> None:
    imgs = _images(c)
    op = A.Affine(**kwargs, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
    ref = np.stack([op(image=im)["image"] for im in imgs])
    # cv2 interpolates uint8 in 1/32 pixel steps and rounds: a few levels at most, on sharp edges
    _close(_engine_out(_engine([[op]], c), imgs), ref, tol=3.0)


@pytest.mark.parametrize("c", [1, 3])
def test_pad_and_random_crop_match_albumentations(c: int) -> None:
    imgs = _images(c)
    pad = A.PadIfNeeded(min_height=H + 6, min_width=W + 4, border_mode=cv2.BORDER_CONSTANT, fill=0)
    crop = A.RandomCrop(height=H, width=W)
    engine = _engine([[pad, crop]], c)
    offsets = [(0, 0), (6, 4), (2, 1), (5, 3)]  # (y1, x1) of the crop in the padded image
    refs = []
    for im, (y1, x1) in zip(imgs, offsets, strict=True):
        padded = pad(image=im)["image"]
        refs.append(crop.apply(padded, crop_coords=(x1, y1, x1 + W, y1 + H)))
    dy = torch.tensor([float(y - 3) for y, _ in offsets])  # top padding (26 - 20) // 2 = 3
    dx = torch.tensor([float(x - 2) for _, x in offsets])  # left padding (28 - 24) // 2 = 2
    _close(_engine_out(engine, imgs, [{"dx": dx, "dy": dy}]), np.stack(refs), tol=1e-3)
    # and the draws cover albumentations' range of offsets, inclusive
    draws = engine.sample(4000, H, W, torch.device("cpu"))[0]
    assert set(draws["dy"].tolist()) == {float(v) for v in range(-3, 4)}
    assert set(draws["dx"].tolist()) == {float(v) for v in range(-2, 3)}


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("limits", [((0.1, 0.1), (0.25, 0.25)), ((-0.2, -0.2), (-0.3, -0.3)), ((0.3, 0.3), (0, 0))])
def test_brightness_contrast_matches_albumentations(limits: tuple, c: int) -> None:
    imgs = _images(c)
    op = A.RandomBrightnessContrast(brightness_limit=limits[0], contrast_limit=limits[1], p=1.0)
    ref = np.stack([op(image=im)["image"] for im in imgs])
    _close(_engine_out(_engine([[op]], c), imgs), ref, tol=1.0)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("fill", [0, 128])
def test_coarse_dropout_matches_albumentations(fill: int, c: int) -> None:
    imgs = _images(c)
    op = A.CoarseDropout(
        num_holes_range=(1, 2), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.25), fill=fill, p=1.0
    )
    holes = np.array([[[3, 2, 9, 7], [0, 0, 0, 0]], [[10, 5, 14, 10], [1, 12, 5, 20]],
                      [[0, 0, 24, 2], [20, 15, 24, 20]], [[5, 5, 6, 6], [0, 0, 0, 0]]])  # fmt: skip
    active = np.array([[True, False], [True, True], [True, True], [True, False]])
    refs = [op.apply(im, holes=h[a], seed=0) for im, h, a in zip(imgs, holes, active, strict=True)]
    params = {"on": torch.ones(4, dtype=torch.bool), "holes": torch.from_numpy(holes).float(),
              "active": torch.from_numpy(active)}  # fmt: skip
    _close(_engine_out(_engine([[op]], c), imgs, [params]), np.stack(refs), tol=1e-3)
    # drawn holes follow albumentations' rules: 1..2 holes of floor(side * fraction) pixels
    d = _engine([[op]], c).sample(2000, H, W, torch.device("cpu"))[0]
    hole = d["holes"][d["active"]]
    heights, widths = (hole[:, 3] - hole[:, 1]).unique().tolist(), (hole[:, 2] - hole[:, 0]).unique().tolist()
    assert set(heights) == {2.0, 3.0, 4.0, 5.0} and set(widths) == {2.0, 3.0, 4.0, 5.0}
    assert float(hole[:, 2].max()) <= W and float(hole[:, 3].max()) <= H and float(hole.min()) >= 0
    assert set(d["active"].sum(1).tolist()) == {1, 2}


def test_chained_geometry_matches_albumentations_in_order() -> None:
    """Pad + crop, a flip and an Affine become one warp; inside the frame it equals albumentations' three steps."""
    imgs = _images(1)
    pad = A.PadIfNeeded(min_height=H + 4, min_width=W + 4, border_mode=cv2.BORDER_CONSTANT, fill=0)
    crop, flip = A.RandomCrop(height=H, width=W), A.HorizontalFlip(p=1.0)
    affine = A.Affine(rotate=(12.0, 12.0), scale=(1.1, 1.1), translate_px=(1, 1), border_mode=cv2.BORDER_CONSTANT, p=1)
    cropped = [crop.apply(pad(image=im)["image"], crop_coords=(3, 1, 3 + W, 1 + H)) for im in imgs]
    refs = [affine(image=flip(image=im)["image"])["image"] for im in cropped]
    engine = _engine([[pad, crop], [flip], [affine]], 1)
    params = engine.sample(len(imgs), H, W, torch.device("cpu"))
    params[0] = {"dx": torch.full((4,), 1.0), "dy": torch.full((4,), -1.0)}  # crop at (3, 1) of the padded image
    # one warp samples what the separate steps first cut off: compare away from the frame's edge
    _close(_engine_out(engine, imgs, params), np.stack(refs), tol=3.0, border=4)


def test_probability_and_identity_when_off() -> None:
    imgs = _images(1, b=64)
    op = A.HorizontalFlip(p=0.3)
    engine = _engine([[op]], 1)
    x8 = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    params = engine.sample(64, H, W, x8.device)
    out = _engine_out(engine, imgs, params)
    on = params[0]["on"].numpy()
    assert 0 < on.sum() < 64
    _close(out[~on], imgs[~on].astype(np.float64), tol=1e-3)
    _close(out[on], imgs[on][:, :, ::-1].astype(np.float64), tol=1e-3)


def test_generator_state_round_trip() -> None:
    """The engine's stream is its own and its state restores it exactly (what checkpoints carry)."""
    engine = _engine([[A.Affine(rotate=(-20, 20), p=0.5)], [A.CoarseDropout(p=0.5)]], 1)
    imgs = torch.from_numpy(_images(1)).permute(0, 3, 1, 2).contiguous()
    engine((imgs, torch.zeros(4)))
    state = engine.state_dict()
    a, _ = engine((imgs, torch.zeros(4)))
    torch.manual_seed(123)  # the global RNG plays no part
    fresh = _engine(engine.units, 1)
    fresh.load_state_dict(state)
    b, _ = fresh((imgs, torch.zeros(4)))
    assert torch.equal(a, b)


def test_split_runs_the_batchable_tail_batched() -> None:
    size = (H, W)
    noise = {"__class_fullname__": "GaussNoise", "std_range": [0.05, 0.1], "p": 1.0}
    knobs = Augment(hflip=0.5, random_crop_padding=2, coarse_dropout=0.5, transform=[noise])
    per_sample, units = split_pipeline(knobs.ops(size), size)
    assert [type(o).__name__ for o in per_sample] == [
        "PadIfNeeded", "RandomCrop", "HorizontalFlip", "CoarseDropout", "GaussNoise"]  # fmt: skip
    assert units == []
    first = Augment(transform={"__class_fullname__": "Compose", "p": 1.0, "transforms": [noise, {"__class_fullname__":
                    "HorizontalFlip", "p": 0.5}]}, rotate=10, affine_p=1.0)  # fmt: skip
    per_sample, units = split_pipeline(first.ops(size), size)
    assert [type(o).__name__ for o in per_sample] == ["Affine", "GaussNoise"]
    assert [[type(o).__name__ for o in u] for u in units] == [["HorizontalFlip"]]
    per_sample, units = split_pipeline(first.ops(size), size, batched=False)
    assert len(per_sample) == 3 and units == []
    # not batchable: shear, a reflecting border
    assert split_pipeline([A.Affine(shear=10, p=1)], size)[1] == []
    assert split_pipeline([A.Affine(rotate=5, border_mode=cv2.BORDER_REFLECT_101, p=1)], size)[1] == []


def test_pipeline_is_albumentations_serialized_form() -> None:
    aug = Augment(hflip=0.5, shift=0.1, transform={"__class_fullname__": "GaussNoise", "p": 0.2})
    d = aug.pipeline((28, 28))
    assert d["transform"]["__class_fullname__"] == "Compose"
    names = [t["__class_fullname__"] for t in d["transform"]["transforms"]]
    assert names == ["HorizontalFlip", "Affine", "GaussNoise"]
    again = A.from_dict(d)  # albumentations reads it back as the same pipeline
    assert A.to_dict(again) == d
    assert Augment(transform=d).ops((28, 28))[0].p == 0.5  # a whole A.to_dict output is accepted too
    with pytest.raises(ValueError, match="unknown albumentations transform 'NoSuchOp'"):
        Augment(transform={"__class_fullname__": "NoSuchOp", "p": 1.0})
    with pytest.raises(ValueError, match="PadIfNeeded: give its probability p"):  # from_dict would use 0.5
        Augment(transform={"__class_fullname__": "PadIfNeeded", "min_height": 32, "min_width": 32})
    with pytest.raises(ValueError, match="GaussNoise.*not valid"):
        Augment(transform={"__class_fullname__": "GaussNoise", "sigma": 3, "p": 1.0})
    with pytest.raises(ValueError, match="serialized form"):
        Augment(transform=["HorizontalFlip"])
