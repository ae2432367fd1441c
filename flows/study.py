"""Prefect flow: the pre-training study as DVC experiments. Each swept setting (one key
changed from the params) and each of `study.seeds` is queued as an experiment of the
pipeline (`dvc exp run --queue -S ...`), DVC's queue runs them (pre-training with its
monitor, then a short fine-tune), and the table, the direction checks against the paper
(paired on the same validation images) and one PNG per swept key are made from
`dvc exp show --json`. A setting with a finished experiment of the same params on this
commit is not queued again, so a stopped study resumes; DVC's run cache skips stages
whose deps and params did not change. Run it with `mae-ops study`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mae_ops import study as plan
from mae_ops.config import Config
from mae_ops.orchestration import pipeline_lock, plan_overrides, run_dvc_stage, sync_source_deps, write_overrides


@task(cache_policy=NO_CACHE)
def prepare(repo: Path, overrides: list[str]) -> Config:
    """The params (--set overrides written into params.yaml, as `mae-ops pipeline` does) and
    the data in the workspace first, so every experiment checks it out of DVC's cache."""
    logger = get_run_logger()
    with pipeline_lock(repo):
        cfg, _ = plan_overrides(repo, overrides)
        write_overrides(repo, overrides, logger.info)
        sync_source_deps(repo, cfg, logger.info)
        run_dvc_stage("prepare", repo, logger.info)
    return cfg


@task(cache_policy=NO_CACHE)
def queue(repo: Path, runs: list[plan.Setting]) -> list[plan.Setting]:
    logger = get_run_logger()
    known = plan.experiments(repo)
    todo = plan.to_run(repo, runs, known)
    for s in runs:
        if s in todo:
            plan.queue(repo, s, known)
        logger.info("%s: %s", s.name, "queued" if s in todo else "done before on this commit, kept")
    return todo


@task(cache_policy=NO_CACHE)
def run_queue(repo: Path) -> None:
    plan.run_queue(repo, get_run_logger().info)


@flow(name="mae-ops-study", log_prints=True)
def study(repo: str = ".", overrides: list[str] | None = None) -> dict:
    """The study of the project in ``repo`` (a git repository with its DVC pipeline)."""
    root = Path(repo).resolve()
    cfg = prepare(root, overrides or [])
    runs = plan.settings(cfg)
    if queue(root, runs):
        run_queue(root)
    dest = root / cfg.study.reports_dir
    result = plan.report(plan.rows(root, cfg, runs, dest / "runs"), cfg, dest)
    create_markdown_artifact((dest / "summary.md").read_text(), key="mae-ops-study",
                             description="pre-training settings against probe accuracy")  # fmt: skip
    return result
