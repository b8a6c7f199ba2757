"""Training throughput: ``python -m training fit`` against a ceiling that trains the same run bare.

    DATASETS_DIR=../shared/datasets python benchmarks/train_throughput.py [--config configs/fashion_mnist_cnn.yaml]
    DATASETS_DIR=... python benchmarks/train_throughput.py --batch_size 16 --no_augment --repeats 3
    DATASETS_DIR=... python benchmarks/train_throughput.py --accelerator gpu [--precision bf16-mixed] [--compile]

In one run, on Fashion-MNIST's training images, each in a fresh process with the same options:
  (a) the ceiling, ``benchmarks/_ceiling.py``: the run the fit would train (same config, seed,
      threads, network, optimizer and its settings, precision, device), on batches taken from the
      fit's own loader beforehand and already on the device, in the memory format and dtype the
      network sees; then a bare loop of zero grad, forward, loss, backward, optimizer step. No
      DataLoader, no Lightning, no logging: only work every fit must do, so no fit can be faster;
  (b) ``python -m training fit`` with the same config, without and with augmentation (the
      augmentation is work the fit does on top of the ceiling's).
Both time every epoch from the end of its ``--warmup``-th batch to the end of its last batch
(``_timing.EpochTimer`` in the fit; process start-up, data set loading and validation are not
counted), each epoch being ``--warmup`` + ``--batches`` batches; a run's rate is its timed images
over its timed seconds, all ``--epochs`` together (2 x 800 batches by default: windows of ~40 s on
2 cores, so a run's speed averages over the host's slow and fast spells). The runs alternate (a, b, b
with augmentation, a, b, ...) ``--repeats`` times; the table gives medians, the spread of each
run's repeats as min-max and as a percentage of the median, and the fit/ceiling ratio per repeat;
on a virtual machine also the share of CPU time its host took during each run (``/proc/stat``
steal), which moves a run's speed as much. Targets (issue #25): fit/ceiling >= 0.9 without
augmentation and >= 0.8 with it. ``--channels_last``,
``--compile`` and ``--precision`` go to every run (the ceiling trains through the same
``channels_last`` / ``torch.compile`` network and the fit's precision plugin); ``--fit_args`` to
the fits only, to try a setting against an unchanged ceiling.
``--old_loop`` adds the loop this benchmark used before issue #25 (in the benchmark's own process,
a shuffled index into pre-normalized tensors, torch's default settings), which the fit could beat.
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
TARGETS = {"fit": 0.9, "fit_aug": 0.8}


def cpu_ticks() -> tuple[int, int] | None:
    """``(stolen, total)`` CPU ticks of the machine so far (``/proc/stat``), None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


def stolen_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    """The share of the machine's CPU time the hypervisor took between two ``cpu_ticks`` (nan if unknown)."""
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def run_timed(kind: str, args: list[str], warmup: int) -> tuple[float, float]:
    """Images/s of the timed epochs of the ceiling (``kind="ceiling"``) or of ``python -m training fit``,
    and the share of CPU time stolen from this virtual machine while the run's process ran."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "epochs.json"
        entry = [str(ROOT / "benchmarks" / "_ceiling.py")] if kind == "ceiling" else ["-m", "training", "fit"]
        timer = [] if kind == "ceiling" else ["--trainer.callbacks+=_timing.EpochTimer"]
        env = {
            **os.environ,
            "SVERTKA_BENCH_OUT": str(out),
            "SVERTKA_BENCH_WARMUP": str(warmup),
            "SVERTKA_OUTPUT_DIR": tmp,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        ticks = cpu_ticks()
        proc = subprocess.run(
            [sys.executable, *entry, *args, *timer], cwd=ROOT, env=env, capture_output=True, text=True
        )  # noqa: S603
        stolen = stolen_share(ticks, cpu_ticks())
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"error: the {kind} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        epochs = json.loads(out.read_text())
        return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs), stolen


def old_loop(cfg: dict, root: Path, batches: int, epochs: int, device: str, bf16: bool) -> float:
    """The loop of this benchmark before issue #25, kept for comparison (see the module docstring)."""
    dev = torch.device(device)
    raw = root / "FashionMNIST" / "raw"
    images = read_idx(find_raw_file(raw, "train-images-idx3-ubyte"))  # plain or .gz
    labels = torch.as_tensor(read_idx(find_raw_file(raw, "train-labels-idx1-ubyte")).astype("int64")).to(dev)
    init = cfg["model"]["init_args"]
    batch_size = int(cfg["_batch_size"])
    mean, std = 0.2860, 0.3530  # Fashion-MNIST's train mean/std, as a plain user would hard-code
    x = (torch.as_tensor(images).float().div(255.0).sub(mean).div(std)).unsqueeze(1).to(dev)  # (N, 1, 28, 28)
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


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_mnist_cnn.yaml")
    p.add_argument("--root", type=Path, default=os.environ.get("DATASETS_DIR"), help="data root ($DATASETS_DIR)")
    p.add_argument("--batches", type=int, default=800, help="timed batches per epoch (of 844 at batch 64)")
    p.add_argument("--warmup", type=int, default=30, help="untimed batches at the start of each epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run, each timed after its warmup")
    p.add_argument("--repeats", type=int, default=3, help="alternate the runs this many times, report medians")
    p.add_argument("--threads", type=int, default=None, help="--num_threads for every run (default: torch's)")
    p.add_argument("--batch_size", type=int, default=None, help="override the config's batch size (every run)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="where every run trains")
    p.add_argument("--precision", default=None, help="--trainer.precision for every run, e.g. bf16-mixed")
    p.add_argument("--channels_last", action="store_true", help="--model.init_args.channels_last true for every run")
    p.add_argument("--compile", action="store_true", help="--model.init_args.compile_net true for every run")
    p.add_argument("--no_augment", action="store_true", help="skip the fit with augmentation")
    p.add_argument("--old_loop", action="store_true", help="add the pre-#25 plain loop as a line of its own")
    p.add_argument("--fit_args", default="", help="extra options for the fits only (space-separated)")
    args = p.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --accelerator gpu: no CUDA device here")
    if args.root is None or not (Path(args.root) / "FashionMNIST" / "raw").is_dir():
        sys.exit("error: --root / DATASETS_DIR must hold FashionMNIST/raw (the real Fashion-MNIST)")
    if args.batches < 1 or args.warmup < 0 or args.epochs < 1 or args.repeats < 1:
        sys.exit("error: --batches, --epochs and --repeats must be >= 1, --warmup >= 0")
    cfg = yaml.safe_load(args.config.read_text())
    bs = args.batch_size or cfg["data"].get("init_args", {}).get("batch_size", 128)
    cfg["_batch_size"] = bs
    common = [
        "-c", str(args.config),
        "--data.root", str(args.root),
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.limit_train_batches={args.warmup + args.batches}",
        "--trainer.limit_val_batches=2",
        "--early_stopping_patience=null",
        "--test_after_fit=false",
        "--export=false",
        f"--trainer.accelerator={args.accelerator}",
        "--trainer.devices=1",
    ]  # fmt: skip
    common += [f"--num_threads={args.threads}"] if args.threads else []
    common += [f"--data.init_args.batch_size={bs}"] if args.batch_size else []
    common += [f"--trainer.precision={args.precision}"] if args.precision else []
    common += ["--model.init_args.channels_last=true"] if args.channels_last else []
    common += ["--model.init_args.compile_net=true"] if args.compile else []
    fit_args = common + args.fit_args.split()
    net = cfg["model"]["init_args"]["net"]
    threads = args.threads or torch.get_num_threads()
    print(f"config {args.config.name}: net={net} batch_size={bs}, {args.warmup} + {args.batches} batches an epoch")
    flags = "".join(f" {f}" for f, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
    print(f"accelerator={args.accelerator} precision={args.precision or '32-true'}{flags} torch threads={threads}")
    print(f"{args.epochs} epoch(s), each timed after its first {args.warmup} batches; {args.repeats} repeats")
    if args.fit_args:
        print(f"fit only: {args.fit_args}")

    runs: dict[str, list[float]] = {"ceiling": [], "fit": []}
    if not args.no_augment:
        runs["fit_aug"] = []
    if args.old_loop:
        runs["old_loop"] = []
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    bf16 = bool(args.precision and args.precision.startswith("bf16"))
    stolen: dict[str, list[float]] = {k: [] for k in runs}  # the hypervisor's share of the CPUs, per run

    def timed(key: str, fit_args_: list[str]) -> None:
        rate, share = run_timed("ceiling" if key == "ceiling" else "fit", fit_args_, args.warmup)
        runs[key].append(rate)
        stolen[key].append(share)

    for r in range(args.repeats):  # alternating: ceiling, fit, fit_aug, old loop, ceiling, ...
        timed("ceiling", common)
        timed("fit", fit_args)
        if "fit_aug" in runs:
            timed("fit_aug", [*fit_args, f"--data.init_args.augment={AUGMENT}"])
        if "old_loop" in runs:
            if args.threads:
                torch.set_num_threads(args.threads)
            total = args.warmup + args.batches
            runs["old_loop"].append(old_loop(cfg, Path(args.root), total, max(args.epochs, 2), device, bf16))
        line = ", ".join(f"{k}={v[-1]:.0f}" for k, v in runs.items())
        steal = ", ".join(f"{100 * v[-1]:.0f}%" for v in stolen.values() if v)
        print(f"  repeat {r + 1}: {line} images/s (CPU time stolen by the host: {steal})", flush=True)

    names = {
        "ceiling": "(a) ceiling: bare loop, pre-made batches",
        "fit": "(b) python -m training fit, no augmentation",
        "fit_aug": "(b) python -m training fit, augmentation",
        "old_loop": "(a') the old plain loop (before #25)",
    }
    ceiling = runs["ceiling"]
    print()
    head = f"{'run':<46}{'images/s':>9}{'spread':>13}{'spread %':>9}{'ratio':>7}{'ratios':>12}{'target':>8}"
    print(head + "   per-repeat ratio")
    for key, vals in runs.items():
        med = median(vals)
        spread = f"{min(vals):.0f}-{max(vals):.0f}"
        pct = f"{100 * (max(vals) - min(vals)) / med:.0f}%"
        line = f"{names[key]:<46}{med:>9.0f}{spread:>13}{pct:>9}"
        if key != "ceiling":
            ratios = [v / c for v, c in zip(vals, ceiling, strict=True)]
            target = f">={TARGETS[key]}" if key in TARGETS else ""
            rr = f"{min(ratios):.2f}-{max(ratios):.2f}"
            line += f"{med / median(ceiling):>7.2f}{rr:>12}{target:>8}   " + " ".join(f"{q:.2f}" for q in ratios)
        print(line)
    print("ratio: median of the run / median of the ceiling; ratios: min-max of the per-repeat ratios")
    shares = {k: [100 * v for v in vals if v == v] for k, vals in stolen.items() if vals}  # v == v: not nan
    if any(shares.values()):  # a virtual machine whose host takes CPU time makes every number noisier
        print("CPU time stolen by the host, min-max per run: " + ", ".join(
            f"{k} {min(v):.0f}-{max(v):.0f}%" for k, v in shares.items() if v))  # fmt: skip
    if "fit_aug" in runs:
        print(f"augmentation: {AUGMENT}")


if __name__ == "__main__":
    main()
