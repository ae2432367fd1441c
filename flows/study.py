"""Prefect flow: the pre-training study. For each swept setting (one key changed from the
params) and each of `study.seeds`, MAE pre-training then the cheap probes on the
validation split; then the table, the direction checks against the paper (paired on
the same validation images) and one PNG per swept key. A setting
whose probe already ran (same pre-training params, same data) is not run again, so
a stopped study resumes; a pre-training run cut short resumes from its checkpoint.
Run it with `mae-ops study`.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mae_ops import study as plan
from mae_ops.config import Config
from mae_ops.data import PreparedData
from mae_ops.stages import pretrain, probe


@task(task_run_name="{key}={value} seed {seed}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def run_setting(key: str, value: object, seed: int, cfg: Config, probe_file: Path) -> dict:
    logger = get_run_logger()
    if probe_file.exists():
        logger.info("%s=%s seed %d: scored before (%s), kept", key, value, seed, probe_file)
        scores = json.loads(probe_file.read_text())
    else:
        pretrain.run(cfg)
        scores = probe.run(cfg, Path(cfg.pretrain.out_dir) / "encoder.pth", probe_file)
    metrics = json.loads((Path(cfg.pretrain.reports_dir) / "metrics.json").read_text())
    row = {"final_loss": metrics["final_loss"], "pretrain_s": metrics["train_time_s"], "probe_s": scores["seconds"],
           "num_val": scores["num_val"], "predictions": str(probe.predictions_file(probe_file)),
           **{k: v for k, v in scores.items() if k.endswith("_top1")}}  # fmt: skip
    logger.info("%s=%s seed %d: %s", key, value, seed, {k: v for k, v in row.items() if k.endswith("_top1")})
    return row


@flow(name="mae-ops-study", log_prints=True)
def study(cfg: Config) -> dict:
    data = PreparedData(cfg.data.out_dir)
    runs = plan.settings(cfg, data.manifest["content_hash"])
    rows, done = [], {}
    for s in runs:  # one after another: each run uses every core
        if s["probe"] not in done:
            done[s["probe"]] = run_setting(s["key"], s["value"], s["seed"], s["config"], s["probe"])
        rows.append({**done[s["probe"]], "key": s["key"], "value": s["value"], "seed": s["seed"], "run": s["run"]})
    result = plan.report(rows, cfg, Path(cfg.study.reports_dir))
    create_markdown_artifact((Path(cfg.study.reports_dir) / "summary.md").read_text(), key="mae-ops-study",
                             description="pre-training settings against probe accuracy")  # fmt: skip
    return result
