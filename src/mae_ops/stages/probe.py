"""Stage `probe`: how good a pre-trained encoder is, cheaply, on the validation split.

Scores (all trained on the labelled training subset, measured on the validation
split; the test split is never opened):
  knn_top1       k-NN (cosine, k = study.knn_k, fixed) on the frozen encoder's features
  linprobe_top1  the linear probe as the reference: frozen encoder, BatchNorm + linear head, LARS
  finetune_top1  a short fine-tune of the whole network (study.finetune_epochs; 0 = skipped)

Besides the JSON, each validation image's predicted class under every score goes to
``<out>.predictions.npz`` (numpy arrays only): the study pairs two settings image by
image, which separates far smaller gaps than two independent accuracies.

It scores any encoder on its own (`mae-ops probe --encoder models/pretrain/encoder.pth`), with
the study's fine-tuning budget; the study itself reads the pipeline's monitor and fine-tune.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from mae_ops import runtime
from mae_ops.atomic import atomic_path, write_json
from mae_ops.classical import knn_proba, mae_features
from mae_ops.config import Config, InputError
from mae_ops.data import PreparedData
from mae_ops.finetuning import encoder_spec, train_finetune, train_linprobe
from mae_ops.study import warmup_epochs

log = logging.getLogger(__name__)


def run(cfg: Config, encoder: Path, out: Path) -> dict:
    if not encoder.exists():
        raise InputError(f"encoder checkpoint {encoder} not found: run `mae-ops pretrain` first")
    with runtime.session(cfg.finetune.device, "auto") as rt:
        return _probe(cfg, encoder, out, rt)


def _probe(cfg: Config, encoder: Path, out: Path, rt: runtime.Runtime) -> dict:
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    train, val = data.indices("train", labelled_only=True), data.indices("val")
    if len(val) == 0:
        raise InputError("the validation split is empty: set data.val_fraction > 0 to probe encoders")
    enc = encoder_spec(cfg, str(encoder))  # the one encoder every score below reads
    ft = cfg.finetune.model_copy(update={"init": enc.init, "warmup_epochs": warmup_epochs(cfg)})
    t0 = time.perf_counter()

    x, xv = mae_features(enc, ft, data, train, rt.device), mae_features(enc, ft, data, val, rt.device)
    k = min(cfg.study.knn_k, len(train))
    preds = {"knn": knn_proba(x, data.labels[train], xv, k, "cosine", len(data.classes)).argmax(1)}
    preds["linprobe"] = train_linprobe(enc, ft, data, rt).val_pred
    result = {"encoder": str(encoder), "knn_k": k}
    if cfg.study.finetune_epochs > 0:
        tuned = train_finetune(enc, ft, data, rt, epochs=cfg.study.finetune_epochs,
                               eval_every=cfg.study.finetune_epochs, desc="probe finetune")  # fmt: skip
        preds["finetune"] = tuned.val_pred  # validated after the last epoch
        result["finetune_epochs"], result["finetune_warmup_epochs"] = cfg.study.finetune_epochs, ft.warmup_epochs
    for name, pred in preds.items():
        result[f"{name}_top1"] = round(float((pred == data.labels[val]).mean()), 5)
    result["num_labelled"], result["num_val"] = len(train), len(val)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    arrays = {"val_ids": val, "labels": data.labels[val], **{n: p.astype(np.int32) for n, p in preds.items()}}
    with atomic_path(predictions_file(out)) as tmp, open(tmp, "wb") as fh:  # a path would gain ".npz"
        np.savez(fh, **arrays)
    write_json(out, result)
    log.info("probe %s: %s", encoder, {k: v for k, v in result.items() if k.endswith("top1")})
    return result


def predictions_file(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".json") + ".predictions.npz")
