"""Pieces every trainer shares: run fingerprints, resumable checkpoints, saving a run's
progress and resuming from it, the per-step cosine schedule."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler

from mae_ops import runtime
from mae_ops.errors import UserError
from mae_ops.models.checkpoint import CheckpointError, read_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


class ResumeError(UserError, RuntimeError):
    """--resume was asked for but no checkpoint of this very run exists, or the
    checkpoint is unreadable."""


def fingerprint(payload: Any) -> str:
    """Short stable hash of JSON-able data: identifies a run's params and data."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpointer:
    """Atomic resumable checkpoints, refused when they belong to another run."""

    def __init__(self, path: str | Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id

    def load(self, required: bool = False) -> dict | None:
        if not self.path.exists():
            if required:
                raise ResumeError(f"--resume: no checkpoint at {self.path}")
            return None
        try:
            ckpt = read_checkpoint(self.path)
        except CheckpointError as exc:  # never silently start over on top of it
            raise ResumeError(f"cannot resume: {exc}") from exc
        if ckpt.get("args", {}).get("fingerprint") != self.run_id:
            if required:
                raise ResumeError(
                    f"--resume: {self.path} belongs to a different run (params or data changed); "
                    "remove it or restore the params it was made with"
                )
            log.info("ignoring %s: it belongs to a different run", self.path)
            return None
        return ckpt

    def save(self, state: dict) -> None:
        state.setdefault("args", {})["fingerprint"] = self.run_id
        write_checkpoint(self.path, state)


def save_progress(
    checkpointer: Checkpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, epoch: int, history: list[dict], **args: Any,
) -> None:  # fmt: skip
    """The run's state after ``epoch`` (counted from 0): what ``resume`` reads back, with
    ``args`` (and the history so far) for whoever reads the checkpoint later."""
    checkpointer.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                       "scaler": scaler.state_dict(), "args": {**args, "history": history}})  # fmt: skip


def resume(
    checkpointer: Checkpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, rt: runtime.Runtime, *, setting: str, required: bool = False,
) -> tuple[int, list[dict]]:  # fmt: skip
    """(first epoch to run, history so far) from the run's last checkpoint, its weights,
    optimizer and loss scaler loaded; (0, []) without one. Every process must find the same
    checkpoint: ``setting`` is the key that puts them on a disk every node sees."""
    start_epoch, history = 0, []
    ckpt = checkpointer.load(required=required)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = int(ckpt["epoch"]) + 1, list(ckpt["args"].get("history", []))
    if not runtime.agree(start_epoch, rt):
        raise ResumeError(f"the ranks found different checkpoints in {checkpointer.path.parent}: with several "
                          f"nodes, {setting} must be on a disk every node sees")  # fmt: skip
    return start_epoch, history


def cosine_schedule(
    optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int, warmup_epochs: float, min_lr: float
) -> CosineLRScheduler:
    """Linear warm-up then cosine decay, stepped per update with ``step_update(n)``.
    Honours timm's per-group ``lr_scale`` (layer decay)."""
    total = epochs * updates_per_epoch
    warmup = min(round(warmup_epochs * updates_per_epoch), total - 1)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=min_lr, warmup_t=warmup,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
