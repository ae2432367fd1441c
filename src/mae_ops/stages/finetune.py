"""Stage `finetune`: pre-trained encoder + few labels -> models/finetune/.

The training itself is in mae_ops/finetuning.py (shared with the search and the
baselines); with ``hpo.enabled`` an Optuna study (mae_ops/hpo.py) picks the
knobs first (in this process, or its workers: one per GPU with ``hpo.workers:
auto``); the final training then runs in ``finetune.nproc_per_node`` DDP
processes, rank 0 saving the model.

Outputs:
  models/finetune/model.pth       {'model', 'args'} (see models/classifier.py)
  reports/finetune/metrics.json   validation accuracy, time, what was tuned
  reports/finetune/history.csv, learning_curve.png
  reports/finetune/live/          the same per epoch while it trains (DVCLive: dvc exp show, dvc plots)
  reports/finetune/val_predictions.csv  the model's class of each validation image (the study pairs them)
  reports/hpo/...                 the search's reports (a note when the search is off)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mae_ops import hpo, runtime
from mae_ops.atomic import write_json
from mae_ops.config import Config, FinetuneConfig
from mae_ops.data import PreparedData
from mae_ops.finetuning import (
    TrainResult,
    encoder_spec,
    save_result,
    summary,
    train_linprobe,
    train_saved,
    validate_model,
)
from mae_ops.plots import learning_curve
from mae_ops.reporting import VAL_PREDICTIONS, write_history, write_predictions
from mae_ops.tracking import EpochLog

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- run
def search(cfg: Config) -> tuple[FinetuneConfig, dict[str, Any], dict[str, Any], TrainResult | None]:
    """The Optuna search (when on): the params to train with, what was tuned, the search's
    summary, and the best trial's own model when ``hpo.retrain`` is false."""
    ft = cfg.finetune
    if not (cfg.hpo.enabled and ft.mode == "finetune"):
        why = "hpo.enabled is false" if not cfg.hpo.enabled else "the search is for finetune.mode: finetune"
        log.info("no search: %s; training with the params as given", why)
        hpo.write_disabled_report(cfg.hpo, why)
        return ft, {}, {}, None
    with runtime.session(ft.device, ft.amp) as rt:
        data = PreparedData(cfg.data.out_dir, hide_test=True)
        study = hpo.run_study(cfg, data, rt)
        tuned = dict(study.best_params)
        outs = cfg.outputs()
        hpo_summary = hpo.write_reports(study, outs.hpo_best, outs.hpo_history_png)
        kept = None if cfg.hpo.retrain else hpo.best_trial_model(cfg, study)
        if not cfg.hpo.retrain and kept is None:
            hpo_summary["retrained"] = "the best trial's model is not readable here"
    return ft.with_params(tuned), tuned, hpo_summary, kept


def run(cfg: Config, resume: bool = False) -> dict:
    ft, tuned, hpo_summary, kept = search(cfg)
    outs, reports = cfg.outputs(), Path(ft.reports_dir)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    val = data.indices("val")
    if ft.mode == "linprobe" or kept is not None:  # seconds of work, or none: here, in one process
        with runtime.session(ft.device, ft.amp) as rt:
            if kept is None:
                kept = train_linprobe(encoder_spec(cfg, ft.init), ft, data, rt)
            if kept.val_pred is None:  # the best trial's model, read back
                kept.val_pred = validate_model(kept.model.to(rt.device), data, val, rt.device)[1]
        save_result(kept, outs.finetune_model)
        result = summary(kept)
        EpochLog(reports, result["history"]).close()  # DVCLive's files, as the trained run would write them
    else:  # in finetune.nproc_per_node processes; rank 0 saves the model and logs each epoch with DVCLive
        result = train_saved(encoder_spec(cfg, ft.init), ft, cfg.data.out_dir, epochs=ft.epochs,
                             dest=outs.finetune_model,
                             checkpoint=Path(ft.checkpoint_dir) / "last.pth", resume=resume,
                             tracked=reports)  # fmt: skip

    history = result["history"]
    write_history(history, reports / "history.csv")
    write_predictions(reports / VAL_PREDICTIONS, val, data.labels[val], {"pred": result["val_pred"]})
    keys = [k for k in ("train_loss", "val_top1") if k in history[0]]
    learning_curve(history, keys, outs.learning_curve_png, title=f"{ft.mode} ({ft.init})")
    metrics = {
        "mode": ft.mode,
        "init": ft.init,
        "val_top1": round(result["val_top1"], 5),
        "epochs": len(history),
        "num_labelled": len(data.indices("train", labelled_only=True)),
        "world_size": result["world_size"],
        "train_time_s": round(result["train_time_s"], 2),
        "tuned_params": tuned,
        **({"hpo": hpo_summary} if hpo_summary else {}),
    }
    write_json(outs.finetune_metrics, metrics)
    log.info("%s done: val top-1 %.4f -> %s", ft.mode, result["val_top1"], outs.finetune_model)
    return metrics
