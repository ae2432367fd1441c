"""Prefect flow: the DVC stages in order, one task per stage.

DVC decides what is up to date (Prefect's own task cache is off), the image
folders included (the flow lists them as deps of `prepare`); every stage's
output streams into the flow's log; a failed stage fails the flow naming it
(a stage's own one-line error is not retried: it would fail the same way);
the run ends with a markdown summary artifact. Run it with `mae-ops pipeline`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mae_ops.orchestration import (
    STAGES,
    StageResult,
    pipeline_lock,
    plan_overrides,
    preflight,
    run_dvc_stage,
    run_summary,
    stale_stages,
    sync_source_deps,
    with_upstream,
    write_overrides,
    write_run_record,
)


def _worth_a_retry(task, task_run, state) -> bool:
    """Retry what may be transient (a killed process, a flaky file system), not a
    stage that said in one line what the user has to fix."""
    return not getattr(state.data, "user_error", False)


@task(task_run_name="{stage}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=_worth_a_retry)  # fmt: skip
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
    wanted = with_upstream(root, stages)  # a named stage comes with what it needs, as `dvc repro STAGE`
    with pipeline_lock(root, lock_wait_s):
        cfg, _ = plan_overrides(root, overrides or [])
        preflight(root, cfg, wanted, overrides or [], force)  # before params.yaml or any output changes
        write_overrides(root, overrides or [], get_run_logger().info)
        sync_source_deps(root, cfg, get_run_logger().info)  # DVC hashes the image folders
        results = [dvc_stage(stage, str(root), force) for stage in STAGES if stage in wanted]
        # under the lock: this run's reports, and DVC not busy with the next run
        stale = stale_stages(root, results)  # left out and now older than their inputs
        write_run_record(root, results, stale)
        summary = run_summary(root, results, stale)
    create_markdown_artifact(summary, key="mae-ops-run-summary",
                             description="data, pre-training, search, test accuracy, export")  # fmt: skip
    return results
