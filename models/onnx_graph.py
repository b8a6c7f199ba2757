"""A bundle's network as an ONNX graph that computes what ``models.heads.predict`` computes.

    >>> from models.onnx_graph import export_onnx, open_session
    >>> info = export_onnx(net, "model.onnx", task="classification", bins=None, tta=["hflip"], input_shape=(1, 28, 28))
    >>> session = open_session(Path("model.onnx").read_bytes(), threads=1)
    >>> session.run(None, {"input": batch.numpy()})[0]          # (B, C, H, W) -> (B, N) probabilities

The graph takes the preprocessed batch ``(B, C, H, W)`` float32 (dynamic ``B``) and returns class
probabilities ``(B, N)`` or values ``(B,)``, with the test-time augmentation (flip averaging)
inside, so ONNX Runtime, Triton, OpenVINO or a browser runtime give what the service gives.
Clamping a regression value to the target's range is left to the caller (``serving.predictor``).
Export checks the graph against the torch module in ONNX Runtime on random batches of two sizes
and raises ``OnnxMismatch`` naming the difference when it is over the tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.heads import predict

ONNX_FILE = "model.onnx"
OPSET = 17
INPUT, OUTPUT = "input", "output"
TOLERANCE = {"classification": 1e-4, "regression": 1e-3}  # probabilities / values (years)


class OnnxMismatch(ValueError):
    """The exported graph does not compute what the torch module computes (or does not export at all)."""


class Prediction(nn.Module):
    """``net`` followed by the bundle's decoding and test-time augmentation: what the service reports."""

    def __init__(self, net: nn.Module, task: str, bins: torch.Tensor | None = None, tta: Sequence[str] = ()) -> None:
        super().__init__()
        self.net, self.task, self.tta = net, task, list(tta)
        self.register_buffer("bins", None if bins is None else bins.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N) probabilities or (B,) values
        return predict(self.net, x, self.task, self.bins, self.tta)


def open_session(model: bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session over the graph ``model`` (bytes), ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no per-session warnings about unused initializers
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Warnings, and whatever the exporters print to stdout/stderr (a failing trace prints its whole graph
    from C++), kept from the user: the caller reports a failure as one line."""
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings and the exporters' deprecation notes
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(null.fileno(), 1), os.dup2(null.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


def _to_bytes(module: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """``module`` traced on ``example`` into ONNX bytes, the batch axis dynamic, and which exporter wrote them.

    The TorchScript-based exporter first (0.1-4 s for the networks here, against 2-8 s); what it
    cannot express (adaptive pooling to a size that does not divide the input, as in AlexNet at
    small inputs) goes through the ``torch.export``-based one (``onnxscript``). When both fail, the
    first one's error is raised: it names the operator.
    """
    with _silenced():
        buf = io.BytesIO()
        try:
            torch.onnx.export(
                module,
                (example,),
                buf,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
            return buf.getvalue(), "torch.onnx.export (TorchScript-based)"
        except Exception as first:  # noqa: BLE001 - an op it cannot express: the other exporter
            try:
                program = torch.onnx.export(
                    module,
                    (example,),
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                    opset_version=max(OPSET, 18),  # the lowest opset the torch.export-based exporter writes
                    dynamo=True,
                    verbose=False,
                )
            except Exception:  # noqa: BLE001
                raise first from None
            return program.model_proto.SerializeToString(), "torch.onnx.export (torch.export-based)"


def _opset(data: bytes) -> int:
    """The default-domain opset the graph ``data`` declares."""
    import onnx

    model = onnx.load_model_from_string(data)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)


def export_onnx(
    net: nn.Module,
    out: str | Path,
    *,
    task: str,
    bins: Sequence[float] | None,
    tta: Sequence[str],
    input_shape: tuple[int, int, int],
) -> dict[str, Any]:
    """Write ``net`` + decoding + ``tta`` to ``out`` as ONNX, checked against torch; its ``bundle.json`` entry.

    ``input_shape`` is ``(C, H, W)``. The check runs ONNX Runtime and the torch module on the same
    random batches of 1 and 3 images; ``OnnxMismatch`` when the largest difference is over
    ``TOLERANCE[task]`` (nothing is written then). ``net`` itself is left as it was (a CPU copy is
    exported).
    """
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    module = Prediction(copy.deepcopy(net).float().cpu(), task, torch.tensor(bins) if bins else None, tta).eval()
    gen = torch.Generator().manual_seed(0)
    try:
        data, exporter = _to_bytes(module, torch.randn(2, *input_shape, generator=gen))
        session = open_session(data)
    except Exception as e:  # noqa: BLE001 - any exporter or runtime failure: one line naming it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OnnxMismatch(f"{ONNX_FILE}: the network does not export to ONNX ({type(e).__name__}: {msg})") from None
    diff = 0.0
    for n in (1, 3):
        x = torch.randn(n, *input_shape, generator=gen)
        with torch.inference_mode():
            want = module(x).numpy()
        got = session.run(None, {INPUT: x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxMismatch(f"{ONNX_FILE}: output shape {got.shape} differs from torch's {want.shape} (batch {n})")
        diff = max(diff, float(np.abs(got - want).max()))
    if not diff <= TOLERANCE[task]:  # also catches NaN
        raise OnnxMismatch(
            f"{ONNX_FILE}: ONNX Runtime's output differs from torch's by {diff:.3g} (tolerance {TOLERANCE[task]:g})"
        )
    Path(out).write_bytes(data)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "opset": _opset(data),
        "input": INPUT,
        "output": OUTPUT,
        "checked_max_abs_diff": diff,
        "exporter": f"{exporter}, torch {torch.__version__}",
    }
