"""A Lightning callback the benchmarks inject into ``python -m training fit`` runs.

It times every training epoch from the end of batch ``SVERTKA_BENCH_WARMUP - 1`` (default 0:
from the first batch's start) to the end of the last batch, so process start-up, the first
batches, data loading before them and validation are not counted, and writes images/s per epoch
as JSON to the file named by ``SVERTKA_BENCH_OUT``. ``benchmarks/_ceiling.py`` times its bare
loop the same way.
"""

from __future__ import annotations

import json
import os
import time

import torch
from lightning.pytorch import Callback


def _sync(pl_module) -> None:
    """Wait for queued GPU work, so a timestamp covers it (CPU: nothing to wait for)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.warmup = int(os.environ.get("SVERTKA_BENCH_WARMUP") or 0)  # batches not timed
        self._t0 = 0.0
        self._n = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._n = 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.warmup == 0 and batch_idx == 0:
            _sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:  # timing starts here: the next batch's loading counts
            _sync(pl_module)
            self._t0 = time.perf_counter()
            return
        if batch_idx < self.warmup:
            return
        self._n += len(batch[0])
        if batch_idx + 1 >= trainer.num_training_batches:  # the epoch's last batch: include its GPU work
            _sync(pl_module)
        self._t1 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._n == 0:
            raise ValueError(f"SVERTKA_BENCH_WARMUP={self.warmup} leaves no training batch to time")
        seconds = self._t1 - self._t0
        self.epochs.append({"images": self._n, "seconds": seconds, "images_per_s": self._n / seconds})
        out = os.environ.get("SVERTKA_BENCH_OUT")
        if out and trainer.is_global_zero:
            with open(out, "w") as f:
                json.dump(self.epochs, f)
