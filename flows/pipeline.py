"""Prefect flow: the DVC stages in order, one task per stage.

DVC decides what is up to date (Prefect's own task cache is off); every stage's
output streams into the flow's log; a failed stage fails the flow naming it;
the run ends with a markdown summary artifact. Run it with `mae-ops pipeline`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mae_ops.orchestration import STAGES, StageResult, pipeline_lock, run_dvc_stage, run_summary, write_overrides


@task(task_run_name="{stage}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def dvc_stage(stage: str, repo: str, force: bool = False) -> StageResult:
    logger = get_run_logger()
    result = run_dvc_stage(stage, Path(repo), logger.info, force=force)
    logger.info("%s %s in %.1fs", stage, "ran" if result.ran else "was up to date", result.seconds)
    return result


@flow(name="mae-ops-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    lock_wait_s: float = 0.0,
) -> list[StageResult]:
    """prepare -> pretrain -> finetune (Optuna) -> baselines -> evaluate -> export."""
    root = Path(repo).resolve()
    wanted = list(stages or STAGES)
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages are {list(STAGES)}")
    with pipeline_lock(root, lock_wait_s):
        write_overrides(root, overrides or [])
        results = [dvc_stage(stage, str(root), force) for stage in STAGES if stage in wanted]
    create_markdown_artifact(run_summary(root, results), key="mae-ops-run-summary",
                             description="data, pre-training, search, test accuracy, export")  # fmt: skip
    return results
