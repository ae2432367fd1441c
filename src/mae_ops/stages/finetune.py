"""Stage `finetune`: pre-trained encoder + few labels -> models/finetune/.

The training itself is in mae_ops/finetuning.py (shared with the search and the
baselines); with ``hpo.enabled`` an Optuna study (mae_ops/hpo.py) picks the
knobs first.

Outputs:
  models/finetune/model.pth       {'model', 'args'} (see models/classifier.py)
  reports/finetune/metrics.json   validation accuracy, time, what was tuned
  reports/finetune/history.csv, learning_curve.png
  reports/hpo/...                 the search's reports (a note when the search is off)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mae_ops import hpo, runtime
from mae_ops.atomic import write_json
from mae_ops.config import Config, FinetuneConfig, semantic_params
from mae_ops.data import PreparedData
from mae_ops.finetuning import save_result, train_finetune, train_linprobe
from mae_ops.plots import learning_curve
from mae_ops.reporting import write_history
from mae_ops.training import Checkpointer, fingerprint

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- run
def run_fingerprint(cfg: Config, ft: FinetuneConfig, data: PreparedData, init: str, epochs: int) -> str:
    return fingerprint({"model": cfg.model.preset, "ft": semantic_params(ft), "init": init, "epochs": epochs,
                        "data": data.manifest["content_hash"]})  # fmt: skip


def run(cfg: Config, resume: bool = False) -> dict:
    ft = cfg.finetune
    rt = runtime.setup(ft.device, ft.amp)
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    tuned: dict[str, Any] = {}
    hpo_summary: dict[str, Any] = {}
    kept = None
    if cfg.hpo.enabled and ft.mode == "finetune":
        study = hpo.run_study(cfg, data, rt)
        tuned = dict(study.best_params)
        hpo_summary = hpo.write_reports(study, cfg.hpo)
        ft = FinetuneConfig.model_validate({**ft.model_dump(), **tuned})
        if not cfg.hpo.retrain:
            kept = hpo.best_trial_model(cfg, study)
            if kept is None:
                hpo_summary["retrained"] = "the best trial's model is not readable here"
    else:
        why = "hpo.enabled is false" if not cfg.hpo.enabled else "the search is for finetune.mode: finetune"
        log.info("no search: %s; training with the params as given", why)
        hpo.write_disabled_report(cfg.hpo, why)

    if ft.mode == "linprobe":
        result = train_linprobe(cfg, ft, data, rt, init=ft.init)
    elif kept is not None:
        result = kept
    else:
        ckpt_path = Path(ft.checkpoint_dir) / "last.pth"
        checkpointer = Checkpointer(ckpt_path, run_fingerprint(cfg, ft, data, ft.init, ft.epochs))
        if resume:
            checkpointer.load(required=True)
        result = train_finetune(cfg, ft, data, rt, init=ft.init, epochs=ft.epochs,
                                checkpointer=checkpointer if (resume or ft.auto_resume) else None)  # fmt: skip

    out, reports = Path(ft.out_dir), Path(ft.reports_dir)
    save_result(result, out / "model.pth")
    write_history(result.history, reports / "history.csv")
    keys = [k for k in ("train_loss", "val_top1") if k in result.history[0]]
    learning_curve(result.history, keys, reports / "learning_curve.png", title=f"{ft.mode} ({ft.init})")
    metrics = {
        "mode": ft.mode,
        "init": ft.init,
        "val_top1": round(result.val_top1, 5),
        "epochs": len(result.history),
        "num_labelled": len(data.indices("train", labelled_only=True)),
        "train_time_s": round(result.train_time_s, 2),
        "tuned_params": tuned,
        **({"hpo": hpo_summary} if hpo_summary else {}),
    }
    write_json(reports / "metrics.json", metrics)
    log.info("%s done: val top-1 %.4f -> %s", ft.mode, result.val_top1, out / "model.pth")
    runtime.teardown()
    return metrics
