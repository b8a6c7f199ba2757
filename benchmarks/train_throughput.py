"""Training throughput: a plain PyTorch loop vs ``python -m training fit``, same model and batch size.

    DATASETS_DIR=../shared/datasets python benchmarks/train_throughput.py [--config configs/fashion_mnist_cnn.yaml]
    DATASETS_DIR=... python benchmarks/train_throughput.py --batch_size 16 --no_augment --repeats 3
    DATASETS_DIR=... python benchmarks/train_throughput.py --accelerator gpu [--precision bf16-mixed]

In one run, on Fashion-MNIST's training images:
  (a) a plain PyTorch loop over pre-loaded, pre-normalized tensors (shuffled index, forward,
      cross-entropy, backward, Adam step): the upper bound of what any trainer can do;
  (b) ``python -m training fit`` with the same config (model, batch size, optimizer), without
      and with augmentation, timed by a callback from the first to the last training batch of
      its last epoch (process start-up, data loading and validation are not counted).
Each run does ``--epochs`` epochs of ``--batches`` batches and reports the last epoch's
images/s (the first one warms up). With ``--accelerator gpu`` both run on the GPU: the plain
loop with the whole set resident on the device (bf16 autocast with ``--precision bf16-mixed``),
the fit as ``--trainer.accelerator gpu``. It prints the ratios b/a against the targets of issue
#10 (CPU: >= 0.95 without augmentation at batch 64, >= 0.9 at batch 16, >= 0.85 with it;
GPU: >= 0.9 without, >= 0.8 with).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.mnist import find_raw_file, read_idx  # noqa: E402
from models import get_model  # noqa: E402

AUGMENT = "{hflip: 0.5, shift: 0.1, scale: 0.1, rotate: 10, random_crop_padding: 2, coarse_dropout: 0.5}"


def plain_loop(
    cfg: dict, root: Path, batches: int, epochs: int, threads: int | None, device: str = "cpu", bf16: bool = False
) -> float:
    """Images/s of the last epoch of a plain loop over pre-loaded tensors (on ``device``)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    raw = root / "FashionMNIST" / "raw"
    images = read_idx(find_raw_file(raw, "train-images-idx3-ubyte"))  # plain or .gz
    labels = torch.as_tensor(read_idx(find_raw_file(raw, "train-labels-idx1-ubyte")).astype("int64"))
    init = cfg["model"]["init_args"]
    data_args = cfg["data"].get("init_args", {})
    batch_size = int(cfg.get("_batch_size") or data_args.get("batch_size", 128))
    mean, std = 0.2860, 0.3530  # Fashion-MNIST's train mean/std, as a plain user would hard-code
    x = (torch.as_tensor(images).float().div(255.0).sub(mean).div(std)).unsqueeze(1).to(dev)  # (N, 1, 28, 28)
    labels = labels.to(dev)
    torch.manual_seed(0)
    net = get_model(init["net"], in_channels=1, num_outputs=10, **(init.get("net_kwargs") or {})).to(dev)
    net.train()
    lr = init.get("optimizer", {}).get("init_args", {}).get("lr", 1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rate = 0.0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(epochs):
        perm = torch.randperm(len(x), device=dev)
        sync()
        t0 = time.perf_counter()
        n = 0
        for b in range(batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb, yb = x[idx], labels[idx]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(idx)
        sync()
        rate = n / (time.perf_counter() - t0)
    return rate


def lightning_fit(
    config: Path, root: Path, batches: int, epochs: int, augment: bool, threads: int | None, extra: tuple = ()
) -> float:
    """Images/s of the last training epoch of ``python -m training fit``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "epochs.json"
        cmd = [
            sys.executable, "-m", "training", "fit", "-c", str(config),
            "--data.root", str(root),
            f"--trainer.max_epochs={epochs}",
            f"--trainer.limit_train_batches={batches}",
            "--trainer.limit_val_batches=2",
            "--trainer.callbacks+=_timing.EpochTimer",
            "--early_stopping_patience=null",
            "--test_after_fit=false",
            "--export=false",
        ]  # fmt: skip
        if threads:
            cmd.append(f"--num_threads={threads}")
        if augment:
            cmd.append(f"--data.init_args.augment={AUGMENT}")
        cmd += list(extra)
        env = {
            **os.environ,
            "SVERTKA_BENCH_OUT": str(out),
            "SVERTKA_OUTPUT_DIR": tmp,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)  # noqa: S603
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"error: training fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())[-1]["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_mnist_cnn.yaml")
    p.add_argument("--root", type=Path, default=os.environ.get("DATASETS_DIR"), help="data root ($DATASETS_DIR)")
    p.add_argument("--batches", type=int, default=300, help="training batches per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (the last one is timed)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the runs this many times, report medians")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--batch_size", type=int, default=None, help="override the config's batch size (both runs)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="where both run")
    p.add_argument("--precision", default=None, help="e.g. bf16-mixed (plain loop: bf16 autocast)")
    p.add_argument("--no_augment", action="store_true", help="skip the run with augmentation")
    args = p.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --accelerator gpu: no CUDA device here")
    if args.root is None or not (Path(args.root) / "FashionMNIST" / "raw").is_dir():
        sys.exit("error: --root / DATASETS_DIR must hold FashionMNIST/raw (the real Fashion-MNIST)")
    cfg = yaml.safe_load(args.config.read_text())
    cfg["_batch_size"] = args.batch_size
    bs = args.batch_size or cfg["data"].get("init_args", {}).get("batch_size")
    extra = [f"--trainer.accelerator={args.accelerator}", "--trainer.devices=1"]
    extra += [f"--data.init_args.batch_size={bs}"] if args.batch_size else []
    extra += [f"--trainer.precision={args.precision}"] if args.precision else []
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    bf16 = bool(args.precision and args.precision.startswith("bf16"))
    net = cfg["model"]["init_args"]["net"]
    print(f"config {args.config.name}: net={net} batch_size={bs}, {args.epochs} epochs x {args.batches} batches")
    print(f"accelerator={args.accelerator} precision={args.precision or '32-true'}")
    print(f"last epoch timed; torch threads={args.threads or torch.get_num_threads()}; repeats={args.repeats}")

    root = Path(args.root)
    runs: dict[str, list[float]] = {"a": [], "b": []} if args.no_augment else {"a": [], "b": [], "b_aug": []}
    for r in range(args.repeats):  # alternating: a, b, b_aug, a, b, b_aug, ...
        runs["a"].append(plain_loop(cfg, root, args.batches, args.epochs, args.threads, device, bf16))
        runs["b"].append(lightning_fit(args.config, root, args.batches, args.epochs, False, args.threads, extra))
        if "b_aug" in runs:
            runs["b_aug"].append(lightning_fit(args.config, root, args.batches, args.epochs, True, args.threads, extra))
        print(f"  repeat {r + 1}: " + ", ".join(f"{k}={v[-1]:.0f} img/s" for k, v in runs.items()), flush=True)

    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    print()
    gpu = args.accelerator == "gpu"
    target_plain = ">=0.9" if gpu or (bs or 0) < 64 else ">=0.95"
    target_aug = ">=0.8" if gpu else ">=0.85"

    def row(name: str, key: str, target: str = "") -> None:
        vals = runs[key]
        spread = f"{min(vals):.0f}-{max(vals):.0f}"
        ratio = f"{med[key] / med['a']:.2f}" if key != "a" else ""
        ratios = " ".join(f"{v / a:.2f}" for v, a in zip(vals, runs["a"], strict=True)) if key != "a" else ""
        print(f"{name:<48}{med[key]:>10.0f}{spread:>14}{ratio:>8}{target:>8}   {ratios}")

    print(f"{'run':<48}{'images/s':>10}{'spread':>14}{'b/a':>8}{'target':>8}   per-repeat b/a")
    row("(a) plain PyTorch loop, pre-loaded tensors", "a")
    row("(b) python -m training fit, no augmentation", "b", target_plain)
    if "b_aug" in runs:
        row("(b) python -m training fit, augmentation", "b_aug", target_aug)
        print(f"augmentation: {AUGMENT}")


if __name__ == "__main__":
    main()
