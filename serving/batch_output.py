"""The batch script's output, the same for every engine (``serving.batch``, ``serving.batch_ray``): the
``--output`` check, the columns of the rows (``to_table``) and whole-or-nothing writes (``write_outputs``).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from serving.predictor import Predictor


class FatalError(Exception):
    """A problem that stops the run: printed as one ``error: ...`` line, exit status 1."""


def is_dataset(spec: str | Path) -> bool:
    """An ``--output`` ending in ``/`` names a Parquet dataset folder (one file per block)."""
    return str(spec).endswith(("/", os.sep))


def check_output(spec: str) -> Path:
    """``FILE.csv``, ``FILE.parquet`` or ``DIR/`` (a Parquet dataset folder, which must not exist yet)."""
    out = Path(spec)
    if is_dataset(spec):
        if out.exists():
            raise FatalError(f"--output {spec}: already exists (a dataset folder is written whole; remove it first)")
    elif out.suffix.lower() not in (".csv", ".parquet"):
        raise FatalError(
            f"--output {spec}: the name must end in .csv or .parquet, or in / for a Parquet dataset folder"
        )
    elif out.is_dir():
        raise FatalError(f"--output {spec}: is a folder")
    if not out.parent.is_dir():
        raise FatalError(f"--output {spec}: folder {out.parent} does not exist")
    return out


def temp_name(out: Path) -> Path:
    """Where ``out`` is written before it is renamed into place (same folder, so the rename is atomic)."""
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def write_outputs(
    blocks: Iterable[pd.DataFrame],
    outputs: Sequence[tuple[str, Path]],
    rows_per_file: float = math.inf,
    keep_table: bool = False,
) -> tuple[pd.DataFrame | None, int, int, int]:
    """Write blocks of rows to every ``(spec, path)`` output under its temporary name, then rename each into place:
    whole outputs or none (temporaries removed on failure). Dataset folders get the blocks as they come, a part
    file per ``rows_per_file`` rows or more; single files get the whole table, kept only when one of them or
    ``keep_table`` needs it. -> (that table or None, rows, rows of unreadable files, rows without a face)."""
    folders = [temp_name(out) for spec, out in outputs if is_dataset(spec)]
    keep = keep_table or len(folders) < len(outputs)
    frames, pending, parts, rows, bad, faceless = [], [], 0, 0, 0, 0

    def flush() -> None:
        nonlocal parts, pending
        if pending and folders:
            part = pd.concat(pending, ignore_index=True)
            for folder in folders:
                part.to_parquet(folder / f"part-{parts:05d}.parquet", index=False)
            parts += 1
        pending = []

    try:
        for folder in folders:
            folder.mkdir()
        for block in blocks:
            errors, no_face = int(block["error"].notna().sum()), int((block["error"] == NO_FACE).sum())
            rows, bad, faceless = rows + len(block), bad + errors - no_face, faceless + no_face
            if keep:
                frames.append(block)
            pending.append(block)
            if sum(len(f) for f in pending) >= rows_per_file:
                flush()
        flush()
        table = pd.concat(frames, ignore_index=True) if keep else None
        for spec, out in outputs:
            if not is_dataset(spec) and out.suffix.lower() == ".parquet":
                table.to_parquet(temp_name(out), index=False)
            elif not is_dataset(spec):
                table.to_csv(temp_name(out), index=False)
        for _, out in outputs:
            os.replace(temp_name(out), out)
    except BaseException:
        for _, out in outputs:  # the temporaries written so far: files or dataset folders
            tmp = temp_name(out)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        raise
    return table, rows, bad, faceless


FACE_COLUMNS = {**dict.fromkeys(["face", "box_x0", "box_y0", "box_x1", "box_y1"], "Int64"), "face_score": "float64"}
NO_FACE = "no face found"


def to_table(rows: Sequence[dict[str, Any]], predictor: Predictor, top_k: int) -> pd.DataFrame:
    """Rows -> a frame with exactly the output columns in order, with their dtypes (empty cells: NA): the same for
    every engine and every block."""
    if predictor.task == "classification":
        cols = {"label": "string", "score": "float64"}
        for j in range(1, max(1, min(top_k, predictor.num_classes)) + 1):
            cols |= {f"top{j}_label": "string", f"top{j}_score": "float64"}
    else:
        cols = {predictor.target_name: "float64"}
    cols = {"path": "string", **(FACE_COLUMNS if predictor.uses_faces else {}), **cols, "error": "string"}
    return pd.DataFrame(list(rows)).reindex(columns=list(cols)).astype(cols)
