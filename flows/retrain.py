"""Prefect flow for scheduled retraining with champion/challenger promotion.

Each run asks DVC whether anything changed since the production model was built:
the `prepare` stage out of date (an image folder, a data param or the prepare
code changed: the folders are DVC deps, hashed by DVC with its state cache), and
whether the prepared data are other than the champion's (their `content_hash`,
which a fresh and an incremental prepare of the same images share). If nothing
changed it does nothing (unless forced). Otherwise it runs the pipeline flow,
registers the new model, promotes it only if it is at least as good as the
champion on the same current test split, records dvc.lock and pushes DVC outputs
to the configured remote. `mae-ops serve` deploys it on a cron schedule.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mae_ops import registry
from mae_ops.config import load_params
from mae_ops.orchestration import dvc_executable, load_module_file, stage_status, sync_source_deps, tool_env


def _pipeline_flow():
    return load_module_file(Path(__file__).with_name("pipeline.py"), "mae_ops_pipeline_flow").pipeline


@task(cache_policy=NO_CACHE)
def record_run(repo: str, remote: str, commit: bool) -> list[str]:
    """git-commit dvc.lock with the dvc.yaml it belongs to (the flow lists the image folders
    there), params and reports; `dvc push` to the remote."""
    root, done = Path(repo), []
    if commit and (root / ".git").exists():
        subprocess.run(["git", "add", "dvc.yaml", "dvc.lock", "params.yaml", "reports"], cwd=root, check=False)
        msg = "mae-ops retrain: record dvc.lock and reports"
        env = tool_env()
        has_identity = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).stdout.strip()
        if not has_identity:  # a scheduler account often has none
            env.update(GIT_AUTHOR_NAME="mae-ops", GIT_AUTHOR_EMAIL="mae-ops@localhost",
                       GIT_COMMITTER_NAME="mae-ops", GIT_COMMITTER_EMAIL="mae-ops@localhost")  # fmt: skip
        if subprocess.run(["git", "commit", "-q", "-m", msg], cwd=root, env=env).returncode == 0:
            done.append("committed dvc.yaml and dvc.lock")
    if remote:
        env = tool_env()
        if "://" not in remote:  # a local folder: absolute, so every clone pushes to the same place
            remote = str((root / remote).resolve())
        subprocess.run([dvc_executable(), "remote", "add", "-f", "-d", "mae-ops-store", remote], cwd=root, env=env,
                       check=True)  # fmt: skip
        subprocess.run([dvc_executable(), "push"], cwd=root, env=env, check=True)
        done.append(f"pushed to {remote}")
    return done


@flow(name="mae-ops-retrain")
def retrain(repo: str = ".", force: bool = False, overrides: list[str] | None = None) -> dict:
    logger = get_run_logger()
    root = Path(repo).resolve()
    cfg = load_params(root / "params.yaml", overrides or [])
    reg = root / cfg.retrain.registry_dir
    champion = registry.production(reg)
    sync_source_deps(root, cfg, logger.info)  # the configured folders are the deps DVC checks
    stale = stage_status(root, "prepare")
    same_data = champion is not None and champion["info"].get("data_content_hash") == registry.prepared_content_hash(
        root / cfg.data.out_dir
    )
    if champion and same_data and not stale and not overrides and not force:
        logger.info("DVC: data unchanged since production model %s: nothing to do", champion["version"])
        return {"action": "skipped", "production": champion["version"]}
    if stale:
        logger.info("DVC: the prepare stage is out of date (%s): preparing again", stale)
    _pipeline_flow()(repo=str(root), overrides=overrides)
    candidate = registry.register(root, reg)
    decision = registry.challenge(reg, candidate["version"], root / cfg.data.out_dir, cfg.retrain.promote_tolerance)
    recorded = record_run(str(root), cfg.retrain.dvc_remote, cfg.retrain.commit_lock)
    summary = (f"# Retraining\n\ncandidate **{candidate['version']}** test top-1 {decision['challenger_top1']:.2%}; "
               f"champion {decision['champion'] or '-'} "
               + (f"{decision['champion_top1']:.2%}" if decision.get("champion_top1") is not None else "")
               + f"\n\n{'promoted to production' if decision['promoted'] else 'champion kept'}; "
               + ", ".join(recorded or ["nothing recorded"]) + "\n")  # fmt: skip
    create_markdown_artifact(summary, key="mae-ops-retrain", description="champion/challenger decision")
    return {"action": "promoted" if decision["promoted"] else "kept champion", **decision}
