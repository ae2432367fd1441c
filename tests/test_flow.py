"""The Prefect flow over the DVC stages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mae_ops.config import ParamsError, project_outputs
from mae_ops.errors import BusyError, UserError
from mae_ops.orchestration import (
    StageFailed,
    StageResult,
    pipeline_lock,
    run_dvc_stage,
    run_line,
    run_record,
    run_summary,
    stale_stages,
    write_overrides,
    write_run_record,
)
from tests.conftest import REPO, git_dvc_repo, load_flow_module, tiny_project


def test_flow_runs_every_stage_then_skips_them(tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    repo = tiny_project(tmp_path / "project")
    pipeline = load_flow_module("pipeline").pipeline
    with prefect_test_harness(server_startup_timeout=120):
        first = pipeline(repo=str(repo), overrides=["pretrain.seed=3"])
        assert [r.stage for r in first] == ["prepare", "pretrain", "finetune", "baselines", "evaluate", "export"]
        assert all(r.ran for r in first)
        second = pipeline(repo=str(repo))
        assert not any(r.ran for r in second)
        assert run_record(repo)["out_of_date"] == []  # a full run leaves nothing out
        summary, summary_first = run_summary(repo, second, []), run_summary(repo, first, [])
        # prepare alone, on other splits: the later stages' reports on disk now describe the old ones
        third = pipeline(repo=str(repo), stages=["prepare"], overrides=["data.val_fraction=0.15"])
        record = run_record(repo)  # the flow asked DVC once, under its lock; summary and command read this
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["seed"] == 3  # the run's params recorded
    assert "skipped (up to date)" in summary and "| finetune | " in summary and "parity" in summary
    assert "This run's prepare" not in summary and "earlier run" not in summary  # all up to date, nothing stale
    assert "This run's prepare decoded 0 files and reused 0 stored images; 5000 came from the embedded data set." \
           in summary_first  # fmt: skip
    assert [(r.stage, r.ran) for r in third] == [("prepare", True)]
    assert record["out_of_date"] == ["pretrain", "finetune", "baselines", "evaluate", "export"]
    assert run_line(record) == ("pipeline done: 1 stage(s) ran (prepare), 0 up to date; out of date: pretrain, "
                                "finetune, baselines, evaluate, export (`mae-ops pipeline` updates them)")  # fmt: skip
    partial = run_summary(repo, third, record["out_of_date"])
    assert "**Out of date**: `pretrain`, `finetune`, `baselines`, `evaluate`, `export` did not run" in partial
    assert "*(earlier run)* **Pre-training**" in partial and "| model | *(earlier run)* test top-1 |" in partial
    assert "*(earlier run)* **Export**: parity" in partial and "(earlier run)* **Data**" not in partial
    assert "[confusion_matrix](" in partial and "confusion_matrix.png) *(earlier run)*" in partial
    written = {name: path.exists() for name, path in vars(project_outputs(repo)).items()}
    assert written == {**dict.fromkeys(written, True), "int8_onnx": False}  # export.quantize is off here

    # after a run the retraining flow records dvc.lock in git and pushes the outputs to the DVC remote
    done = load_flow_module("retrain").record_run.fn(str(repo), "dvc-store", True)
    assert done == ["committed dvc.yaml and dvc.lock", f"pushed to {(repo / 'dvc-store').resolve()}"]
    pushed = [p for p in (repo / "dvc-store").rglob("*") if p.is_file()]
    assert len(pushed) > 10  # the prepared data, checkpoints and ONNX files
    log = subprocess.run(["git", "log", "--name-only", "-1"], cwd=repo, capture_output=True, text=True).stdout
    assert "dvc.lock" in log and "reports/metrics.json" in log


def test_a_failing_stage_is_named(tmp_path: Path) -> None:
    repo = git_dvc_repo(tmp_path / "repo")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"broken": {"cmd": "echo boom-output && exit 3"}}}))
    lines: list[str] = []
    with pytest.raises(StageFailed, match="stage 'broken' failed") as err:
        run_dvc_stage("broken", repo, lines.append)
    assert "boom-output" in str(err.value) and any("boom-output" in line for line in lines)


def test_stages_left_out_of_date_come_from_dvc_and_a_busy_dvc_makes_them_unknown(tmp_path: Path) -> None:
    """A partial run's summary names the later stages DVC finds out of date; a DVC process
    outside mae-ops holding the repository's lock makes that unknown, said so, instead of
    failing a run whose stages all succeeded."""
    repo = git_dvc_repo(tmp_path / "repo")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
        "pretrain": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    }}))  # fmt: skip
    run_dvc_stage("prepare", repo, lambda line: None)
    ran = [StageResult("prepare", True, 1.0)]
    assert stale_stages(repo, ran) == ["pretrain"] and stale_stages(repo, []) == []
    assert "**Out of date**: `pretrain` did not run this time" in run_summary(repo, ran, stale_stages(repo, ran))
    holder = "import sys, time; from dvc.repo import Repo\n"
    holder += "with Repo(sys.argv[1]) as r, r.lock:\n    print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(repo)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        write_run_record(repo, ran, stale_stages(repo, ran))
        assert run_record(repo)["out_of_date"] is None
        assert "**Out of date**: not known, another DVC process held the repository's lock" \
               in run_summary(repo, ran, None)  # fmt: skip
        assert run_line(run_record(repo)) == ("pipeline done: 1 stage(s) ran (prepare), 0 up to date; out of date: "
                                              "not known (another DVC process held the repository's lock)")  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    run_dvc_stage("pretrain", repo, lambda line: None)
    assert stale_stages(repo, ran) == []  # brought up to date: nothing left


def test_overlapping_runs_do_not_race(tmp_path: Path) -> None:
    holder = "from pathlib import Path; import sys, time; from mae_ops.orchestration import pipeline_lock\n"
    holder += "with pipeline_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match="another pipeline run"), pipeline_lock(tmp_path, wait_s=1.0):
            pass
    finally:
        proc.kill()
        proc.wait()
    with pipeline_lock(tmp_path), pipeline_lock(tmp_path):  # free again once the holder died; re-entrant
        pass


def test_overrides_are_validated_and_written(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match=r"pretrain\.mask_ratio"):
        write_overrides(tmp_path, ["pretrain.mask_ratio=3"])
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    epochs = yaml.safe_load((REPO / "params.yaml").read_text())["pretrain"]["epochs"]
    changes = write_overrides(tmp_path, ["pretrain.epochs=7", "pretrain.crop_scale=[0.5, 1.0]"])
    assert changes == [f"pretrain.epochs: {epochs} -> 7", "pretrain.crop_scale: [0.35, 1.0] -> [0.5, 1.0]"]
    written = (tmp_path / "params.yaml").read_text()
    params = yaml.safe_load(written)
    assert params["pretrain"]["epochs"] == 7 and params["pretrain"]["crop_scale"] == [0.5, 1.0]
    # the user's file keeps its comments and layout: only the two values differ
    before, after = (REPO / "params.yaml").read_text().splitlines(), written.splitlines()
    assert len(before) == len(after)
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [
        i for i, line in enumerate(before) if line.lstrip().startswith((f"epochs: {epochs} ", "crop_scale: [0.35"))
    ]


def test_a_named_stage_comes_with_the_stages_upstream_of_it(tmp_path: Path) -> None:
    """`mae-ops pipeline pretrain` in a fresh clone prepares first, as `dvc repro pretrain`
    would; which stage needs which comes from dvc.yaml."""
    from mae_ops.orchestration import with_upstream

    assert with_upstream(REPO, ["pretrain"]) == ["prepare", "pretrain"]
    assert with_upstream(REPO, ["finetune"]) == ["prepare", "pretrain", "finetune"]  # not the baselines
    assert with_upstream(REPO, ["evaluate"]) == ["prepare", "pretrain", "finetune", "baselines", "evaluate"]
    # export ships the model evaluate chose on validation (the fine-tuned one or the probe)
    assert with_upstream(REPO, ["export"]) == ["prepare", "pretrain", "finetune", "baselines", "evaluate", "export"]
    assert with_upstream(REPO, None) == with_upstream(REPO, ["export"])
    with pytest.raises(UserError, match=r"unknown stages \['pretrian'\]; stages are \['prepare', 'pretrain'"):
        with_upstream(REPO, ["pretrain", "pretrian"])  # the flow and the command both ask it

    from tests.conftest import BIN, subprocess_env

    # and the stage starts its own DDP processes (2 gloo ranks on a CPU): DVC records the run as usual
    repo = tiny_project(tmp_path / "project", pretrain={"batch_size": 64})
    cmd = [str(BIN / "mae-ops"), "pipeline", "pretrain", "--set", "pretrain.nproc_per_node=2"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 stage(s) ran (prepare, pretrain), 0 up to date; out of date: finetune, baselines, evaluate, export" \
           in proc.stdout  # fmt: skip
    assert (repo / "models/pretrain/encoder.pth").exists() and not (repo / "models/finetune").exists()
    metrics = json.loads((repo / "reports/pretrain/metrics.json").read_text())
    assert (metrics["world_size"], metrics["effective_batch"]) == (2, 128)
    status = subprocess.run(["dvc", "status", "pretrain", "--json"], cwd=repo, capture_output=True, text=True,
                            env=subprocess_env(), check=True)  # fmt: skip
    assert json.loads(status.stdout) == {}, status.stdout
    typo = subprocess.run([str(BIN / "mae-ops"), "pipeline", "pretrian"], cwd=repo, capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)  # fmt: skip
    assert typo.returncode == 2 and typo.stderr.strip() == "error: " + (
        "unknown stages ['pretrian']; stages are ['prepare', 'pretrain', 'finetune', 'baselines', 'evaluate', 'export']"
    ), typo.stderr  # one line, before Prefect starts


def test_pipeline_force_reaches_the_prepare_command(tmp_path: Path) -> None:
    """DVC runs the stage's fixed command, so `mae-ops pipeline --force` tells prepare to reuse
    nothing through its environment; a normal run does not."""
    from mae_ops.orchestration import tool_env
    from mae_ops.preparing import FORCE_ENV

    repo = git_dvc_repo(tmp_path / "repo")
    stage = {"cmd": f"echo forced=${FORCE_ENV} > seen.txt && cat seen.txt", "outs": ["seen.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"show": stage}}))
    lines: list[str] = []
    run_dvc_stage("show", repo, lines.append, force=True)
    assert any("forced=1" in line for line in lines), lines
    assert FORCE_ENV not in tool_env()
