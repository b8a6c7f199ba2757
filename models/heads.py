"""From a network's raw output to a prediction: one piece shared by training (val/test) and serving.

A bundle's network outputs one of:

- class logits ``(B, N)``: the prediction is ``softmax`` probabilities;
- one number per image ``(B, 1)`` (a linear regression head);
- logits over target values ``(B, K)`` when the bundle's ``target`` has ``bins`` (a
  distribution head, as in DEX / DLDL age estimation): the prediction is the expected value
  ``softmax(logits) @ bins``.

``tta=["hflip"]`` averages the prediction (probabilities or values) of the image and its mirror.
Training logs its val/test metrics through :func:`predict`, the service and the batch script
call the same function, so a bundle scores the same wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TTA_CHOICES = ("hflip",)


def gaussian_targets(y: torch.Tensor, bins: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(B,)`` targets -> ``(B, K)`` label distributions: a Gaussian of width ``sigma`` over ``bins``."""
    d = (bins.unsqueeze(0) - y.unsqueeze(1)) / sigma  # (B, K)
    p = torch.exp(-0.5 * d * d)
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def decode(out: torch.Tensor, task: str, bins: torch.Tensor | None = None) -> torch.Tensor:
    """Raw network output -> probabilities ``(B, N)`` (classification) or values ``(B,)`` (regression)."""
    if task == "classification":
        return out.float().softmax(dim=1)
    if bins is not None:
        return out.float().softmax(dim=1) @ bins.to(out.device, torch.float32)  # (B, K) @ (K,) -> (B,)
    return out.float().reshape(out.shape[0], -1)[:, 0]  # (B, 1) or (B,) -> (B,)


def predict(
    model: nn.Module,
    x: torch.Tensor,
    task: str,
    bins: torch.Tensor | None = None,
    tta: Sequence[str] = (),
    raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """``model(x)`` decoded, averaged with its mirror image's when ``"hflip"`` is in ``tta``.

    ``raw``: ``model(x)`` when the caller has it already (training reuses the loss's forward).
    """
    out = decode(model(x) if raw is None else raw, task, bins)
    if "hflip" in tta:
        out = (out + decode(model(x.flip(-1)), task, bins)) / 2
    return out


def check_tta(tta: Sequence[str] | None) -> list[str]:
    """Validated list of test-time augmentations; ``ValueError`` names an unknown one."""
    tta = list(tta or [])
    bad = [t for t in tta if t not in TTA_CHOICES]
    if bad:
        raise ValueError(f"unknown test-time augmentation {bad[0]!r} (known: {', '.join(TTA_CHOICES)})")
    return tta
