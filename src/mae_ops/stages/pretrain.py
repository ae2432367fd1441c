"""Stage `pretrain`: data/prepared/ -> models/pretrain/ + reports/pretrain/.

The MAE recipe: AdamW (0.9, 0.95), weight decay 0.05 except norms and biases (the
tokens are decayed, as in the reference code), lr = base_lr * effective batch /
256, per-step cosine schedule after a linear warm-up, RandomResizedCrop + flip
(on the training device), bf16 autocast on CUDA. ``pretrain.nproc_per_node`` DDP processes (auto: one per
visible GPU), started by the stage itself with PyTorch's elastic launcher
(mae_ops/launch.py), or one rank of a torchrun launch per node; rank 0 writes.
A rank that dies takes the others down and all restart from the last checkpoint.
The loop itself (``train_one_epoch``) and its pieces are in mae_ops/pretraining.py,
which the throughput benchmark runs too.

The fast path (``pretrain.fast``, on by default with CUDA) changes speed, not
math: the uint8 images live on the device and are cropped, flipped and
normalised there; the model and its loss are compiled (``torch.compile``);
AdamW is fused; the step never waits for the device (losses are summed on the
device and read once per epoch). Attention is PyTorch SDPA (flash) either way.

Outputs:
  models/pretrain/mae.pth        {'model', 'epoch', 'args'}: the whole MAE
  models/pretrain/encoder.pth    {'model'}: encoder only, loads strictly into timm's ViT
  reports/pretrain/metrics.json  final loss, throughput, time
  reports/pretrain/history.csv   per-epoch loss / lr / images/s / monitor scores (DVC plots)
  reports/pretrain/live/         the same, epoch by epoch while it runs (DVCLive: dvc exp show, plots)
  reports/pretrain/monitor_predictions.csv  the final monitor's class of each validation image
  reports/pretrain/loss.png, reconstruction.png
Resumable checkpoints (official layout {'model','optimizer','epoch','scaler','args'})
go to checkpoints/pretrain/last.pth every `save_every` epochs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mae_ops import launch, monitor, runtime, training
from mae_ops.atomic import write_json
from mae_ops.config import Config, InputError, PretrainConfig, semantic_params
from mae_ops.data import WINDOW_SHARDS, DeviceBatches, PreparedData, normalize, set_epoch
from mae_ops.models.checkpoint import continue_from, encoder_state_dict, write_checkpoint
from mae_ops.models.mae import MaskedAutoencoderViT, create_mae
from mae_ops.plots import learning_curve, reconstruction_grid
from mae_ops.pretraining import (
    Trainer,
    augment,
    build_optimizer,
    compile_model,
    epoch_generator,
    make_loader,
    train_one_epoch,
    use_fp8,
    use_windows,
)
from mae_ops.reporting import MONITOR_PREDICTIONS, weights_sha256, write_history, write_predictions
from mae_ops.tracking import EpochLog
from mae_ops.training import Checkpointer, cosine_schedule, fingerprint

log = logging.getLogger(__name__)

MONITOR_KEYS = ("knn_val_top1", "probe_val_top1")  # history.csv columns the monitor fills


def run_fingerprint(cfg: Config, data_hash: str, init: str | None, world_size: int) -> str:
    """Identity of a pre-training run: a checkpoint resumes only a run with the same one
    (the same starting weights included: ``init`` is pretrain.init's SHA-256; the same
    number of processes, which sets the effective batch and who sees which images)."""
    return fingerprint({**recipe(cfg), "data": data_hash, "world_size": world_size,
                        **({"init_sha256": init} if init else {})})  # fmt: skip


def recipe(cfg: Config) -> dict[str, Any]:
    """The params the weights are made from, as the checkpoints record them: the model and
    pre-training's own, not where files go or how the loader runs (and no other stage's:
    the same weights are the same file, so DVC re-runs nothing after an unchanged result)."""
    return {"model": cfg.model.model_dump(mode="json"), "pretrain": semantic_params(cfg.pretrain)}


@torch.no_grad()
def save_reconstructions(
    model: MaskedAutoencoderViT, data: PreparedData, mask_ratio: float, dest: Path, n: int = 8, seed: int = 0
) -> None:
    """original | masked | reconstruction | reconstruction + visible, on held-out images."""
    ids = data.indices("val")
    if len(ids) == 0:
        ids = data.indices("train", "unlabeled")
    ids = ids[np.linspace(0, len(ids) - 1, min(n, len(ids))).astype(int)]  # spread over the classes
    device = next(model.parameters()).device
    raw = torch.from_numpy(data.eval_images[ids]).to(device).float() / 255.0
    x = normalize(raw, data.mean, data.std)
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.rand(len(ids), model.patch_embed.num_patches, generator=gen, device=device)
    was_training = model.training
    model.eval()
    _, pred, mask = model(x, mask_ratio, noise)
    model.train(was_training)
    if model.norm_pix_loss:  # predictions are per-patch standardised: undo with the true patch stats
        target = model.patchify(x)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    recon = model.unpatchify(pred)
    mask_img = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    recon = (recon * std + mean).clamp(0, 1)
    columns = {
        "original": raw,
        "masked": raw * (1 - mask_img) + 0.5 * mask_img,
        "reconstruction": recon,
        "recon + visible": raw * (1 - mask_img) + recon * mask_img,
    }
    reconstruction_grid(
        {k: v.cpu().numpy() for k, v in columns.items()}, dest, title=f"MAE, {mask_ratio:.0%} of patches masked"
    )


def run(cfg: Config, resume: bool = False) -> dict:
    """Pre-train in ``pretrain.nproc_per_node`` processes; rank 0's metrics."""
    p = cfg.pretrain
    nproc = launch.resolve_nproc(p.nproc_per_node, p.device, "pretrain.nproc_per_node")
    return launch.run_ranks(run_rank, (cfg, resume), nproc, resume or p.auto_resume, "pretrain")


def run_rank(cfg: Config, resume: bool) -> dict:
    """One process of the run (all of it when alone)."""
    p = cfg.pretrain
    with runtime.session(p.device, p.amp) as rt:
        return _train(cfg, rt, resume)


def _batch_and_lr(p: PretrainConfig, num_images: int, rt: runtime.Runtime) -> tuple[int, int, float]:
    """(batch per process, effective batch, lr): a batch larger than the data is the data,
    and the lr follows the batch really used (lr = base_lr * effective batch / 256)."""
    batch = min(p.batch_size, -(-num_images // rt.world_size))
    if batch < p.batch_size and rt.is_main:
        log.warning("pretrain.batch_size %d is more than the %d images (per process): batches of %d, "
                    "lr scaled for them", p.batch_size, num_images, batch)  # fmt: skip
    eff_batch = batch * p.accum_iter * rt.world_size
    return batch, eff_batch, p.base_lr * eff_batch / 256


def _model(cfg: Config, data: PreparedData, rt: runtime.Runtime) -> MaskedAutoencoderViT:
    """The MAE to pre-train, the same on every rank and on the device: fresh, or continued
    from pretrain.init (a checkpoint of this run resumes it later, not the init)."""
    p = cfg.pretrain
    torch.manual_seed(p.seed)  # identical initial weights on every rank
    model = create_mae(cfg.model.preset, data.img_size, data.channels, p.norm_pix_loss, cfg.model.decoder_depth)
    if p.init is not None:
        for note in continue_from(model, p.init):
            if rt.is_main:
                log.warning("pretrain.init: %s", note)
        if rt.is_main:
            log.info("pretrain.init: continuing from %s", p.init)
    return model.to(rt.device)


def _train(cfg: Config, rt: runtime.Runtime, resume: bool) -> dict:
    p = cfg.pretrain
    data = PreparedData(cfg.data.out_dir)
    if data.img_size != cfg.data.img_size:
        raise InputError(
            f"{cfg.data.out_dir} holds {data.img_size}px images but data.img_size is {cfg.data.img_size}: "
            "run `mae-ops prepare` again"
        )
    ids = data.indices("train", "unlabeled")
    model = _model(cfg, data, rt)
    init_sha = weights_sha256(p.init, "pretrain.init")
    run_id = run_fingerprint(cfg, data.manifest["content_hash"], init_sha, rt.world_size)

    batch, eff_batch, lr = _batch_and_lr(p, len(ids), rt)
    drop_last = len(ids) >= batch * rt.world_size
    fast = runtime.fast_path(p.fast, rt.device)
    if p.fp8 and not fast:
        raise InputError("pretrain.fp8 needs the fast path (pretrain.fast: auto or on): FP8 is slow uncompiled")
    fp8_layers = use_fp8(model, rt.device) if p.fp8 else 0
    windows = use_windows(p, data, ids)
    loader = make_loader(data, ids, batch, rt.device, fast, runtime.loader_workers(p.num_workers, rt), windows,
                         shuffle=True, seed=p.seed, drop_last=drop_last, rank=rt.rank,
                         world_size=rt.world_size)  # fmt: skip
    # what the run was, for metrics.json (the stage benchmark reads it) and the log
    facts = {"num_images": len(ids), "world_size": rt.world_size, "effective_batch": eff_batch, "lr": lr,
             "fast_path": fast, "loader": "device" if isinstance(loader, DeviceBatches) else
             "host, shard windows" if windows else "host, global order"}  # fmt: skip
    updates_per_epoch = -(-len(loader) // p.accum_iter)
    optimizer = build_optimizer(model, lr, p.weight_decay, fused=fast)
    scheduler = cosine_schedule(optimizer, p.epochs, updates_per_epoch, p.warmup_epochs, p.min_lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)

    checkpointer = Checkpointer(Path(p.checkpoint_dir) / "last.pth", run_id)
    start_epoch, history = 0, []
    if resume or p.auto_resume:
        start_epoch, history = training.resume(checkpointer, model, optimizer, scaler, rt,
                                               setting="pretrain.checkpoint_dir", required=resume)  # fmt: skip
        if start_epoch and rt.is_main:
            log.info("resumed from %s at epoch %d/%d", checkpointer.path, start_epoch, p.epochs)
    train_model = runtime.distribute(model, rt)
    if fast:
        train_model = compile_model(train_model, p.compile_mode)

    if rt.is_main:
        n_params = sum(t.numel() for t in model.parameters() if t.requires_grad)
        log.info(
            "pre-training %s (%.2fM params) on %d images, %d epochs, effective batch %d, lr %.2e; fast path %s; "
            "data from the %s%s%s", cfg.model.preset, n_params / 1e6, len(ids), p.epochs, eff_batch, lr,
            "on" if fast else "off", facts["loader"], f" ({WINDOW_SHARDS} at a time)" if windows else "",
            f"; FP8 in {fp8_layers} linear layers" if p.fp8 else "",
        )  # fmt: skip

    mean, std = (torch.tensor(v, device=rt.device) for v in (data.mean, data.std))  # made once: no copy per step
    monitored = monitor.monitor_ids(data) if p.monitor_every else None
    monitor_pred: dict[str, np.ndarray] | None = None  # the last scored epoch's, for the study's paired checks
    live = EpochLog(p.reports_dir, history) if rt.is_main else None  # DVCLive: dvc exp show / plots, live
    if p.monitor_every and monitored is None and rt.is_main:
        log.info("pretrain.monitor_every: no labelled training images or no validation split, nothing to score")
    num_patches = model.patch_embed.num_patches
    model.train()
    t_start = time.perf_counter()
    # only rank 0 shows a bar; on rank 0 pass no `disable`, which would override TQDM_DISABLE
    epochs_bar = tqdm(
        range(start_epoch, p.epochs), desc="pretrain", unit="epoch", **({} if rt.is_main else {"disable": True})
    )
    trainer = Trainer(train_model, optimizer, scaler, rt.autocast, p.mask_ratio, p.accum_iter, scheduler)
    for epoch in epochs_bar:
        set_epoch(loader, epoch)
        gen = epoch_generator(p.seed, epoch, rt.rank, rt.device)

        def inputs(imgs: torch.Tensor, gen: torch.Generator = gen) -> tuple[torch.Tensor, torch.Tensor]:
            imgs = imgs.to(rt.device, non_blocking=True)
            return augment(imgs, p, data.img_size, mean, std, num_patches, gen)

        t0 = time.perf_counter()
        loss_sum, seen = train_one_epoch(trainer, loader, inputs, epoch, rt.distributed)
        mean_loss = float(runtime.all_reduce_mean(loss_sum.to(rt.device) / len(loader), rt))
        if not np.isfinite(mean_loss):
            raise FloatingPointError(f"pre-training loss is {mean_loss} at epoch {epoch}: lower pretrain.base_lr")
        elapsed = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "loss": round(mean_loss, 6),
            "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"),
            "images_per_s": round(seen * rt.world_size / elapsed, 1),
            "seconds": round(elapsed, 3),
        }
        if rt.is_main and monitored is not None and (epoch + 1 == p.epochs or (epoch + 1) % p.monitor_every == 0):
            t_monitor = time.perf_counter()
            seen, monitor_pred = monitor.predict(model, data, monitored, mean, std, rt.autocast)
            record.update(seen)
            record["monitor_s"] = round(time.perf_counter() - t_monitor, 2)
        history.append(record)
        if live is not None:
            live.log(record)
        if rt.is_main:
            epochs_bar.set_postfix(loss=f"{mean_loss:.4f}")
            seen_by = "".join(f", {k.split('_')[0]} {record[k]:.2%}" for k in MONITOR_KEYS if k in record)
            log.info("epoch %d/%d loss %.4f lr %.2e %.0f img/s%s", epoch + 1, p.epochs, mean_loss,
                     record["lr"], record["images_per_s"], seen_by)  # fmt: skip
            if (epoch + 1) % p.save_every == 0 or epoch + 1 == p.epochs:
                training.save_progress(checkpointer, model, optimizer, scaler, epoch, history,
                                       config=recipe(cfg))  # fmt: skip
    train_time = time.perf_counter() - t_start

    if live is None:
        return {}
    live.close()
    if monitored is not None and monitor_pred is None:  # resumed after the last epoch: score it again
        monitor_pred = monitor.predict(model, data, monitored, mean, std, rt.autocast)[1]
    _write_monitor_predictions(data, monitored, monitor_pred, Path(p.reports_dir) / MONITOR_PREDICTIONS)
    facts |= {"resumed_from_epoch": start_epoch, "train_time_s": round(train_time, 2)}
    return _write_outputs(cfg, model, data, history, run_id, init_sha, facts)


def _write_monitor_predictions(
    data: PreparedData, monitored: tuple[np.ndarray, np.ndarray] | None, pred: dict[str, np.ndarray] | None,
    dest: Path,
) -> None:  # fmt: skip
    """The final encoder's k-NN and probe class of each validation image (a header alone
    when the monitor is off): what `mae-ops study` pairs between two settings."""
    if monitored is None or pred is None:
        val = np.zeros(0, np.int64)
        pred = {"knn": val, "probe": val}
    else:
        val = monitored[1]
    write_predictions(dest, val, data.labels[val], pred)


def _write_outputs(
    cfg: Config, model: MaskedAutoencoderViT, data: PreparedData, history: list[dict], run_id: str,
    init_sha: str | None, facts: dict[str, Any],
) -> dict:  # fmt: skip
    """The model, the encoder, the pictures and metrics.json: the losses, the monitor's last
    scores and ``facts`` (the run's images, processes, batch, lr, loader, seconds)."""
    p = cfg.pretrain
    out, reports = Path(p.out_dir), Path(p.reports_dir)
    args = {"fingerprint": run_id, "config": recipe(cfg), "init_sha256": init_sha,
            "img_size": data.img_size, "in_chans": data.channels, "mean": data.mean, "std": data.std}  # fmt: skip
    state = model.state_dict()
    write_checkpoint(out / "mae.pth", {"model": state, "epoch": p.epochs - 1, "args": args})
    enc = encoder_state_dict(state)
    outs = cfg.outputs()
    write_checkpoint(outs.encoder, {"model": enc, "args": args})

    save_reconstructions(model, data, p.mask_ratio, outs.reconstruction_png, seed=p.seed)
    write_history(history, reports / "history.csv")
    learning_curve(history, ["loss"], outs.loss_png, title="MAE pre-training: loss (masked patches)",
                   right=[k for k in MONITOR_KEYS if any(k in h for h in history)])  # fmt: skip
    metrics = {
        "final_loss": history[-1]["loss"],
        "first_loss": history[0]["loss"],
        "epochs": p.epochs,
        "init": p.init,
        "init_sha256": args["init_sha256"],
        **facts,
        "images_per_s": history[-1]["images_per_s"],
        **{k: history[-1][k] for k in (*MONITOR_KEYS, "monitor_s") if k in history[-1]},
    }
    write_json(outs.pretrain_metrics, metrics)
    log.info("pre-training done: loss %.4f -> %.4f in %.1fs; wrote %s", metrics["first_loss"],
             metrics["final_loss"], facts["train_time_s"], out)  # fmt: skip
    return metrics
