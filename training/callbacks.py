"""Callbacks that leave a run's results on disk: plots in the run folder and the exported bundle.

``TrainingPlots`` draws the loss and main-metric curves at fit end, a confusion matrix
(classifier) or predicted-vs-true age and MAE per decade (regressor) at test end, into
``<run dir>/plots/``. ``ExportBundle`` writes the best checkpoint as a bundle at fit end and
adds the test metrics when the same weights are tested afterwards. ``python -m training fit``
adds both; with a plain ``Trainer`` pass them yourself.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from models.registry import get_model
from training.export import load_checkpoint, net_from_checkpoint, write_bundle
from training.modules import ImageTask


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{name: float}`` for the scalar metrics whose name starts with ``prefix``."""
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefix) and (not isinstance(v, torch.Tensor) or v.numel() == 1):
            out[k] = float(v)
    return out


def run_dir(trainer: Trainer) -> Path:
    """Where this run's logs go (the first logger's folder), else the trainer's root folder.

    Call it on every rank: ``trainer.log_dir`` broadcasts from rank 0.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class TrainingPlots(Callback):
    """Per-epoch metric history (kept in checkpoints, so a resumed run plots every epoch) and plots."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": float(trainer.current_epoch)}
        for k, v in _floats(trainer.callback_metrics, "").items():
            if k.startswith(("train/", "val/")) and not k.endswith("_step"):
                row[k.removesuffix("_epoch")] = v
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = run_dir(trainer) / "plots"  # on every rank: trainer.log_dir is a collective call
        if trainer.is_global_zero and self.history and not trainer.fast_dev_run:
            main = getattr(pl_module, "monitor", "val/loss").split("/", 1)[-1]
            path = plot_curves(self.history, main, out / "curves.png")
            rank_zero_info(f"Training curves: {path}")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = run_dir(trainer) / "plots"  # on every rank: trainer.log_dir is a collective call
        if not trainer.is_global_zero:
            return
        cm = getattr(pl_module, "test_confusion_matrix", None)
        if cm is not None:
            names = (getattr(pl_module, "bundle_info", None) or {}).get("class_names")
            rank_zero_info(f"Confusion matrix: {plot_confusion_matrix(cm, names, out / 'confusion_matrix.png')}")
        pred_true = getattr(pl_module, "test_predictions", None)
        if pred_true is not None:
            pred, true = pred_true
            paths = plot_age_errors(pred, true, out)
            rank_zero_info(f"Age plots: {', '.join(str(p) for p in paths)}")


def plot_curves(history: list[dict[str, float]], metric: str, path: Path) -> Path:
    """Two panels: train/val loss and train/val ``metric`` per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [int(r["epoch"]) + 1 for r in history]
    for ax, name in zip(axes, ("loss", metric), strict=True):
        for stage in ("train", "val"):
            key = f"{stage}/{name}"
            points = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(cm: torch.Tensor, class_names: list[str] | None, path: Path) -> Path:
    """Counts (rows: true class, columns: predicted class), row-normalized colours."""
    plt = _pyplot()
    cm = cm.float()
    n = cm.shape[0]
    names = class_names or [str(i) for i in range(n)]
    norm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    acc = float(cm.diag().sum() / cm.sum().clamp(min=1))
    ax.set_title(f"Confusion matrix (test accuracy {acc:.4f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_age_errors(pred: torch.Tensor, true: torch.Tensor, out_dir: Path) -> list[Path]:
    """Predicted vs true scatter and MAE per decade of true age (two PNGs), and that table as a CSV."""
    plt = _pyplot()
    pred, true = pred.float().flatten(), true.float().flatten()
    out_dir.mkdir(parents=True, exist_ok=True)
    mae = float((pred - true).abs().mean())

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true.numpy(), pred.numpy(), s=4, alpha=0.4)
    hi = float(max(true.max(), pred.max()))
    ax.plot([0, hi], [0, hi], color="red", lw=1)
    ax.set_xlabel("true age")
    ax.set_ylabel("predicted age")
    ax.set_title(f"Test: MAE {mae:.2f} years")
    fig.tight_layout()
    scatter = out_dir / "age_scatter.png"
    fig.savefig(scatter, dpi=100)
    plt.close(fig)

    decades = (true // 10).long()
    labels, values, counts = [], [], []
    for d in range(int(decades.max()) + 1):
        sel = decades == d
        if sel.any():
            labels.append(f"{10 * d}-{10 * d + 9}")
            values.append(float((pred[sel] - true[sel]).abs().mean()))
            counts.append(int(sel.sum()))
    fig, ax = plt.subplots(figsize=(max(5, len(labels) * 0.8), 4))
    bars = ax.bar(labels, values)
    for bar, c in zip(bars, counts, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"n={c}", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("true age")
    ax.set_ylabel("MAE (years)")
    ax.set_title("MAE per decade")
    fig.tight_layout()
    bars_path = out_dir / "age_mae_by_decade.png"
    fig.savefig(bars_path, dpi=100)
    plt.close(fig)
    table = out_dir / "age_mae_by_decade.csv"  # the numbers behind the bars
    rows = [f"{lab},{n},{v:.4f}" for lab, n, v in zip(labels, counts, values, strict=True)]
    table.write_text("\n".join(["decade,n,mae", *rows, f"all,{len(true)},{mae:.4f}"]) + "\n")
    return [scatter, bars_path, table]


class ExportBundle(Callback):
    """At fit end, export the best checkpoint (else the current weights) to ``out_dir`` as a bundle.

    The bundle's metrics are the validation metrics of the best epoch; when the same weights
    are then tested (``trainer.test(ckpt_path="best")``, as ``python -m training fit`` does),
    the bundle is rewritten with the test metrics added.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.best_val: dict[str, float] = {}
        self.best_score: float | None = None
        self.source: str | None = None  # checkpoint the bundle's weights came from ("" = in-memory weights)
        self.bundle_path: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best_val": self.best_val, "best_score": self.best_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_val = dict(state_dict.get("best_val", {}))
        self.best_score = state_dict.get("best_score")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember every val metric of the best epoch (same rule as ModelCheckpoint: monitor + mode)."""
        if trainer.sanity_checking:
            return
        val = _floats(trainer.callback_metrics, "val/")
        monitor, mode = getattr(pl_module, "monitor", "val/loss"), getattr(pl_module, "monitor_mode", "min")
        score = val.get(monitor)
        if score is None or math.isnan(score):
            return
        if self.best_score is None or (score > self.best_score if mode == "max" else score < self.best_score):
            self.best_score, self.best_val = score, val

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:
            rank_zero_info("fast_dev_run: no bundle exported")
            return
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") or ""
        self.source = best if best and Path(best).is_file() else ""
        self._export(trainer, pl_module, self.best_val)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.source is None:  # nothing exported by this process's fit
            return
        tested = trainer.ckpt_path or ""
        same = (tested == self.source == "") or (tested and self.source and Path(tested).samefile(self.source))
        if not same:
            return  # other weights than the bundle's were tested
        self._export(trainer, pl_module, {**self.best_val, **_floats(trainer.callback_metrics, "test/")})

    def _export(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, ImageTask):
            return
        if self.source:
            ckpt = load_checkpoint(self.source)
            net, meta = net_from_checkpoint(ckpt), ckpt["svertka"]
        else:
            meta = pl_module.svertka_meta()
            net = get_model(meta["architecture"], **meta["architecture_kwargs"])
            net.load_state_dict(pl_module.net.state_dict())
        self.bundle_path = write_bundle(self.out_dir, net, meta, metrics)
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("loss"))
        print(f"Bundle: {self.bundle_path}  ({shown})", flush=True)


class ResumableRNG(Callback):
    """Keep the global RNG states (torch, CUDA, NumPy, Python) in checkpoints and restore them on resume.

    Lightning restores weights, optimizer and loop counters but not the global RNG, which the
    train loader's shuffle draws from; with this callback a fit resumed from ``last.ckpt``
    replays the same batches as an uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, py_state, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": pos,
                "has_gauss": has_gauss,
                "cached": cached,
            },
            "python": {"version": version, "state": list(py_state), "gauss": gauss},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import random

        import numpy as np

        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        if state_dict.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        n = state_dict["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        p = state_dict["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class _Throttled:
    """A progress bar that redraws (and so reads the logged metrics) at most every ``interval`` seconds.

    Lightning's bars read every logged metric after every step (``.item()``: a host-device sync
    on a GPU) and redraw; at hundreds of steps per second nobody sees the difference between that
    and 5 redraws a second. ``refresh_due`` is set before the step, so the module logs the step
    loss only when the bar or a logger will read it.
    """

    interval: float = 0.2
    refresh_due: bool = True
    _last: float = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        self.refresh_due = last_batch or batch_idx == 0 or now - self._last >= self.interval
        if self.refresh_due:
            self._last = now
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # type: ignore[misc]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.refresh_due:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # type: ignore[misc]


class ThrottledRichProgressBar(_Throttled, RichProgressBar):
    """Lightning's default (rich) bar, redrawn at most 5 times a second during training.

    Its refresh thread polls at ``refresh_rate`` per second (Lightning's default: 100, a wake-up
    every 10 ms that preempts a busy training thread); 5 matches the redraws.
    """

    def __init__(self, refresh_rate: int = 5, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)


class ThrottledTQDMProgressBar(_Throttled, TQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most 5 times a second during training."""


def progress_bar() -> Callback:
    """The bar Lightning would pick (rich when installed, else tqdm), throttled."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return ThrottledRichProgressBar() if _RICH_AVAILABLE else ThrottledTQDMProgressBar()
