"""Fine-tuning and linear probing of the MAE encoder: the training library that
the `finetune` stage, the Optuna search (hpo.py) and the baselines share.

The MAE fine-tuning recipe, each part switchable in params: AdamW (0.9, 0.999),
layer-wise lr decay (timm's parameter groups), drop path, Mixup/CutMix with
label smoothing (timm), random affine / RandAugment / random erasing,
per-step cosine schedule with warm-up, bf16 autocast on GPU (fp16 with a
GradScaler). Trains on the labelled training subset, validates on the
validation split and never reads the test split. ``train_saved`` runs it in
``finetune.nproc_per_node`` DDP processes (mae_ops/launch.py) and saves the model.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import Mixup, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mae_ops import launch, runtime
from mae_ops.config import Config, FinetuneConfig, InputError, semantic_params
from mae_ops.data import (
    DeviceBatches,
    PreparedData,
    batch_loader,
    center_view,
    normalize,
    random_affine,
    random_resized_crop,
    set_epoch,
)
from mae_ops.models.checkpoint import write_checkpoint
from mae_ops.models.classifier import build_classifier, classifier_checkpoint, load_encoder
from mae_ops.tracking import EpochLog
from mae_ops.training import Checkpointer, cosine_schedule, fingerprint, resume, save_progress

log = logging.getLogger(__name__)

ReportFn = Callable[[int, float], None]  # (epoch, val top-1) -> may raise optuna.TrialPruned


@dataclass
class TrainResult:
    model: nn.Module
    args: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    val_top1: float = 0.0
    train_time_s: float = 0.0
    val_pred: np.ndarray | None = None  # the predicted class of each validation image at the last validation


# ------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class EncoderSpec:
    """The encoder a classifier starts from, resolved once by the stage: the preset and
    the weights (``path`` None: random weights, the from-scratch baseline); ``init`` is
    how the params name it (pretrain, scratch or a file), as checkpoints record it."""

    preset: str
    path: Path | None
    init: str


def encoder_spec(cfg: Config, init: str) -> EncoderSpec:
    """``init`` (``finetune.init``'s values) resolved against the project: its file must exist."""
    if init == "scratch":
        return EncoderSpec(cfg.model.preset, None, init)
    path = cfg.outputs().encoder if init == "pretrain" else Path(init)
    if not path.exists():
        hint = "run `mae-ops pretrain` first" if init == "pretrain" else "init must be pretrain, scratch or a file"
        raise InputError(f"encoder checkpoint {path} not found: {hint}")
    return EncoderSpec(cfg.model.preset, path, init)


def frozen_encoder_spec(cfg: Config) -> EncoderSpec:
    """The encoder the frozen baselines (linear probe, k-NN on features) read: the fine-tuning's,
    or the pre-trained one where fine-tuning starts from scratch (frozen random weights say nothing)."""
    return encoder_spec(cfg, "pretrain" if cfg.finetune.init == "scratch" else cfg.finetune.init)


def make_classifier(
    enc: EncoderSpec, ft: FinetuneConfig, data: PreparedData, linprobe: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    pool = ft.linprobe_pool if linprobe else ft.global_pool
    model = build_classifier(
        enc.preset, data.img_size, data.channels, len(data.classes),
        global_pool=pool, drop_path=0.0 if linprobe else ft.drop_path, linprobe=linprobe,
    )  # fmt: skip
    if enc.path is not None:
        load_encoder(model, enc.path)
    args = {
        "preset": enc.preset, "img_size": data.img_size, "in_chans": data.channels,
        "classes": data.classes, "mean": data.mean, "std": data.std, "global_pool": pool,
        "mode": "linprobe" if linprobe else "finetune", "init": enc.init,
        "finetune": ft.model_dump(mode="json"), "data_hash": data.manifest["content_hash"],
    }  # fmt: skip
    return model, args


@torch.no_grad()
def predict_proba(
    model: nn.Module, data: PreparedData, ids: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities (len(ids), classes) on un-augmented images."""
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        x = torch.from_numpy(data.eval_images[rows]).to(device)
        out.append(torch.softmax(model(normalize(x, data.mean, data.std)).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(data.classes)), dtype=np.float32)


def validate_model(
    model: nn.Module, data: PreparedData, ids: np.ndarray, device: torch.device
) -> tuple[float, np.ndarray]:
    """(top-1, predicted class of each image) on un-augmented images; top-1 is nan without images."""
    pred = predict_proba(model, data, ids, device).argmax(1)
    return (float((pred == data.labels[ids]).mean()) if len(ids) else float("nan")), pred


class HostRandAugment:
    """timm's RandAugment (PIL, per image, on the host) over a uint8 (N, C, H, W) batch: a
    loader worker's job (``batch_loader(transform=...)``). Its draws come from the batch's
    seed alone (timm draws from ``random`` and ``np.random``: seeded here, then put back,
    so Mixup's draws in the training process are not disturbed)."""

    def __init__(self, spec: str, mean: list[float]) -> None:
        fill = tuple(round(255 * m) for m in mean)
        self.transform = randaugment(spec, {"img_mean": fill if len(fill) == 3 else fill[0]})

    def __call__(self, images: np.ndarray, seed: np.random.SeedSequence) -> np.ndarray:
        saved = random.getstate(), np.random.get_state()
        py_seed, np_seed = seed.generate_state(2)
        random.seed(int(py_seed))
        np.random.seed(int(np_seed))
        try:
            out = []
            for img in images:
                pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
                arr = np.asarray(self.transform(pil), dtype=np.uint8)
                out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            return np.stack(out)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize as timm means it at every level: 0 bits kept is a black image (Pillow >= 11
    refuses 0, which timm's increasing posterize reaches at magnitude 10, e.g. m9 + mstd)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def randaugment(spec: str, hparams: dict[str, Any]) -> Callable:
    """timm's RandAugment for ``spec`` (e.g. the reference's rand-m9-mstd0.5-inc1)."""
    transform = rand_augment_transform(spec, hparams)
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)


# ------------------------------------------------------------------ training
def finetune_optimizer(model: nn.Module, ft: FinetuneConfig, lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay groups: each group's ``lr_scale`` is
    layer_decay ** (depth + 1 - layer), no weight decay on norms, biases, tokens."""
    groups = param_groups_layer_decay(
        model, ft.weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=ft.layer_decay
    )
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


@dataclass
class FinetuneStep:
    """What one fine-tuning update needs (pre-training's ``Trainer`` counterpart)."""

    model: nn.Module  # the module the step runs: the classifier, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    scheduler: CosineLRScheduler  # stepped per update
    criterion: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]


def finetune_one_epoch(
    t: FinetuneStep, loader: DataLoader | DeviceBatches,
    inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], epoch: int,
) -> torch.Tensor:  # fmt: skip
    """One pass over ``loader``, an update per batch: ``inputs`` turns a uint8 batch and its
    labels into (augmented images, targets) on the device. Returns the summed loss (on the
    device: no sync per step)."""
    updates_per_epoch = len(loader)
    loss_sum = None
    for step, (imgs, labels) in enumerate(loader):
        x, y = inputs(imgs, labels)
        t.scheduler.step_update(epoch * updates_per_epoch + step)
        with t.autocast():
            loss = t.criterion(t.model(x), y)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
        if loss_sum is None:
            loss_sum = torch.zeros((), device=loss.device)  # fp32, whatever the autocast dtype
        loss_sum += loss.detach()
    return loss_sum if loss_sum is not None else torch.zeros(())


def augment(
    imgs: torch.Tensor, labels: torch.Tensor, ft: FinetuneConfig, data: PreparedData, mean: torch.Tensor,
    std: torch.Tensor, gen: torch.Generator, eraser: RandomErasing | None, mixup: Mixup | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A uint8 batch and its labels -> (augmented, normalised images; targets) on ``mean``'s
    device: the crop or affine from ``gen``, random erasing, then Mixup/CutMix."""
    x = imgs.to(mean.device, non_blocking=True).float().div_(255.0)  # at the store's side
    if ft.crop_scale is not None:  # the reference: RandomResizedCrop + flip from the stored image
        x = random_resized_crop(x, data.img_size, ft.crop_scale, hflip=ft.hflip, generator=gen)
    else:  # shift, rotate, zoom, then the evaluation crop
        x = random_affine(x, ft.translate, ft.rotate, ft.scale, ft.hflip, generator=gen)
        x = center_view(x, data.img_size, data.crop_pct)
    x = normalize(x, mean, std)
    if eraser is not None:
        x = eraser(x)
    y = labels.to(mean.device, non_blocking=True)
    if mixup is not None:
        x, y = mixup(x, y)
    return x, y


def _uses_mixup(ft: FinetuneConfig) -> bool:
    return ft.mixup > 0 or ft.cutmix > 0


def _batch_size(ft: FinetuneConfig, num_labelled: int, rt: runtime.Runtime) -> int:
    """Each process's batch: finetune.batch_size, or fewer when the labelled images are few."""
    if num_labelled < 2:
        raise InputError(f"fine-tuning needs at least 2 labelled training images, found {num_labelled}: "
                         "raise data.label_fraction or data.labels_per_class")  # fmt: skip
    batch = min(ft.batch_size, num_labelled // rt.world_size)
    if _uses_mixup(ft):  # Mixup/CutMix pair each image with its mirror in the batch: it must be even
        batch -= batch % 2  # and every batch is full (drop_last), so every batch is even too
    if batch < 1:
        raise InputError(f"{num_labelled} labelled training images cannot make a batch for each of "
                         f"{rt.world_size} processes: lower finetune.nproc_per_node")  # fmt: skip
    return batch


def _regularizers(
    ft: FinetuneConfig, num_classes: int, device: torch.device
) -> tuple[Mixup | None, nn.Module, RandomErasing | None]:
    """Mixup/CutMix (or none), the loss that fits its soft targets (else label-smoothed
    cross-entropy), and random erasing (or none)."""
    mixup = None
    if _uses_mixup(ft):
        mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                      num_classes=num_classes)  # fmt: skip
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
    eraser = RandomErasing(ft.random_erase, mode="pixel", device=str(device)) if ft.random_erase > 0 else None
    return mixup, criterion, eraser


def train_finetune(
    enc: EncoderSpec,
    ft: FinetuneConfig,
    data: PreparedData,
    rt: runtime.Runtime,
    *,
    epochs: int,
    eval_every: int | None = None,
    eval_from: int = 1,
    report: ReportFn | None = None,
    checkpointer: Checkpointer | None = None,
    desc: str = "finetune",
    tracked: str | Path | None = None,
) -> TrainResult:
    """Fine-tune the whole network on the labelled training subset; validate every
    ``eval_every`` epochs from epoch ``eval_from`` on (and after the last), passing the
    score to ``report``; rank 0 logs each epoch with DVCLive under ``tracked``/live."""
    _seed_everything(ft.seed)
    model, args = make_classifier(enc, ft, data)
    model.to(rt.device)
    train_ids = data.indices("train", labelled_only=True)
    val_ids = data.indices("val")
    batch = _batch_size(ft, len(train_ids), rt)
    fast = runtime.fast_path(ft.fast, rt.device)
    randaug = HostRandAugment(ft.randaug, data.mean) if ft.randaug else None
    loader = train_loader(data, train_ids, batch, rt, resident=fast and randaug is None, seed=ft.seed,
                          transform=randaug, num_workers=runtime.loader_workers(ft.num_workers, rt))  # fmt: skip
    updates_per_epoch = len(loader)
    mean, std = (torch.tensor(v, device=rt.device) for v in (data.mean, data.std))  # once: no copy per step

    lr = ft.base_lr * batch * rt.world_size / 256  # the effective batch
    optimizer = finetune_optimizer(model, ft, lr, fused=rt.device.type == "cuda")
    scheduler = cosine_schedule(optimizer, epochs, updates_per_epoch, ft.warmup_epochs, ft.min_lr)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    mixup, criterion, eraser = _regularizers(ft, len(data.classes), rt.device)

    start_epoch, history = 0, []
    if checkpointer is not None:
        start_epoch, history = resume(checkpointer, model, optimizer, scaler, rt, setting="finetune.checkpoint_dir")
        if start_epoch and rt.is_main:
            log.info("resumed %s from %s at epoch %d/%d", desc, checkpointer.path, start_epoch, epochs)
    train_model = runtime.distribute(model, rt)
    if fast:  # the step's many small kernels fused: what small images at large batches are bound by
        train_model = torch.compile(train_model)
    trainer = FinetuneStep(train_model, optimizer, scaler, scheduler, criterion, rt.autocast)

    live = EpochLog(tracked, history) if tracked is not None and rt.is_main else None
    eval_every = eval_every or ft.eval_every
    val_top1, val_pred = (history[-1]["val_top1"] if history else float("nan")), None
    t0 = time.perf_counter()
    bar = tqdm(range(start_epoch, epochs), desc=desc, unit="epoch", leave=False,
               **({} if rt.is_main else {"disable": True}))  # fmt: skip
    for epoch in bar:
        t_epoch = time.perf_counter()
        _seed_everything(ft.seed * 1009 + epoch + 7919 * rt.rank)  # Mixup: its own draws per rank
        set_epoch(loader, epoch)
        gen = torch.Generator(device=rt.device).manual_seed(ft.seed * 1_000_003 + epoch + 7919 * rt.rank)

        def inputs(imgs: torch.Tensor, labels: torch.Tensor, gen: torch.Generator = gen) -> tuple[torch.Tensor, ...]:
            return augment(imgs, labels, ft, data, mean, std, gen, eraser, mixup)

        model.train()
        loss_sum = finetune_one_epoch(trainer, loader, inputs, epoch)
        train_loss = float(runtime.all_reduce_mean(loss_sum.to(rt.device) / updates_per_epoch, rt))
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"fine-tuning loss is {train_loss} at epoch {epoch + 1}: lower finetune.base_lr")
        last = epoch + 1 == epochs
        if rt.is_main and (((epoch + 1) % eval_every == 0 and epoch + 1 >= eval_from) or last):  # rank 0 reports
            val_top1, val_pred = validate_model(model, data, val_ids, rt.device)
            if report is not None:
                report(epoch + 1, val_top1)
        history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_top1": round(val_top1, 5),
                        "lr": float(f"{optimizer.param_groups[-1]['lr']:.6g}"),
                        "seconds": round(time.perf_counter() - t_epoch, 3)})  # fmt: skip
        if live is not None:
            live.log(history[-1])
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_top1:.3f}")
        if rt.is_main and checkpointer is not None and ((epoch + 1) % ft.save_every == 0 or last):
            save_progress(checkpointer, model, optimizer, scaler, epoch, history)
    if live is not None:
        live.close()
    if rt.is_main and val_pred is None:  # resumed after its last epoch: validate the model it restored
        val_top1, val_pred = validate_model(model, data, val_ids, rt.device)
    model.eval()
    return TrainResult(model, args, history, val_top1, time.perf_counter() - t0, val_pred)


def train_loader(data: PreparedData, ids: np.ndarray, batch: int, rt: runtime.Runtime, *, resident: bool,
                 seed: int, transform: HostRandAugment | None = None,
                 num_workers: int = 0) -> DataLoader | DeviceBatches:  # fmt: skip
    """Shuffled full batches of the labelled images, sharded across ranks: served from a
    copy resident on the device when ``resident`` and they fit (the same batches in the
    same order), else read from the host memmap (and ``transform``-ed) by ``num_workers``
    loader processes."""
    shard = {"shuffle": True, "seed": seed, "drop_last": True, "rank": rt.rank, "world_size": rt.world_size}
    if resident and DeviceBatches.fits(data, ids, rt.device):
        return DeviceBatches(data, ids, batch, rt.device, **shard)
    return batch_loader(data, ids, batch, transform=transform, num_workers=num_workers, **shard)


@torch.no_grad()
def run_fingerprint(enc: EncoderSpec, ft: FinetuneConfig, data: PreparedData, epochs: int, world_size: int) -> str:
    """Identity of a fine-tuning run: a checkpoint resumes only a run with the same one."""
    return fingerprint({"model": enc.preset, "ft": semantic_params(ft), "init": enc.init, "epochs": epochs,
                        "data": data.manifest["content_hash"], "world_size": world_size})  # fmt: skip


def summary(result: TrainResult, world_size: int = 1) -> dict[str, Any]:
    """What a stage reports of a saved model (the model itself stays in the file)."""
    return {"val_top1": result.val_top1, "train_time_s": result.train_time_s, "history": result.history,
            "world_size": world_size, "val_pred": result.val_pred}  # fmt: skip


def train_saved(
    enc: EncoderSpec, ft: FinetuneConfig, prepared: str | Path, *, epochs: int, dest: Path,
    checkpoint: Path | None = None, resume: bool = False, desc: str = "finetune", tracked: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune on the data in ``prepared`` in ``ft.nproc_per_node`` processes (DDP; ``auto``:
    one per visible GPU) and save the model to ``dest``; resumable from ``checkpoint``
    (``resume`` insists); DVCLive under ``tracked``/live; returns rank 0's ``summary``."""
    nproc = launch.resolve_nproc(ft.nproc_per_node, ft.device, "finetune.nproc_per_node")
    resumable = checkpoint is not None and (resume or ft.auto_resume)
    return launch.run_ranks(_train_rank, (enc, ft, prepared, epochs, dest, checkpoint, resume, desc, tracked),
                            nproc, resumable, desc)  # fmt: skip


def _train_rank(enc: EncoderSpec, ft: FinetuneConfig, prepared: str | Path, epochs: int, dest: Path,
                checkpoint: Path | None, resume: bool, desc: str, tracked: Path | None) -> dict[str, Any]:  # fmt: skip
    with runtime.session(ft.device, ft.amp) as rt:
        data = PreparedData(prepared, hide_test=True)
        checkpointer = None
        if checkpoint is not None and (resume or ft.auto_resume):
            checkpointer = Checkpointer(checkpoint, run_fingerprint(enc, ft, data, epochs, rt.world_size))
            if resume:
                checkpointer.load(required=True)
        result = train_finetune(enc, ft, data, rt, epochs=epochs, checkpointer=checkpointer, desc=desc,
                                tracked=tracked)  # fmt: skip
        if not rt.is_main:
            return {}
        save_result(result, dest)
        return summary(result, rt.world_size)


def features(model: nn.Module, data: PreparedData, ids: np.ndarray, device: torch.device) -> torch.Tensor:
    model.eval()
    feats = []
    for start in range(0, len(ids), 256):
        x = torch.from_numpy(data.eval_images[ids[start : start + 256]]).to(device)
        feats.append(model.forward_head(model.forward_features(normalize(x, data.mean, data.std)), pre_logits=True))
    return torch.cat(feats)


def linprobe_optimizer(head: nn.Module, ft: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """LARS as the reference probes: the layer-wise trust ratio |w| / |update| on the
    weight matrix (trust coefficient 1, momentum 0.9), plain momentum on the bias."""
    if ft.linprobe_optimizer == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": weights, "always_adapt": True}, {"params": others, "always_adapt": False}],
                lr=lr, momentum=0.9, weight_decay=0.0, trust_coeff=1.0)  # fmt: skip


def train_linprobe(enc: EncoderSpec, ft: FinetuneConfig, data: PreparedData, rt: runtime.Runtime) -> TrainResult:
    """Frozen encoder, BatchNorm (no affine) + linear head: how linearly separable
    the pre-trained features are. As the reference by default: the [CLS] token after
    the pre-trained norm, LARS (timm's, the trust ratio on the weight, none on the
    bias, no weight decay). Features are computed once (no augmentation: with a few
    hundred labels the crops would cost a full encoder pass per step)."""
    _seed_everything(ft.seed)
    model, args = make_classifier(enc, ft, data, linprobe=True)
    model.to(rt.device)
    t0 = time.perf_counter()
    train_ids, val_ids = data.indices("train", labelled_only=True), data.indices("val")
    feats = features(model, data, train_ids, rt.device)
    labels = torch.from_numpy(data.labels[train_ids]).to(rt.device)
    head = model.head
    batch = min(256, len(train_ids))
    optimizer = linprobe_optimizer(head, ft, ft.linprobe_lr * batch / 256)
    steps = -(-len(train_ids) // batch)
    scheduler = cosine_schedule(optimizer, ft.linprobe_epochs, steps, min(5, ft.linprobe_epochs / 10), 0.0)
    gen = torch.Generator(device=rt.device).manual_seed(ft.seed)
    history = []
    for epoch in range(ft.linprobe_epochs):
        head.train()
        order = torch.randperm(len(train_ids), device=rt.device, generator=gen)
        total = 0.0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            scheduler.step_update(epoch * steps + step)
            loss = nn.functional.cross_entropy(head(feats[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
        history.append({"epoch": epoch + 1, "train_loss": round(total / steps, 5)})
    model.eval()
    val_top1, val_pred = validate_model(model, data, val_ids, rt.device)
    history[-1]["val_top1"] = round(val_top1, 5)
    return TrainResult(model, args, history, val_top1, time.perf_counter() - t0, val_pred)


def save_result(result: TrainResult, dest: Path) -> None:
    ckpt = classifier_checkpoint(result.model, {**result.args, "val_top1": result.val_top1})
    write_checkpoint(dest, ckpt)
