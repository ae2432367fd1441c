"""Small writers for the per-epoch tables DVC plots read, and the git revision
that registered models and benchmark results record."""

from __future__ import annotations

import csv
import io
import subprocess
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


def git_revision(repo: Path) -> str | None:
    """The commit checked out in ``repo``; None outside a git work tree or without git."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
