"""Training augmentation: defined by albumentations, executed per batch in torch where possible.

A config names the pipeline in albumentations' own serialized form (``A.to_dict`` / ``A.from_dict``)
and/or with short knobs that expand into the same form::

    augment:
      hflip: 0.5                    # sugar for {__class_fullname__: HorizontalFlip, p: 0.5}
      transform:                    # any albumentations transform(s), as A.to_dict writes them
        - {__class_fullname__: GaussNoise, std_range: [0.05, 0.1], p: 0.5}

``Augment.pipeline(input_size)`` is the resolved pipeline (knobs first, then ``transform``), an
``A.to_dict`` dict stored in the run's checkpoint and bundle. It runs in two parts:

- the longest tail of ops that ``BatchAugment`` supports runs on whole uint8 batches in torch
  (one ``grid_sample`` for the geometry, a few tensor ops for the rest), on the training device
  after the transfer, with its own ``torch.Generator`` (saved in checkpoints);
- everything before that tail runs per sample in albumentations itself (``per_sample``), in the
  loader workers, seeded per sample from (seed, epoch, rank, position) so it is exact on resume.

Supported by the batched engine, with albumentations' parameter semantics (tests/test_augment.py
compares each with albumentations): HorizontalFlip, VerticalFlip, Affine (no shear, constant border
0, linear), PadIfNeeded (centre, constant 0) + RandomCrop back to the input size,
RandomBrightnessContrast (brightness_by_max), CoarseDropout (numeric fill).

    python -c "from data.augment import Augment; print(Augment(hflip=0.5).pipeline((28, 28)))"
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import albumentations as A
import cv2
import torch
import torch.nn.functional as F

from data.preprocess import PreprocessSpec

Serialized = dict[str, Any]


@dataclass
class Augment:
    """Training augmentation, all off by default; set from YAML as ``augment: {hflip: 0.5}``.

    Knobs (sugar for albumentations transforms, applied in this order):
    random_crop_padding: PadIfNeeded by this many pixels (constant 0) + RandomCrop back (the CIFAR recipe).
    hflip: HorizontalFlip probability (keep 0 for digits: a flipped 2 is no digit).
    shift / scale / rotate: Affine ranges (fraction of size / fraction / degrees), with probability
    ``affine_p`` when any of them is non-zero.
    brightness_contrast: RandomBrightnessContrast limit (p=0.5).
    coarse_dropout: CoarseDropout probability (one hole of 10-25% of the side, fill 0).
    transform: any albumentations transform(s) in ``A.to_dict`` form (a dict with
    ``__class_fullname__``, a whole ``A.to_dict`` output, or a list of dicts), applied after the knobs.
    backend: "batched" (default) runs supported ops on whole batches on the training device;
    "albumentations" runs the whole pipeline per sample in the loader workers.
    """

    hflip: float = 0.0
    shift: float = 0.0
    scale: float = 0.0
    rotate: float = 0.0
    affine_p: float = 0.5
    brightness_contrast: float = 0.0
    coarse_dropout: float = 0.0
    random_crop_padding: int = 0
    transform: dict[str, Any] | list[dict[str, Any]] | None = None
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
        self.transform_ops()  # a bad transform fails at configuration time, naming it

    @property
    def has_affine(self) -> bool:
        return bool(self.shift or self.scale or self.rotate) and self.affine_p > 0

    @property
    def enabled(self) -> bool:
        others = self.hflip or self.brightness_contrast or self.coarse_dropout or self.random_crop_padding
        return bool(self.has_affine or others or self.transform_ops())

    def knob_ops(self, input_size: tuple[int, int]) -> list[A.BasicTransform]:
        """The knobs as albumentations transforms (applied after the resize, before Normalize)."""
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

    def transform_ops(self) -> list[A.BasicTransform]:
        """``transform`` deserialized with ``A.from_dict`` (a top-level Compose is flattened)."""
        return from_serialized(self.transform)

    def ops(self, input_size: tuple[int, int]) -> list[A.BasicTransform]:
        """Every augmentation op in order: knobs, then ``transform``."""
        return [*self.knob_ops(input_size), *self.transform_ops()]

    def pipeline(self, input_size: tuple[int, int]) -> Serialized:
        """The resolved pipeline in albumentations' serialized form (``A.to_dict`` of a Compose)."""
        return A.to_dict(A.Compose(self.ops(input_size)))


def _check_p(item: dict) -> None:
    """Every transform states its ``p``: ``A.from_dict`` would silently use 0.5, not the class's default."""
    if "p" not in item:
        raise ValueError(f"augment.transform: {item.get('__class_fullname__')}: give its probability p explicitly")
    for child in item.get("transforms") or []:
        if isinstance(child, dict):
            _check_p(child)


def from_serialized(spec: Any) -> list[A.BasicTransform]:
    """Albumentations transforms from their ``A.to_dict`` form; ``ValueError`` naming what is wrong."""
    if spec is None:
        return []
    if isinstance(spec, dict) and "__class_fullname__" not in spec and "transform" in spec:
        spec = spec["transform"]  # a whole A.to_dict output
    items = spec if isinstance(spec, list) else [spec]
    ops: list[A.BasicTransform] = []
    for item in items:
        if not isinstance(item, dict) or "__class_fullname__" not in item:
            raise ValueError(f"augment.transform: expected albumentations' serialized form, got {item!r}")
        _check_p(item)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                op = A.from_dict({"transform": dict(item)})
            except KeyError as e:
                raise ValueError(f"augment.transform: unknown albumentations transform {e}") from None
            except (TypeError, ValueError) as e:
                raise ValueError(f"augment.transform: {item['__class_fullname__']}: {e}") from None
        bad = [str(w.message) for w in caught if "not valid" in str(w.message)]
        if bad:
            raise ValueError(f"augment.transform: {item['__class_fullname__']}: {bad[0]}")
        if isinstance(op, A.Compose) and op.p == 1.0:
            ops += list(op.transforms)
        else:
            ops.append(op)
    return ops


# ---------------------------------------------------------------- the batched engine


def _fill_zero(fill: Any) -> bool:
    vals = fill if isinstance(fill, (tuple, list)) else [fill]
    return all(isinstance(v, (int, float)) and float(v) == 0.0 for v in vals)


def _pad_crop_ok(pad: Any, crop: Any, size: tuple[int, int]) -> bool:
    return (
        isinstance(pad, A.PadIfNeeded)
        and isinstance(crop, A.RandomCrop)
        and pad.p == 1.0
        and crop.p == 1.0
        and pad.pad_height_divisor is None
        and pad.pad_width_divisor is None
        and pad.position == "center"
        and pad.border_mode == cv2.BORDER_CONSTANT
        and _fill_zero(pad.fill)
        and (crop.height, crop.width) == tuple(size)
        and (pad.min_height or 0) >= size[0]
        and (pad.min_width or 0) >= size[1]
    )


def _batchable(op: Any) -> bool:
    """Whether ``BatchAugment`` runs this single op with albumentations' exact meaning."""
    if type(op) in (A.HorizontalFlip, A.VerticalFlip):
        return True
    if type(op) is A.Affine:
        shear = [v for r in op.shear.values() for v in r]
        return (
            not op.fit_output
            and not op.balanced_scale
            and op.border_mode == cv2.BORDER_CONSTANT
            and _fill_zero(op.fill)
            and op.interpolation == cv2.INTER_LINEAR
            and all(v == 0 for v in shear)
        )
    if type(op) is A.RandomBrightnessContrast:
        return op.brightness_by_max and not op.ensure_safe_range
    if type(op) is A.CoarseDropout:
        return isinstance(op.fill, (int, float))
    return False


def split_pipeline(
    ops: list[A.BasicTransform], input_size: tuple[int, int], batched: bool = True
) -> tuple[list[A.BasicTransform], list[list[A.BasicTransform]]]:
    """``(per_sample_ops, batched_units)``: the longest batchable tail runs batched, in order.

    A unit is one op, or a PadIfNeeded + RandomCrop pair (a random shift in a zero border).
    """
    units: list[list[A.BasicTransform]] = []
    i = 0
    while i < len(ops):
        if i + 1 < len(ops) and _pad_crop_ok(ops[i], ops[i + 1], input_size):
            units.append([ops[i], ops[i + 1]])
            i += 2
        else:
            units.append([ops[i]])
            i += 1
    cut = len(units)
    while batched and cut > 0 and (len(units[cut - 1]) == 2 or _batchable(units[cut - 1][0])):
        cut -= 1
    per_sample = [op for unit in units[:cut] for op in unit]
    return per_sample, units[cut:]


def _uniform(gen: torch.Generator, lo: float, hi: float, b: int, dev: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=gen, device=dev)


def _randint(gen: torch.Generator, lo: torch.Tensor | int, hi: torch.Tensor | int, b: int, dev: torch.device):
    """Uniform integers in ``[lo, hi]`` (inclusive, per sample), as float tensors."""
    return torch.floor(lo + torch.rand(b, generator=gen, device=dev) * (hi - lo + 1))


class BatchAugment:
    """uint8 ``(B, C, H, W)`` at input size -> augmented, normalized float ``(B, C, H, W)``.

    Runs ``units`` (from ``split_pipeline``) in order: consecutive geometric ops become one
    per-sample affine map and one ``grid_sample``; brightness/contrast and dropout are tensor ops;
    Normalize (the spec's mean/std) comes last. Random parameters come from one ``torch.Generator``
    on the batch's device (no host round trip); ``state_dict`` / ``load_state_dict`` carry it.
    """

    def __init__(self, spec: PreprocessSpec, units: list[list[A.BasicTransform]], seed: int = 0) -> None:
        self.spec = spec
        self.units = units
        self.seed = seed
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean/std per device, copied once
        self.generator: torch.Generator | None = None
        self._state: torch.Tensor | None = None  # restored state for a generator not created yet

    # ---- random stream ----
    def _gen(self, dev: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != dev:
            gen = torch.Generator(device=dev)
            gen.manual_seed(self.seed)
            if self._state is not None:
                gen.set_state(self._state)
            elif self.generator is not None:  # moved device: carry on from the same point
                gen.set_state(self.generator.get_state())
            self.generator, self._state = gen, None
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        if self.generator is not None:
            return {"generator": self.generator.get_state(), "device": self.generator.device.type}
        return {"generator": self._state} if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self._state, self.generator = state["generator"], None

    # ---- parameters (per sample) ----
    def sample(self, b: int, h: int, w: int, dev: torch.device) -> list[dict[str, torch.Tensor]]:
        """One parameter dict per unit; tests pass the same parameters to albumentations."""
        gen = self._gen(dev)
        return [self._sample(unit, b, h, w, gen, dev) for unit in self.units]

    def _sample(self, unit: list, b: int, h: int, w: int, gen: torch.Generator, dev: torch.device) -> dict:
        op = unit[-1]
        on = torch.rand(b, generator=gen, device=dev) < op.p
        if isinstance(op, A.RandomCrop):  # PadIfNeeded + RandomCrop: a shift in a zero border
            pad = unit[0]
            ph, pw = max(pad.min_height, h), max(pad.min_width, w)
            top, left = (ph - h) // 2, (pw - w) // 2
            dy = _randint(gen, 0, ph - h, b, dev) - top
            dx = _randint(gen, 0, pw - w, b, dev) - left
            return {"dx": dx, "dy": dy}
        if isinstance(op, (A.HorizontalFlip, A.VerticalFlip)):
            return {"on": on}
        if isinstance(op, A.Affine):
            sx = _uniform(gen, *op.scale["x"], b, dev)
            sy = sx if op.keep_ratio else _uniform(gen, *op.scale["y"], b, dev)
            rot = _uniform(gen, *op.rotate, b, dev)
            if op.translate_percent is not None:
                tx = torch.trunc(_uniform(gen, *op.translate_percent["x"], b, dev) * w)
                ty = torch.trunc(_uniform(gen, *op.translate_percent["y"], b, dev) * h)
            else:
                tx = _randint(gen, op.translate_px["x"][0], op.translate_px["x"][1], b, dev)
                ty = _randint(gen, op.translate_px["y"][0], op.translate_px["y"][1], b, dev)
            return {"on": on, "scale_x": sx, "scale_y": sy, "rotate": rot, "tx": tx, "ty": ty}
        if isinstance(op, A.RandomBrightnessContrast):
            alpha = 1.0 + _uniform(gen, *op.contrast_limit, b, dev)
            beta = _uniform(gen, *op.brightness_limit, b, dev)  # fraction of the max value
            return {"on": on, "alpha": alpha, "beta": beta}
        if isinstance(op, A.CoarseDropout):
            lo, hi = op.num_holes_range
            count = _randint(gen, lo, hi, b, dev)  # (B,)
            n = max(int(hi), 1)
            hr, wr = op.hole_height_range, op.hole_width_range
            if hr[1] >= 1:  # pixels (albumentations decides by the height range, for both)
                hh = _randint(gen, hr[0], min(hr[1], h), b * n, dev)
                ww = _randint(gen, wr[0], min(wr[1], w), b * n, dev)
            else:  # fractions of the side
                hh = torch.floor(h * _uniform(gen, *hr, b * n, dev))
                ww = torch.floor(w * _uniform(gen, *wr, b * n, dev))
            y0 = _randint(gen, 0, h - hh, b * n, dev)
            x0 = _randint(gen, 0, w - ww, b * n, dev)
            holes = torch.stack([x0, y0, x0 + ww, y0 + hh], dim=-1).view(b, n, 4)  # x_min, y_min, x_max, y_max
            active = torch.arange(n, device=dev)[None, :] < count[:, None]  # (B, n)
            return {"on": on, "holes": holes, "active": active}
        raise TypeError(f"not a batched op: {type(op).__name__}")

    # ---- application ----
    @staticmethod
    def matrix(op: Any, params: dict) -> tuple[torch.Tensor, ...]:
        """Forward map ``(a, b, c, d, e, f)``, each ``(B,)``: ``x' = a x + b y + e``, ``y' = c x + d y + f``, in
        pixel coordinates centred at ``((w - 1) / 2, (h - 1) / 2)``; elementwise, no tiny matrix products."""
        if isinstance(op, A.RandomCrop):
            one, zero = torch.ones_like(params["dx"]), torch.zeros_like(params["dx"])
            return one, zero, zero, one, -params["dx"], -params["dy"]
        on = params["on"]
        zero = torch.zeros(on.shape, device=on.device)
        one, flip = zero + 1.0, torch.where(on, -1.0, 1.0)
        if isinstance(op, A.HorizontalFlip):
            return flip, zero, zero, one, zero, zero
        if isinstance(op, A.VerticalFlip):
            return one, zero, zero, flip, zero, zero
        # Affine (albumentations: T @ R @ S, R = [[cos, sin], [-sin, cos]]); identity where off
        rad = torch.deg2rad(params["rotate"])
        c, s = torch.cos(rad), torch.sin(rad)
        sx, sy = params["scale_x"], params["scale_y"]
        m = (c * sx, s * sy, -s * sx, c * sy, params["tx"], params["ty"])
        return tuple(torch.where(on, v, i) for v, i in zip(m, (one, zero, zero, one, zero, zero), strict=True))

    @staticmethod
    def compose(later: tuple[torch.Tensor, ...], earlier: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``later`` after ``earlier``, both as ``matrix`` gives them."""
        a2, b2, c2, d2, e2, f2 = later
        a1, b1, c1, d1, e1, f1 = earlier
        return (
            a2 * a1 + b2 * c1, a2 * b1 + b2 * d1, c2 * a1 + d2 * c1, c2 * b1 + d2 * d1,
            a2 * e1 + b2 * f1 + e2, c2 * e1 + d2 * f1 + f2,
        )  # fmt: skip

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x8, y = batch
        b, _, h, w = x8.shape
        return self.apply(x8, self.sample(b, h, w, x8.device)), y

    def apply(self, x8: torch.Tensor, params: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` + parameters -> normalized float ``(B, C, H, W)``.

        Works in 0..255 (the zero border stays 0) and folds the division by 255 into Normalize.
        """
        x = x8.float()  # (B, C, H, W) in [0, 255]
        b, _, h, w = x.shape
        dev = x.device
        geometry: tuple[torch.Tensor, ...] | None = None
        for unit, p in zip(self.units, params, strict=True):
            op = unit[-1]
            if isinstance(op, (A.RandomCrop, A.HorizontalFlip, A.VerticalFlip, A.Affine)):
                m = self.matrix(op, p)
                geometry = m if geometry is None else self.compose(m, geometry)  # later ops after earlier ones
                continue
            x, geometry = self._warp(x, geometry), None
            if isinstance(op, A.RandomBrightnessContrast):
                alpha = torch.where(p["on"], p["alpha"], 1.0).view(-1, 1, 1, 1)
                beta = torch.where(p["on"], p["beta"] * 255.0, 0.0).view(-1, 1, 1, 1)
                x = torch.addcmul(beta, x, alpha).clamp_(0.0, 255.0)
            elif isinstance(op, A.CoarseDropout):
                rows = torch.arange(h, device=dev).view(1, 1, h, 1)
                cols = torch.arange(w, device=dev).view(1, 1, 1, w)
                hx0, hy0, hx1, hy1 = (p["holes"][..., k, None, None] for k in range(4))  # (B, n, 1, 1)
                live = (p["active"] & p["on"][:, None])[..., None, None]  # (B, n, 1, 1)
                in_rows = (rows >= hy0) & (rows < hy1) & live  # (B, n, H, 1): the small masks first
                inside = in_rows & (cols >= hx0) & (cols < hx1)  # (B, n, H, W)
                hole = inside[:, :1] if inside.shape[1] == 1 else inside.any(dim=1, keepdim=True)  # (B, 1, H, W)
                x = x.masked_fill_(hole, float(op.fill))
        x = self._warp(x, geometry)
        if dev not in self._norm:  # (x / 255 - mean) / std as one multiply and one subtraction
            self._norm[dev] = ((1.0 / (255.0 * self.std)).to(dev), (self.mean / self.std).to(dev))
        scale, shift = self._norm[dev]
        return x.mul_(scale).sub_(shift)  # (B, C, H, W)

    @staticmethod
    def _warp(x: torch.Tensor, m: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """Resample ``x`` through the forward maps ``m`` (bilinear, zero border) in one ``grid_sample``."""
        if m is None:
            return x
        b, _, h, w = x.shape
        a, bb, c, d, e, f = m
        det = a * d - bb * c
        ia, ib, ic, id_ = d / det, -bb / det, -c / det, a / det  # output -> input, in centred pixels
        ie, if_ = -(ia * e + ib * f), -(ic * e + id_ * f)
        # the sampling grid in [-1, 1] (align_corners=False): one (2B, 3) @ (3, H * W) product
        theta = torch.stack([ia, ib, ie, ic, id_, if_], dim=-1).view(b, 2, 3)  # in centred pixels
        theta = theta * torch.tensor([2.0 / w, 2.0 / h], device=x.device).view(1, 2, 1)  # -> [-1, 1]
        u = torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2  # centred columns
        v = torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2  # centred rows
        base = torch.stack([u.expand(h, w), v[:, None].expand(h, w), torch.ones_like(u).expand(h, w)])  # (3, H, W)
        grid = (theta.view(2 * b, 3) @ base.view(3, h * w)).view(b, 2, h, w).permute(0, 2, 3, 1)  # (B, H, W, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def describe(per_sample: list[A.BasicTransform], units: list[list[A.BasicTransform]]) -> str:
    """One line: which ops run where (for logs and ``repr``)."""
    ps = ", ".join(type(op).__name__ for op in per_sample) or "-"
    bt = ", ".join("+".join(type(op).__name__ for op in unit) for unit in units) or "-"
    return f"per sample: {ps}; batched: {bt}"


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The albumentations seed of one sample: a function of where it is in the run, nothing else."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + rank) * 1_000_003 + position) % (2**32)


__all__ = [
    "Augment",
    "BatchAugment",
    "describe",
    "from_serialized",
    "sample_seed",
    "split_pipeline",
    "train_transform",
]


def train_transform(spec: PreprocessSpec, augment: Augment) -> A.Compose:
    """The whole pipeline per sample, uint8 ``(H, W, C)`` -> float ``(C, h, w)``: resize, augment, Normalize."""
    from data.preprocess import normalize_ops, resize_ops

    return A.Compose([*resize_ops(spec), *augment.ops(spec.input_size), *normalize_ops(spec)])
