"""Devices, mixed precision and torchrun/DDP set-up shared by the trainers."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mae_ops.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def visible_gpus(device: str = "auto") -> list[str]:
    """The GPUs a device setting may use, as CUDA_VISIBLE_DEVICES names them (their
    indices when it is unset); none on a machine without CUDA or for device 'cpu'."""
    if not (device == "auto" or device.startswith("cuda")) or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 on CUDA (no loss scaling needed), fp32 elsewhere."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


def fast_path(switch: str, device: torch.device) -> bool:
    """A section's ``fast`` switch: ``on``, ``off``, or ``auto`` = on with CUDA (same math, other kernels)."""
    return switch == "on" or (switch == "auto" and device.type == "cuda")


def loader_workers(setting: int | str, rt: Runtime) -> int:
    """A section's ``num_workers``; 'auto': the main process reads on a CPU run (workers
    would compete for its cores); on CUDA, processes that read (and augment) and pin the
    next batches while the GPU works, up to 8 per GPU process."""
    if setting != "auto":
        return int(setting)
    if rt.device.type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 1) // max(1, torch.cuda.device_count() if rt.distributed else 1)
    return max(1, min(8, per_rank - 1))


def use_fast_cuda_kernels() -> None:
    """TF32 for fp32 matmuls and convolutions; cuDNN picks the fastest conv once (fixed shapes)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def setup(device: str = "auto", amp: str = "auto") -> Runtime:
    """Single process, or one rank of a torchrun launch (env:// rendezvous)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        use_fast_cuda_kernels()
    rt = Runtime(dev, resolve_amp(amp, dev), rank, local_rank, world_size)
    if rt.is_main:
        log.info("device %s, precision %s, world size %d", dev, rt.amp_dtype or "fp32", world_size)
    return rt


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto", amp: str = "auto") -> Iterator[Runtime]:
    """``setup``, and ``teardown`` however the block ends: how every stage holds a runtime."""
    rt = setup(device, amp)
    try:
        yield rt
    finally:
        teardown()


def distribute(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """The module a training step runs across the run's processes: DDP-wrapped when there
    are several, ``model`` itself when alone."""
    if not rt.distributed:
        return model
    # gradients live in the all-reduce buckets: no copy in and out of them per step
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, gradient_as_bucket_view=True
    )


def all_reduce_mean(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= rt.world_size
    return value


def agree(value: int, rt: Runtime) -> bool:
    """Whether every rank holds the same integer (always true in one process)."""
    if not rt.distributed:
        return True
    t = torch.tensor([value, -value], device=rt.device if rt.device.type == "cuda" else None)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # max of v and of -v: equal iff min == max
    return int(t[0]) == -int(t[1])
