"""The Prefect flow over the DVC stages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mae_ops.config import ParamsError
from mae_ops.orchestration import StageFailed, pipeline_lock, run_dvc_stage, run_summary, write_overrides
from tests.conftest import BIN, REPO, load_flow_module, subprocess_env


def _git_dvc_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=subprocess_env())
    return root


def _tiny_project(root: Path) -> Path:
    _git_dvc_repo(root)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for folder in ("src", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["preset"] = "mae_vit_micro_patch4"
    params["pretrain"].update(epochs=1, batch_size=256, warmup_epochs=0)
    params["finetune"].update(epochs=1, batch_size=32, linprobe_epochs=2)
    params["hpo"].update(n_trials=2, epochs=1, startup_trials=1, warmup_epochs=0)
    params["export"].update(quantize=False, max_abs_diff=1e-3)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_flow_runs_every_stage_then_skips_them(tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    repo = _tiny_project(tmp_path / "project")
    pipeline = load_flow_module("pipeline").pipeline
    with prefect_test_harness(server_startup_timeout=120):
        first = pipeline(repo=str(repo), overrides=["pretrain.seed=3"])
        assert [r.stage for r in first] == ["prepare", "pretrain", "finetune", "baselines", "evaluate", "export"]
        assert all(r.ran for r in first)
        second = pipeline(repo=str(repo))
        assert not any(r.ran for r in second)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["seed"] == 3  # the run's params recorded
    summary = run_summary(repo, second)
    assert "skipped (up to date)" in summary and "| finetune | " in summary and "parity" in summary
    assert (repo / "models/export/model.onnx").exists()

    # after a run the retraining flow records dvc.lock in git and pushes the outputs to the DVC remote
    done = load_flow_module("retrain").record_run.fn(str(repo), "dvc-store", True)
    assert done == ["committed dvc.lock", f"pushed to {(repo / 'dvc-store').resolve()}"]
    pushed = [p for p in (repo / "dvc-store").rglob("*") if p.is_file()]
    assert len(pushed) > 10  # the prepared data, checkpoints and ONNX files
    log = subprocess.run(["git", "log", "--name-only", "-1"], cwd=repo, capture_output=True, text=True).stdout
    assert "dvc.lock" in log and "reports/metrics.json" in log


def test_a_failing_stage_is_named(tmp_path: Path) -> None:
    repo = _git_dvc_repo(tmp_path / "repo")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"broken": {"cmd": "echo boom-output && exit 3"}}}))
    lines: list[str] = []
    with pytest.raises(StageFailed, match="stage 'broken' failed") as err:
        run_dvc_stage("broken", repo, lines.append)
    assert "boom-output" in str(err.value) and any("boom-output" in line for line in lines)


def test_overlapping_runs_do_not_race(tmp_path: Path) -> None:
    with (
        pipeline_lock(tmp_path),
        pytest.raises(RuntimeError, match="another pipeline run holds"),
        pipeline_lock(tmp_path, wait_s=1.0),
    ):
        pass
    with pipeline_lock(tmp_path):  # released after the first run
        pass


def test_overrides_are_validated_and_written(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match=r"pretrain\.mask_ratio"):
        write_overrides(tmp_path, ["pretrain.mask_ratio=3"])
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    write_overrides(tmp_path, ["pretrain.epochs=7"])
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["pretrain"]["epochs"] == 7
