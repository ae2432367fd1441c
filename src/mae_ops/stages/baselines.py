"""Stage `baselines`: what MAE is measured against -> models/baselines/.

scratch.pth   the same ViT, same recipe, params and epochs as the final
              fine-tuning, but randomly initialised (layer decay off: it only
              makes sense for pre-trained layers)
linprobe.pth  the frozen pre-trained encoder with BatchNorm + linear head
classical.npz logistic regression and k-NN on raw pixels, k-NN on the frozen MAE
              features (mae_ops/classical.py), each tuned on the validation split
"""

from __future__ import annotations

import logging
from pathlib import Path

from mae_ops import classical, runtime
from mae_ops.atomic import write_json
from mae_ops.config import Config, FinetuneConfig, InputError
from mae_ops.data import PreparedData
from mae_ops.finetuning import save_result, train_finetune, train_linprobe
from mae_ops.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def final_finetune_params(cfg: Config) -> FinetuneConfig:
    """The params the final fine-tuned model was trained with (tuned ones included)."""
    path = Path(cfg.finetune.out_dir) / "model.pth"
    if not path.exists():
        raise InputError(f"{path} not found: run `mae-ops finetune` first")
    args = read_checkpoint(path)["args"]
    return FinetuneConfig.model_validate(args["finetune"])


def run(cfg: Config) -> dict:
    ev = cfg.evaluate
    rt = runtime.setup(cfg.finetune.device, cfg.finetune.amp)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    out = Path(ev.baselines_dir)
    metrics: dict[str, dict] = {}
    if ev.baseline == "scratch":
        tuned = final_finetune_params(cfg)
        ft = FinetuneConfig.model_validate({**tuned.model_dump(), "init": "scratch", "layer_decay": 1.0})
        result = train_finetune(cfg, ft, data, rt, init="scratch", epochs=ft.epochs, desc="scratch")
        save_result(result, out / "scratch.pth")
        metrics["scratch"] = {"val_top1": round(result.val_top1, 5), "train_time_s": round(result.train_time_s, 2)}
        log.info("scratch baseline: val top-1 %.4f", result.val_top1)
    if ev.linprobe:
        init = cfg.finetune.init if cfg.finetune.init != "scratch" else "pretrain"
        result = train_linprobe(cfg, cfg.finetune, data, rt, init=init)
        save_result(result, out / "linprobe.pth")
        metrics["linprobe"] = {"val_top1": round(result.val_top1, 5), "train_time_s": round(result.train_time_s, 2)}
        log.info("linear probe: val top-1 %.4f", result.val_top1)
    if ev.classical:
        stored, report = classical.fit_all(cfg, data, rt.device)
        classical.save(out / "classical.npz", stored)
        metrics.update(report)
    write_json(Path(ev.baselines_reports_dir) / "metrics.json", metrics)
    runtime.teardown()
    return metrics
