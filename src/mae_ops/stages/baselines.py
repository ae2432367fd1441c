"""Stage `baselines`: what MAE is measured against -> models/baselines/.

scratch.pth   the same ViT, recipe and epochs as the final fine-tuning, randomly
              initialised, with hyper-parameters from its own Optuna study of as
              many trials and epochs as the MAE fine-tuning's (when hpo.enabled;
              the same space without layer decay, which only makes sense for
              pre-trained layers); without a search, the MAE model's params
linprobe.pth  the frozen pre-trained encoder with BatchNorm + linear head (LARS, as
              the reference), its pooling ([CLS] token or patch mean) and lr
              (finetune.linprobe_lr / 3, x 1, x 3) picked on the validation split
classical.npz logistic regression and k-NN on raw pixels, k-NN on the frozen MAE
              features (mae_ops/classical.py), each tuned on the validation split
baselines.json which of the three were asked for (evaluate.baseline, linprobe, classical)
"""

from __future__ import annotations

import logging
from pathlib import Path

from mae_ops import classical, hpo, runtime
from mae_ops.atomic import write_json
from mae_ops.config import SCRATCH_LAYER_DECAY, Config, FinetuneConfig, InputError
from mae_ops.data import PreparedData
from mae_ops.finetuning import (
    EncoderSpec,
    TrainResult,
    encoder_spec,
    frozen_encoder_spec,
    save_result,
    train_linprobe,
    train_saved,
)
from mae_ops.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def final_finetune_params(cfg: Config) -> FinetuneConfig:
    """The params the final fine-tuned model was trained with (tuned ones included)."""
    path = cfg.outputs().finetune_model
    if not path.exists():
        raise InputError(f"{path} not found: run `mae-ops finetune` first")
    args = read_checkpoint(path)["args"]
    return FinetuneConfig.model_validate(args["finetune"])


def scratch_config(cfg: Config) -> Config:
    """The scratch ViT's own search: its own study (name suffix ``-scratch``) with the MAE
    fine-tuning's trials, epochs per trial, pruner and seed; layer decay off."""
    space = {k: v for k, v in cfg.hpo.space.items() if k != "layer_decay"}
    return cfg.model_copy(update={
        "finetune": cfg.finetune.with_params({"init": "scratch", "layer_decay": SCRATCH_LAYER_DECAY}),
        "hpo": cfg.hpo.model_copy(update={"study_name": f"{cfg.hpo.study_name}-scratch", "space": space}),
    })  # fmt: skip


def scratch_params(
    cfg: Config, tuned: FinetuneConfig, data: PreparedData, rt: runtime.Runtime
) -> tuple[FinetuneConfig, dict]:
    """The scratch baseline's params: tuned by its own study when the MAE model's
    (``tuned``) were, else the MAE model's own."""
    if not (cfg.hpo.enabled and cfg.finetune.mode == "finetune"):
        ft = tuned.with_params({"init": "scratch", "layer_decay": SCRATCH_LAYER_DECAY})
        return ft, {"tuned": False, "why": "no search for the MAE model either: the same params as it"}
    scfg = scratch_config(cfg)
    study = hpo.run_study(scfg, data, rt)
    ft = scfg.finetune.with_params(study.best_trial.params)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    log.info("scratch study %s: best val top-1 %.4f of %d trials", study.study_name, study.best_value, len(finished))
    return ft, {"tuned": True, "study": study.study_name, "trials": len(finished),
                "best_trial_val_top1": round(study.best_value, 5), "params": study.best_trial.params}  # fmt: skip


LINPROBE_LR_FACTORS = (1 / 3, 1.0, 3.0)


def tuned_linprobe(
    cfg: Config, enc: EncoderSpec, data: PreparedData, rt: runtime.Runtime
) -> tuple[TrainResult, list[dict]]:
    """The strongest linear probe of ``enc`` on the validation split: [CLS] token (the reference)
    or patch mean, three learning rates around finetune.linprobe_lr (a probe takes seconds)."""
    best, tried = None, []
    for pool in ("token", "avg"):
        for factor in LINPROBE_LR_FACTORS:
            lr = float(f"{cfg.finetune.linprobe_lr * factor:.3g}")
            ft = cfg.finetune.model_copy(update={"linprobe_pool": pool, "linprobe_lr": lr})
            result = train_linprobe(enc, ft, data, rt)
            tried.append({"pool": pool, "lr": lr, "val_top1": round(result.val_top1, 5)})
            if best is None or result.val_top1 > best.val_top1:
                best = result
    assert best is not None
    return best, tried


def run(cfg: Config) -> dict:
    with runtime.session(cfg.finetune.device, cfg.finetune.amp) as rt:
        return _fit(cfg, rt)


def _fit(cfg: Config, rt: runtime.Runtime) -> dict:
    ev = cfg.evaluate
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    out = Path(ev.baselines_dir)
    # which baselines this folder holds: DVC's output exists even when every one is off
    write_json(out / "baselines.json", {"scratch": ev.baseline == "scratch", "linprobe": ev.linprobe,
                                        "classical": ev.classical})  # fmt: skip
    metrics: dict[str, dict] = {}
    if ev.baseline == "scratch":
        ft, search = scratch_params(cfg, final_finetune_params(cfg), data, rt)
        # in finetune.nproc_per_node processes, as the MAE model's final training
        done = train_saved(encoder_spec(cfg, "scratch"), ft, cfg.data.out_dir, epochs=ft.epochs,
                           dest=out / "scratch.pth", desc="scratch")  # fmt: skip
        metrics["scratch"] = {"val_top1": round(done["val_top1"], 5), "train_time_s": round(done["train_time_s"], 2),
                              "world_size": done["world_size"], "search": search}  # fmt: skip
        log.info("scratch baseline: val top-1 %.4f", done["val_top1"])
    frozen = frozen_encoder_spec(cfg) if ev.linprobe or ev.classical else None  # resolved once: both read it
    if frozen is not None and ev.linprobe:
        result, tried = tuned_linprobe(cfg, frozen, data, rt)
        save_result(result, out / "linprobe.pth")
        chosen = result.args["finetune"]
        metrics["linprobe"] = {
            "val_top1": round(result.val_top1, 5), "train_time_s": round(result.train_time_s, 2),
            "pool": chosen["linprobe_pool"], "lr": chosen["linprobe_lr"], "tried": tried,
        }  # fmt: skip
        log.info("linear probe: val top-1 %.4f (%s pooling, lr %.3g)", result.val_top1, chosen["linprobe_pool"],
                 chosen["linprobe_lr"])  # fmt: skip
    if frozen is not None and ev.classical:
        stored, report = classical.fit_all(cfg, frozen, data, rt.device)
        classical.save(out / "classical.npz", stored)
        metrics.update(report)
    write_json(cfg.outputs().baselines_metrics, metrics)
    return metrics
