"""Export a training checkpoint as a bundle, optionally into BentoML's model store.

    python -m training.export --ckpt runs/quickstart/checkpoints/last.ckpt --out artifacts/quickstart
    python -m training.export --ckpt runs/quickstart/checkpoints/last.ckpt --out artifacts/quickstart --bentoml digits
    python -m training.export --bundle artifacts/quickstart --bentoml quickstart    # an existing bundle
    python -m training.export --bundle artifacts/quickstart --onnx                  # add model.onnx to it

Needs no data module and no config: the checkpoint's ``svertka`` entry (written by
``training.ImageTask``) holds the architecture, class names or target, preprocessing and
config. Every bundle gets ``model.onnx`` (``models.onnx_graph``), checked against the torch module:
one that differs is refused with the difference. The checkpoint is read with
``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from data.preprocess import PreprocessSpec
from models.bundle import BundleError, add_onnx, read_meta, save_bundle
from models.registry import get_model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read without unpickling code (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def net_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the plain network from ``checkpoint["svertka"]`` and load its weights."""
    meta = ckpt.get("svertka")
    if not meta or "architecture" not in meta:
        raise ValueError("checkpoint has no 'svertka' metadata (was it written by training.ImageTask?)")
    net = get_model(meta["architecture"], **meta["architecture_kwargs"])
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net.eval()


def write_bundle(
    out_dir: str | Path, net: torch.nn.Module, meta: dict[str, Any], metrics: dict[str, float] | None = None
) -> Path:
    """``models.bundle.save_bundle`` from a checkpoint's ``svertka`` metadata."""
    if not meta.get("preprocess") or not meta.get("task"):
        raise ValueError("no data module metadata (task, preprocess) to export: fit or load a checkpoint first")
    return save_bundle(
        out_dir,
        net,
        task=meta["task"],
        architecture=meta["architecture"],
        architecture_kwargs=meta["architecture_kwargs"],
        preprocess=PreprocessSpec.from_dict(meta["preprocess"]),
        class_names=meta.get("class_names"),
        target=meta.get("target"),
        metrics=metrics,
        training_config=meta.get("config") or {},
        tta=meta.get("tta") or [],
        faces=meta.get("faces"),
        augmentation=meta.get("augmentation"),
    )


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the bundle for the checkpoint at ``ckpt_path`` to ``out_dir``; ``ValueError`` if unusable."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt_path}: no such file")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError):
        raise ValueError(
            f"--ckpt {ckpt_path}: not a readable checkpoint (corrupt, or holds objects other than tensors and "
            "plain types, which are never unpickled)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"--ckpt {ckpt_path}: not a Lightning checkpoint (no state_dict)")
    meta = ckpt.get("svertka")
    if not isinstance(meta, dict) or "architecture" not in meta:
        raise ValueError(f"--ckpt {ckpt_path}: no 'svertka' metadata (not written by Svertka's training)")
    try:
        net = net_from_checkpoint(ckpt)
    except RuntimeError as e:
        raise ValueError(f"--ckpt {ckpt_path}: weights do not match {meta['architecture']!r}: {e}") from None
    return write_bundle(out_dir, net, meta, meta.get("metrics") or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Lightning checkpoint written by python -m training fit (needs --out)")
    src.add_argument("--bundle", help="an existing bundle folder (with --bentoml: save it to the store)")
    parser.add_argument("--out", help="bundle folder to write from --ckpt (replaced whole)")
    parser.add_argument("--bentoml", metavar="NAME", help="also save the bundle into BentoML's model store as NAME")
    parser.add_argument(
        "--onnx", action="store_true", help="with --bundle: write model.onnx into it (bundles from --ckpt have it)"
    )
    args = parser.parse_args(argv)
    if args.ckpt and not args.out:
        parser.error("--ckpt needs --out DIR")
    if args.onnx and not args.bundle:
        parser.error("--onnx needs --bundle DIR (a bundle exported from --ckpt has model.onnx already)")
    try:
        if args.ckpt:
            out = export_checkpoint(args.ckpt, args.out)
            print(f"Bundle: {out}")
        else:
            out = Path(args.bundle)
            read_meta(out)  # BundleError naming the folder if it is not a bundle
            if args.onnx:
                onnx = add_onnx(out).onnx or {}
                print(f"{out / 'model.onnx'}: opset {onnx.get('opset')}, checked against torch (max abs diff "
                      f"{onnx.get('checked_max_abs_diff', 0):.2g})")  # fmt: skip
        if args.bentoml:
            from models.store import save_bundle_to_bentoml

            print(f"BentoML model: {save_bundle_to_bentoml(out, args.bentoml)}")
    except (ValueError, OSError, BundleError) as e:
        if os.environ.get("SVERTKA_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
