"""The classic CNN line side by side on Fashion-MNIST: parameters, multiply-adds, seconds per epoch, test accuracy.

    DATASETS_DIR=../shared/datasets python benchmarks/compare_architectures.py                 # full run
    DATASETS_DIR=../shared/datasets python benchmarks/compare_architectures.py --quick         # smoke test
    python benchmarks/compare_architectures.py --from-json docs/arch_compare.json --out-md table.md  # re-render

Every model (default: lenet5, simple_cnn, alexnet_small, vgg_small_bn, inception_small,
resnet18) is trained by ``python -m training fit`` in a subprocess from one shared base config
(written to ``<work-dir>/base.yaml``): the data block of ``configs/fashion_mnist_cnn.yaml``
(same seed, same train/val split, same batch size, no augmentation, 28x28 input), AdamW with
a cosine schedule over the same number of epochs, no early stopping. Only the network changes
(``--model.init_args.net NAME``, its ``net_kwargs``: simple_cnn keeps the ReLU + BatchNorm of
its config, the others use their defaults).

Multiply-adds are counted for one 1x28x28 image with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions and linear layers; MACs = FLOPs / 2). Seconds per epoch is the median over epochs
of the training batches' time (``benchmarks/_timing.EpochTimer``: no start-up, validation or
test). Test accuracy is ``test/acc`` of the exported bundle (the best validation epoch's weights
on the 10,000 test images). Results go to a JSON file (after every model, so a partial run keeps
what it has), a markdown table (stdout and ``--out-md``) and a plot of accuracy against MACs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402, F401  (registers every architecture)
from models.registry import get_model  # noqa: E402

DEFAULT_MODELS = ["lenet5", "simple_cnn", "alexnet_small", "vgg_small_bn", "inception_small", "resnet18"]
DATA_CONFIG = ROOT / "configs" / "fashion_mnist_cnn.yaml"  # its data block (and simple_cnn's kwargs) is shared
LR, WEIGHT_DECAY = 1e-3, 5e-4


def count_params_macs(
    name: str, net_kwargs: dict | None = None, in_channels: int = 1, size: int = 28, num_outputs: int = 10
) -> tuple[int, int]:
    """(trainable parameters, multiply-adds for one ``in_channels x size x size`` image) of a registered model."""
    net = get_model(name, in_channels=in_channels, num_outputs=num_outputs, **(net_kwargs or {})).eval()
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, in_channels, size, size))  # (1, C, H, W) -> (1, num_outputs)
    return params, counter.get_total_flops() // 2


def model_kwargs(name: str) -> dict:
    """net_kwargs per model: simple_cnn keeps those of its Fashion-MNIST config, the rest use their defaults."""
    if name == "simple_cnn":
        return dict(yaml.safe_load(DATA_CONFIG.read_text())["model"]["init_args"].get("net_kwargs") or {})
    return {}


def base_config(epochs: int, batch_size: int | None, seed: int) -> dict[str, Any]:
    """The one config every model trains from (the network is set per run on the command line)."""
    data = yaml.safe_load(DATA_CONFIG.read_text())["data"]
    data.setdefault("init_args", {})
    data["init_args"]["seed"] = seed  # the train/val split
    data["init_args"].pop("augment", None)  # no augmentation: the architectures are compared, not recipes
    if batch_size:
        data["init_args"]["batch_size"] = batch_size
    return {
        "seed_everything": seed,
        "early_stopping_patience": None,
        "trainer": {"max_epochs": epochs},
        "model": {
            "class_path": "training.ImageClassifier",
            "init_args": {
                "net": "simple_cnn",  # replaced per run
                "optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": LR, "weight_decay": WEIGHT_DECAY},
                },
                "lr_scheduler": {
                    "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "init_args": {"T_max": epochs},  # per epoch: the same schedule for every model
                },
                "scheduler_interval": "epoch",
            },
        },
        "data": data,
    }


def train(name: str, base: Path, work: Path, root: Path, quick: bool, threads: int | None, log: Path) -> dict[str, Any]:
    """Train ``name`` with ``python -m training fit``; seconds per epoch and test metrics from its outputs."""
    run = f"compare_{name}"
    timing = work / f"{run}_epochs.json"
    bundle_json = work / "artifacts" / run / "bundle.json"
    for stale in (timing, bundle_json):
        stale.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "training", "fit", "-c", str(base),
        "--name", run,
        "--data.root", str(root),
        "--model.init_args.net", name,
        "--model.init_args.net_kwargs", json.dumps(model_kwargs(name)),
        "--trainer.callbacks+=_timing.EpochTimer",
    ]  # fmt: skip
    if quick:
        cmd += ["--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]
    if threads:
        cmd.append(f"--num_threads={threads}")
    path = [str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")]  # _timing.EpochTimer
    env = {
        **os.environ,
        "SVERTKA_BENCH_OUT": str(timing),
        "SVERTKA_OUTPUT_DIR": str(work),
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
    }
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not timing.is_file() or not bundle_json.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"error: training {name} failed (exit code {proc.returncode}); log {log}:\n{tail}")
    epochs = json.loads(timing.read_text())
    metrics = json.loads(bundle_json.read_text()).get("metrics", {})
    if "test/acc" not in metrics:
        sys.exit(f"error: {bundle_json} has no test/acc (was the test split found?)")
    return {
        "seconds_per_epoch": statistics.median(e["seconds"] for e in epochs),
        "epoch_seconds": [round(e["seconds"], 2) for e in epochs],
        "wall_seconds": round(wall, 1),
        "test_acc": metrics["test/acc"],
        "test_f1": metrics.get("test/f1"),
        "val_acc": metrics.get("val/acc"),
        "bundle": str(bundle_json.parent),
    }


def render_table(results: dict[str, Any]) -> str:
    """Markdown table of the results, one row per model in run order."""
    lines = [
        "| model | parameters | multiply-adds (1x28x28) | s / epoch | test accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results["models"]:
        spe = f"{r['seconds_per_epoch']:.1f}" if r.get("seconds_per_epoch") is not None else "-"
        acc = f"{100 * r['test_acc']:.2f} %" if r.get("test_acc") is not None else "-"
        lines.append(f"| `{r['name']}` | {r['params']:,} | {r['macs'] / 1e6:,.2f} M | {spe} | {acc} |")
    s = results.get("settings", {})
    if s:
        lines += [
            "",
            f"Fashion-MNIST, 28x28, {s.get('epochs')} epoch(s) per model, batch {s.get('batch_size')}, "
            f"{s.get('optimizer')}, "
            f"seed {s.get('seed')}{' (QUICK smoke run: not real numbers)' if s.get('quick') else ''}; "
            f"s / epoch: median time of an epoch's training batches (no validation), {s.get('threads')} torch "
            f"threads on {s.get('cpu')}, torch {s.get('torch')}. Test accuracy: the best validation epoch's "
            "weights on the 10,000 test images.",
        ]
    return "\n".join(lines)


def render_plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy (%) against multiply-adds per image (log scale), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in results["models"] if r.get("test_acc") is not None]
    if not rows:
        return
    xs = [r["macs"] / 1e6 for r in rows]
    ys = [100 * r["test_acc"] for r in rows]
    span_x = math.log10(max(xs) / min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    above: list[tuple[float, float]] = []  # points whose label went above them (highest point first)
    for r, x, y in sorted(zip(rows, xs, ys, strict=True), key=lambda t: -t[2]):
        ax.scatter(x, y, s=30 + 60 * (r["params"] / max(q["params"] for q in rows)) ** 0.5, zorder=3)
        crowded = any(  # a higher point close by: this label goes below its point
            abs(math.log10(x / px) / span_x) < 0.25 and abs(y - py) / span_y < 0.1 for px, py in above
        )
        if not crowded:
            above.append((x, y))
        ax.annotate(
            r["name"], (x, y), textcoords="offset points", xytext=(0, -15 if crowded else 7), ha="center", fontsize=9
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("multiply-adds per 1x28x28 image (millions, log scale)")
    ax.set_ylabel("test accuracy (%)")
    s = results.get("settings", {})
    epochs = s.get("epochs")
    quick = " QUICK smoke run," if s.get("quick") else ""
    ax.set_title(
        f"Fashion-MNIST,{quick} {epochs} epoch{'s' * (epochs != 1)} each (point area ~ parameters)", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.15, y=0.1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: dict[str, Any], json_path: Path | None, md_path: Path | None, plot: Path | None) -> str:
    """Write the results JSON, the markdown table and the plot (each where given); return the table."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    table = render_table(results)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(table + "\n")
    if plot:
        render_plot(results, plot)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="registry names, in table order")
    p.add_argument("--epochs", type=int, default=10, help="epochs per model (the same for all)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the data block's (fashion_mnist_cnn.yaml)")
    p.add_argument("--seed", type=int, default=42, help="seed of the weights and of the train/val split")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--root", type=Path, default=os.environ.get("DATASETS_DIR"), help="data root ($DATASETS_DIR)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "arch_compare", help="runs, bundles, logs")
    p.add_argument("--json", type=Path, default=None, help="results file (default: docs/arch_compare.json)")
    p.add_argument("--plot", type=Path, default=None, help="plot file (default: docs/img/arch_compare.png)")
    p.add_argument("--out-md", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch of 5 batches (outputs under --work-dir)")
    p.add_argument("--from-json", type=Path, default=None, help="re-render table and plot from a results file")
    args = p.parse_args()

    if args.from_json:
        if not args.from_json.is_file():
            sys.exit(f"error: --from-json {args.from_json}: no such file")
        try:
            results = json.loads(args.from_json.read_text())
            print(write_outputs(results, None, args.out_md, args.plot or ROOT / "docs" / "img" / "arch_compare.png"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            sys.exit(f"error: --from-json {args.from_json}: not a results file of this script ({e})")
        return

    work = args.work_dir.resolve()
    quick_dir = work / "quick"
    json_path = args.json or (quick_dir / "arch_compare.json" if args.quick else ROOT / "docs" / "arch_compare.json")
    plot = args.plot or (quick_dir / "arch_compare.png" if args.quick else ROOT / "docs" / "img" / "arch_compare.png")
    if args.root is None or not (Path(args.root) / "FashionMNIST" / "raw").is_dir():
        sys.exit("error: --root / DATASETS_DIR must hold FashionMNIST/raw (the real Fashion-MNIST)")
    if args.epochs < 1:
        sys.exit(f"error: --epochs must be >= 1, got {args.epochs}")
    try:  # fail on a bad name before any training
        sizes = {name: count_params_macs(name, model_kwargs(name)) for name in args.models}
    except (ValueError, RuntimeError) as e:  # unknown name, or a model that cannot take 1x28x28
        sys.exit(f"error: --models: {' '.join(str(e).split())[:300]}")

    epochs = 1 if args.quick else args.epochs
    base = base_config(epochs, args.batch_size, args.seed)
    work.mkdir(parents=True, exist_ok=True)
    base_path = work / "base.yaml"
    base_path.write_text(yaml.safe_dump(base, sort_keys=False))
    settings = {
        "epochs": epochs,
        "batch_size": base["data"]["init_args"].get("batch_size"),
        "optimizer": f"AdamW lr {LR:g} wd {WEIGHT_DECAY:g}, cosine",
        "seed": args.seed,
        "augment": None,
        "quick": args.quick,
        "threads": args.threads or torch.get_num_threads(),
        "cpu": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/compare_architectures.py", *sys.argv[1:]]),
    }
    results: dict[str, Any] = {"settings": settings, "models": []}
    for name in args.models:
        params, macs = sizes[name]
        print(f"{name}: {params:,} parameters, {macs / 1e6:.2f} M multiply-adds; training...", flush=True)
        row = {"name": name, "net_kwargs": model_kwargs(name), "params": params, "macs": macs}
        row |= train(name, base_path, work, Path(args.root).resolve(), args.quick, args.threads, work / f"{name}.log")
        print(f"  {row['seconds_per_epoch']:.1f} s/epoch, test acc {row['test_acc']:.4f}", flush=True)
        results["models"].append(row)
        write_outputs(results, json_path, None, None)  # keep what is done
    print(write_outputs(results, json_path, args.out_md, plot))
    print(f"\nresults: {json_path}\nplot: {plot}")


if __name__ == "__main__":
    main()
