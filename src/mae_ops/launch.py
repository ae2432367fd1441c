"""One DDP process per local device, started by a stage itself with PyTorch's elastic
launcher (the engine torchrun runs), so `dvc repro` and `mae-ops pipeline` use the
whole box and DVC records the run as usual.

A stage calls ``run_ranks(fn, args, nproc)``: with ``nproc`` 1, or inside a launch
someone else made (torchrun on each node of a cluster), ``fn`` runs here; otherwise
the elastic agent spawns ``nproc`` processes that meet by c10d rendezvous on a free
localhost port (torchrun --standalone) and watches them; when one dies all stop and,
for a run that resumes from its checkpoint, are started again (``MAX_RESTARTS``), so
it survives the loss of any rank. Rank 0's return value comes back; a ``UserError`` raised in the
ranks is raised here again, as itself.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mae_ops import runtime
from mae_ops.config import AutoCount, InputError
from mae_ops.errors import UserError
from mae_ops.reporting import setup_logging

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # launches after the first, for a run that resumes from its last checkpoint


def launched() -> bool:
    """Whether this process is already one rank of an elastic launch (torchrun, or ours)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def resolve_nproc(nproc: AutoCount, device: str, key: str) -> int:
    """'auto': one process per visible GPU when the device may be CUDA, else 1.
    A number larger than the visible GPUs of a CUDA run is refused (naming ``key``)."""
    gpus = len(runtime.visible_gpus(device))
    if nproc == "auto":
        return max(1, gpus)
    if nproc > 1 and ":" in device:
        raise InputError(f"{key} is {nproc} but the device is pinned to {device}: use device auto or cuda")
    if gpus and nproc > gpus:
        raise InputError(f"{key} is {nproc} but {gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES)")
    return nproc


@dataclass(frozen=True)
class _Refused:
    """A rank's UserError, carried back to the launching process as a value: the
    elastic agent would otherwise restart the ranks into the same error."""

    error: UserError


def _rank_main(fn: Callable[..., Any], args: tuple, threads: int) -> Any:
    """What each spawned process runs: the stage's logging and its share of the cores."""
    setup_logging(f"%(asctime)s rank{os.environ.get('RANK', '?')} %(name)s %(message)s")
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    except UserError as exc:
        return _Refused(exc)


def run_ranks(fn: Callable[..., Any], args: tuple, nproc: int, resumable: bool, name: str) -> Any:
    """``fn(*args)`` in ``nproc`` DDP processes on this machine (or here, see the module
    doc); returns rank 0's result. A failed launch of a ``resumable`` run is started
    again, up to ``MAX_RESTARTS`` times, each time as a new launch (a fresh rendezvous and
    store: restarting inside one launch was seen to hang on a stale gloo address under load)."""
    max_restarts = MAX_RESTARTS if resumable else 0
    if nproc <= 1 or launched():
        return fn(*args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = max(1, (os.cpu_count() or 1) // nproc)
    log.info("%s: %d processes on this machine (elastic launch, c10d rendezvous)", name, nproc)
    for attempt in range(max_restarts + 1):
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"{name}-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
            start_method="spawn",
        )  # fmt: skip
        try:
            outputs = elastic_launch(config, _rank_main)(fn, args, threads)
            break
        except ChildFailedError as exc:
            first = next(iter(exc.failures.values()), None)
            msg = first.message if first else str(exc)  # torch gives the rank's error file as a dict
            why = str(msg.get("message", msg)) if isinstance(msg, dict) else str(msg)
            if attempt == max_restarts:
                raise RuntimeError(f"{name}: a rank failed {attempt + 1} time(s); the last failure:\n{why}") from exc
            log.warning("%s: a rank failed (%s); starting the %d processes again (%d of %d), from the last "
                        "checkpoint", name, why.strip().splitlines()[-1] if why.strip() else "?", nproc,
                        attempt + 1, max_restarts)  # fmt: skip
    refused = [out for out in outputs.values() if isinstance(out, _Refused)]
    if refused:
        raise refused[0].error
    return outputs[0]
