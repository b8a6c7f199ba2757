"""Data errors and the one-warning helper shared by every data module.

python -c "from data.errors import DataError; raise DataError('example')"
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence


class DataError(Exception):
    """A data set that cannot be used as configured (bad file, bad option, bad layout)."""


class MissingDataError(DataError, FileNotFoundError):
    """Expected data files are not there (the message names them and the root)."""


def warn_once(message: str, items: Sequence[str], limit: int = 10) -> None:
    """One warning listing up to ``limit`` items and the total count."""
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    warnings.warn(f"{message} ({len(items)}): {shown}", UserWarning, stacklevel=3)


__all__ = ["DataError", "MissingDataError", "warn_once"]
