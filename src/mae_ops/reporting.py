"""What a run reports: the per-epoch tables DVC plots read, the git revision
that registered models and benchmark results record, and the log setup."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import subprocess
from pathlib import Path

import numpy as np

from mae_ops.atomic import write_text
from mae_ops.errors import UserError

MONITOR_PREDICTIONS = "monitor_predictions.csv"  # in pretrain.reports_dir: the final monitor's classes
VAL_PREDICTIONS = "val_predictions.csv"  # in finetune.reports_dir: the fine-tuned model's classes
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(fmt: str = LOG_FORMAT) -> None:
    """Our own INFO, others' warnings: the ONNX exporter's optimiser and onnxruntime's
    quantiser log a line per weight at INFO (hundreds per export), which buried the stages' logs."""
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("mae_ops").setLevel(logging.INFO)


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


def write_predictions(dest: str | Path, ids: np.ndarray, labels: np.ndarray, preds: dict[str, np.ndarray]) -> None:
    """Each validation image's class under each model (columns id, label, then one per
    model): the study pairs two runs image by image, far finer than two accuracies."""
    table = {"id": ids, "label": labels, **preds}
    buf = io.StringIO()
    buf.write(",".join(table) + "\n")
    for row in zip(*table.values(), strict=True):
        buf.write(",".join(str(int(v)) for v in row) + "\n")
    write_text(dest, buf.getvalue())


def read_predictions(text: str) -> dict[str, np.ndarray]:
    """The columns of a ``write_predictions`` table, as int64 arrays."""
    header, *rows = text.strip().splitlines()
    names = header.split(",")
    values = np.array([r.split(",") for r in rows], dtype=np.int64).reshape(len(rows), len(names))
    return {name: values[:, i] for i, name in enumerate(names)}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: str | Path | None, key: str) -> str | None:
    """The SHA-256 of the checkpoint a run starts from (None for none), so that runs
    are keyed by the weights, not by the file's name; ``key`` names the param."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"{key}: {path} is not a file (an MAE checkpoint such as mae_pretrain_vit_base_full.pth)")
    return file_sha256(path)


def git_revision(repo: Path) -> str | None:
    """The commit checked out in ``repo``; None outside a git work tree or without git."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
