"""The training ceiling: a bare loop over the exact run ``python -m training fit`` would train.

    python benchmarks/_ceiling.py -c configs/fashion_mnist_cnn.yaml --data.root DIR [fit's options]

``benchmarks/train_throughput.py`` runs it as a subprocess with the same options it gives the fit.
It builds the run as the fit does (``SvertkaCLI`` with ``run=False``: the same config, seed,
``--num_threads``, network, optimizer and its settings, precision and device), takes the first
``limit_train_batches`` batches of the fit's own train loader, moved to the device and put in the
memory format and dtype the network sees, and then trains on them with nothing else: zero grad,
forward, ``ImageClassifier``'s loss, backward, optimizer step (and a step-interval scheduler's
step). No DataLoader, no Lightning loop, no logging, no metric: only work every fit must do, so
no fit can be faster (``tests/test_benchmarks.py`` checks that both end with the same weights).
It times each epoch as ``_timing.EpochTimer`` times the fit's (from the end of batch
``SVERTKA_BENCH_WARMUP - 1`` to the end of the last batch, the device synced at both ends) and
writes the same JSON to ``SVERTKA_BENCH_OUT``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.cli import SvertkaCLI  # noqa: E402
from training.modules import ImageClassifier  # noqa: E402


def premade_batches(cli: SvertkaCLI, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of the fit's train loader, as the network will see them, on ``device``."""
    dm, model = cli.datamodule, cli.model
    plugin = cli.trainer.strategy.precision_plugin
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():  # no trainer attached: augmentation (if any) runs here, untimed
        x, y = (t.to(device) for t in dm.on_after_batch_transfer(batch, 0))
        x = plugin.convert_input(x)
        if model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, y))
        if len(batches) == count:
            return batches
    raise SystemExit(f"error: the train split has fewer than {count} batches")


def optimizer_and_step_scheduler(model: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The module's own optimizer (same class and settings) and its scheduler when it steps per batch."""
    conf = model.configure_optimizers()
    if isinstance(conf, torch.optim.Optimizer):
        return conf, None
    sched = conf["lr_scheduler"]
    return conf["optimizer"], sched["scheduler"] if sched.get("interval") == "step" else None


def train(cli: SvertkaCLI) -> list[dict]:
    """Train ``cli``'s model bare on pre-made batches; images/s of each epoch (as ``EpochTimer`` writes it)."""
    model, trainer = cli.model, cli.trainer
    if not isinstance(model, ImageClassifier):
        sys.exit(f"error: the ceiling loop knows ImageClassifier's loss only, got {type(model).__name__}")
    if not isinstance(trainer.limit_train_batches, int):
        sys.exit("error: set --trainer.limit_train_batches to a number of batches")
    device = trainer.strategy.root_device
    plugin = trainer.strategy.precision_plugin
    warmup = int(os.environ.get("SVERTKA_BENCH_WARMUP") or 0)
    batches = premade_batches(cli, trainer.limit_train_batches, device)
    model = plugin.convert_module(model).to(device)
    model.trainer = trainer  # configure_optimizers may read the run's length (OneCycleLR)
    model.train()
    optimizer, scheduler = optimizer_and_step_scheduler(model)
    scaler = getattr(plugin, "scaler", None)  # 16-mixed only
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    smoothing = model.label_smoothing
    epochs = []
    for _ in range(trainer.max_epochs):
        sync()
        t0, n = time.perf_counter(), 0
        for i, (x, y) in enumerate(batches):
            if i == warmup:
                sync()
                t0, n = time.perf_counter(), 0
            optimizer.zero_grad()
            with plugin.train_step_context() if hasattr(plugin, "train_step_context") else nullcontext():
                loss = F.cross_entropy(model.raw(x), y, label_smoothing=smoothing)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n += len(y)
        sync()
        seconds = time.perf_counter() - t0
        epochs.append({"images": n, "seconds": seconds, "images_per_s": n / seconds})
    return epochs


def main(argv: list[str]) -> None:
    cli = SvertkaCLI(args=argv, run=False)  # same parsing, seed, threads and instantiation as the fit
    epochs = train(cli)
    out = os.environ.get("SVERTKA_BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(epochs))
    else:
        print(json.dumps(epochs))


if __name__ == "__main__":
    main(sys.argv[1:])
