"""MAE pre-training below the stage: the optimizer, the fast path's switches, the
on-device augmentation, the loader, and the loop itself (``train_one_epoch``, built
on ``train_step``), shared by the `pretrain` stage and
``benchmarks/pretrain_throughput.py``, so that both run the same code.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from mae_ops.config import InputError, PretrainConfig
from mae_ops.data import WINDOW_SHARDS, DeviceBatches, PreparedData, batch_loader, normalize, random_resized_crop

# as the reference code applies it: no decay on biases and norms (1-D), decay on everything
# else, cls_token and mask_token included (the fixed sin-cos position embeddings are not trained)
NO_WEIGHT_DECAY: tuple[str, ...] = ()


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile of the whole forward, loss included (the MAE returns it)."""
    return torch.compile(model, mode=None if mode == "default" else mode)


# kept in bf16: the first and last layers of the decoder (the pixel prediction is the loss's input)
FP8_KEEP_HIGH_PRECISION = ["decoder_embed", "decoder_pred"]


def use_fp8(model: torch.nn.Module, device: torch.device) -> int:
    """FP8 matmuls (torchao float8 training, dynamic tensorwise scaling) in the linear
    layers large enough to gain by torchao's own H100 measurements; returns how many.
    Same parameters and state_dict keys: checkpoints stay interchangeable with bf16."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise InputError("pretrain.fp8 needs a CUDA GPU of compute capability 8.9 or newer (L4, L40, H100, H200)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear_utils import _auto_filter_for_recipe
    except ImportError as e:
        raise InputError("pretrain.fp8 needs torchao (pip install 'mae-ops[fp8]')") from e
    before = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
        module_filter_fn=_auto_filter_for_recipe("tensorwise", FP8_KEEP_HIGH_PRECISION),
    )  # fmt: skip
    return before - sum(type(m) is torch.nn.Linear for m in model.modules())


def augment(
    imgs: torch.Tensor, p: PretrainConfig, img_size: int, mean: torch.Tensor, std: torch.Tensor,
    num_patches: int, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """uint8 batch on the device -> (normalised crops, masking noise), all on the device."""
    x = imgs.float().div_(255.0)
    x = random_resized_crop(x, img_size, p.crop_scale, hflip=p.hflip, generator=generator)
    x = normalize(x, mean, std)
    noise = torch.rand(x.shape[0], num_patches, device=x.device, generator=generator)
    return x, noise


def use_windows(p: PretrainConfig, data: PreparedData, ids: np.ndarray) -> bool:
    """pretrain.shuffle on the host path: 'auto' reads shard windows when the images take
    more than half the RAM (random single rows from a disk are ~40x slower than sequential)."""
    if p.shuffle != "auto":
        return p.shuffle == "windows"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(ids) * int(np.prod(data.images.shape[1:])) > ram / 2


def make_loader(
    data: PreparedData, ids: np.ndarray, batch_size: int, device: torch.device, fast: bool, num_workers: int,
    windows: bool = False, **shard,
) -> DataLoader | DeviceBatches:  # fmt: skip
    """The fast path serves batches from the device when the images fit there (in
    DistributedSampler's exact order); otherwise (and on the plain path) they stream from
    the host memmap, a few shards at a time with ``windows``."""
    if fast and DeviceBatches.fits(data, ids, device):
        return DeviceBatches(data, ids, batch_size, device, **shard)
    return batch_loader(data, ids, batch_size, num_workers=num_workers, window_shards=WINDOW_SHARDS * windows,
                        **shard)  # fmt: skip


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """All randomness of an epoch (crops, flips, masks) comes from this generator,
    so a resumed run replays exactly what an uninterrupted one would have."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + rank)


@dataclass
class Trainer:
    """What one pre-training update needs."""

    model: torch.nn.Module  # the module the step runs: the MAE, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    autocast: Callable[[], contextlib.AbstractContextManager]
    mask_ratio: float
    accum_iter: int = 1
    scheduler: CosineLRScheduler | None = None  # stepped per update


def train_step(t: Trainer, x: torch.Tensor, noise: torch.Tensor, update: bool = True,
               sync: bool = True) -> torch.Tensor:  # fmt: skip
    """Forward and backward of one augmented batch (the loss divided by ``accum_iter``);
    with ``update``, the optimizer step. ``sync`` False keeps DDP's gradients local
    (between the updates of an accumulation). Returns the loss, on the device."""
    with t.autocast(), contextlib.nullcontext() if sync else t.model.no_sync():
        loss, _, _ = t.model(x, t.mask_ratio, noise)
        t.scaler.scale(loss / t.accum_iter).backward()
    if update:
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_one_epoch(
    t: Trainer, loader: DataLoader | DeviceBatches, inputs: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    epoch: int, distributed: bool = False,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """One pass over ``loader``: ``inputs`` turns a uint8 batch into (augmented images,
    masking noise) on the device; an update every ``accum_iter`` batches and after the
    last. Returns the summed loss (on the device: no sync per step) and the images seen."""
    batches = len(loader)
    updates_per_epoch = math.ceil(batches / t.accum_iter)
    loss_sum, seen = None, 0
    for step, (imgs, _) in enumerate(loader):
        x, noise = inputs(imgs)
        update = (step + 1) % t.accum_iter == 0 or step + 1 == batches
        if update and t.scheduler is not None:
            t.scheduler.step_update(epoch * updates_per_epoch + step // t.accum_iter)
        loss = train_step(t, x, noise, update=update, sync=update or not distributed)
        if loss_sum is None:
            loss_sum = torch.zeros((), device=loss.device)  # fp32, whatever the autocast dtype
        loss_sum += loss  # stays on the device: no sync per step
        seen += x.shape[0]
    return (loss_sum if loss_sum is not None else torch.zeros(())), seen
