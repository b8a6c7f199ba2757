"""Print what a bundle holds: task, architecture, classes or target, metrics, and where it is.

python -m training.show artifacts/quickstart
"""

from __future__ import annotations

import argparse
import sys

from models.bundle import BundleError, read_meta


def describe(path: str) -> str:
    """A few readable lines about the bundle at ``path`` (``BundleError`` if it is not one)."""
    meta = read_meta(path)
    arch = meta.architecture
    kwargs = ", ".join(f"{k}={v}" for k, v in arch["kwargs"].items())
    lines = [f"Bundle:       {meta.path}", f"Task:         {meta.task}", f"Architecture: {arch['name']}({kwargs})"]
    if meta.class_names:
        shown = ", ".join(meta.class_names[:12]) + (", ..." if len(meta.class_names) > 12 else "")
        lines.append(f"Classes:      {len(meta.class_names)} ({shown})")
    if meta.target:
        lines.append(f"Target:       {meta.target.get('name', 'y')} in [{meta.target['min']}, {meta.target['max']}]")
    p = meta.preprocess
    lines.append(f"Input:        {p.channels} x {p.input_size[0]} x {p.input_size[1]} ({p.resize})")
    order = sorted(meta.metrics, key=lambda k: (not k.startswith("test/"), k))
    for k in order:
        if not k.endswith("loss"):
            lines.append(f"  {k:<12} {meta.metrics[k]:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.show", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle folder (e.g. artifacts/quickstart)")
    args = parser.parse_args(argv)
    try:
        print(describe(args.bundle))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
