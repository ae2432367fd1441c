"""Small writers for the per-epoch tables DVC plots read."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mae_ops.atomic import write_text


def write_history(history: list[dict], dest: str | Path) -> None:
    """Per-epoch records as CSV (columns: the union of keys, in first-seen order)."""
    fields: list[str] = []
    for record in history:
        fields += [k for k in record if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    write_text(dest, buf.getvalue())
