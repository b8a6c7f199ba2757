"""``DigitsDataModule``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images), offline.

The embedded data set of ``make demo``: no download, no data root. Pixels 0..16 are scaled to
uint8 0..255 and resized to ``input_size`` (default 28, what LeNet-5 and the small CNN take);
a seeded 70/10/20 train/val/test split.

    python -c "from data.digits import DigitsDataModule as D; d = D(); d.setup(); print(d)"
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from data.base import ImageDataModule, Split, seeded_split


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 ``(N, 8, 8, 1)`` in 0..255 and int64 labels ``(N,)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


class DigitsDataModule(ImageDataModule):
    """8x8 scikit-learn digits, classes "0".."9"; ``root`` is ignored (the data ship with scikit-learn).

    YAML: ``data: {class_path: data.DigitsDataModule, init_args: {batch_size: 64, input_size: 28}}``

    Args:
        batch_size: Images per batch, in every split.
        test_fraction: Share of the 1,797 images held out as the test split.
        **kwargs: ``ImageDataModule``'s other arguments.
    """

    task = "classification"
    default_mean = (0.31,)  # measured on the 28 px resized train set
    default_std = (0.32,)

    def __init__(self, *, batch_size: int = 64, test_fraction: float = 0.2, **kwargs: Any) -> None:
        classes = [str(i) for i in range(10)]
        super().__init__(batch_size=batch_size, in_channels=1, class_names=classes, target=None, **kwargs)
        val_fraction = self.val_fraction
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"need 0 < test_fraction and val_fraction + test_fraction < 1, got {val_fraction}, {test_fraction}"
            )
        if self.augment.hflip:
            warnings.warn("augment.hflip on digits: a mirrored digit is not the same digit", UserWarning, stacklevel=2)
        self.test_fraction = test_fraction
        self.save_hyperparameters()

    def load_splits(self) -> dict[str, Split]:
        images, labels = load_digits_uint8()
        fractions = [1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction]
        tr, va, te = seeded_split(len(labels), fractions, self.seed)
        data = Split(images, labels)
        return {"train": data.take(tr), "val": data.take(va), "test": data.take(te)}
