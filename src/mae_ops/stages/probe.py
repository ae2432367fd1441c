"""Stage `probe`: how good a pre-trained encoder is, cheaply, on the validation split.

Scores (all trained on the labelled training subset, measured on the validation
split; the test split is never opened):
  knn_top1       k-NN (cosine, k = study.knn_k, fixed) on the frozen encoder's features
  linprobe_top1  the linear probe as the reference: frozen encoder, BatchNorm + linear head, LARS
  finetune_top1  a short fine-tune of the whole network (study.finetune_epochs; 0 = skipped)

`mae-ops study` runs it after each pre-training setting; it runs on its own too
(`mae-ops probe --encoder models/pretrain/encoder.pth`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mae_ops import runtime
from mae_ops.atomic import write_json
from mae_ops.classical import knn_proba, mae_features
from mae_ops.config import Config, InputError
from mae_ops.data import PreparedData
from mae_ops.finetuning import train_finetune, train_linprobe

log = logging.getLogger(__name__)


def run(cfg: Config, encoder: Path, out: Path) -> dict:
    if not encoder.exists():
        raise InputError(f"encoder checkpoint {encoder} not found: run `mae-ops pretrain` first")
    rt = runtime.setup(cfg.finetune.device, "auto")
    try:
        return _probe(cfg, encoder, out, rt)
    finally:
        runtime.teardown()


def _probe(cfg: Config, encoder: Path, out: Path, rt: runtime.Runtime) -> dict:
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    train, val = data.indices("train", labelled_only=True), data.indices("val")
    if len(val) == 0:
        raise InputError("the validation split is empty: set data.val_fraction > 0 to probe encoders")
    ft = cfg.finetune.model_copy(update={"init": str(encoder)})
    pcfg = cfg.model_copy(update={"finetune": ft})
    t0 = time.perf_counter()

    x, xv = mae_features(pcfg, data, train, rt.device), mae_features(pcfg, data, val, rt.device)
    k = min(cfg.study.knn_k, len(train))
    probs = knn_proba(x, data.labels[train], xv, k, "cosine", len(data.classes))
    result = {
        "encoder": str(encoder),
        "knn_k": k,
        "knn_top1": round(float((probs.argmax(1) == data.labels[val]).mean()), 5),
    }
    result["linprobe_top1"] = round(train_linprobe(pcfg, ft, data, rt, init=str(encoder)).val_top1, 5)
    if cfg.study.finetune_epochs > 0:
        tuned = train_finetune(pcfg, ft, data, rt, init=str(encoder), epochs=cfg.study.finetune_epochs,
                               eval_every=cfg.study.finetune_epochs, desc="probe finetune")  # fmt: skip
        result["finetune_top1"] = round(tuned.val_top1, 5)
        result["finetune_epochs"] = cfg.study.finetune_epochs
    result["num_labelled"], result["num_val"] = len(train), len(val)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out, result)
    log.info("probe %s: %s", encoder, {k: v for k, v in result.items() if k.endswith("top1")})
    return result
