"""Fault injection: kill -9, runs at once, full disks, corrupt files, bad input.

Every test here reproduces a failure a user met (issue 14) with the real
components (DVC in a git repo, Prefect flows, Optuna's SQLite storage,
onnxruntime), and checks the outcome: one clear line, nothing lost, and a
re-run that completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState

from mae_ops import atomic, finetuning, hpo, registry, runtime
from mae_ops.config import ParamsError, load_params
from mae_ops.data import PreparedData
from mae_ops.orchestration import StageFailed, run_dvc_stage, run_summary
from mae_ops.stages import finetune, pretrain
from mae_ops.training import Checkpointer
from tests.conftest import BIN, REPO, ft_config, git_dvc_repo, subprocess_env, tiny_config, tiny_project, write_params

MAE_OPS = [str(BIN / "mae-ops")]


def _cli(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MAE_OPS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**subprocess_env(), **env})  # fmt: skip


def _one_clear_line(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in proc.stderr[proc.stderr.index("error:") :], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


PARAMS_WITH_COMMENTS = "# my own notes, kept by --set\n"


def _project(root: Path, **sections: dict) -> Path:
    """A real pipeline project with the user's comments at the top of params.yaml."""
    repo = tiny_project(root, **sections)
    (repo / "params.yaml").write_text(PARAMS_WITH_COMMENTS + (repo / "params.yaml").read_text())
    return repo


def _dvc_clean(repo: Path, *stages: str) -> bool:
    out = subprocess.run([str(BIN / "dvc"), "status", "--json", *stages], cwd=repo, capture_output=True, text=True,
                         env=subprocess_env(), check=True).stdout  # fmt: skip
    return json.loads(out or "{}") == {}


def _wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_group(proc: subprocess.Popen) -> None:
    """kill -9 of the run and everything it started (dvc, the stage, Prefect's server): a crash."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*MAE_OPS, *args], cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


# ------------------------------------------------------------- kill -9 and re-run
def test_kill_9_in_pretrain_and_in_a_trial_then_the_rerun_completes(tmp_path: Path) -> None:
    repo = _project(tmp_path / "project", pretrain={"epochs": 8, "save_every": 2, "batch_size": 128},
                    hpo={"n_trials": 3, "epochs": 4, "startup_trials": 3})  # fmt: skip
    stages = ["prepare", "pretrain", "finetune"]

    # 1. kill -9 during pre-training, after its first checkpoint
    run = _start(["pipeline", *stages], repo)
    ckpt = repo / "checkpoints/pretrain/last.pth"
    _wait_for(ckpt.exists, 300, run, "the first pre-training checkpoint")
    _kill_group(run)
    saved_epoch = int(torch.load(ckpt, weights_only=True)["epoch"])

    # 2. kill -9 during an HPO trial (after pre-training resumed and finished)
    run = _start(["pipeline", *stages], repo)
    db = repo / "optuna/finetune.db"

    def a_trial_runs() -> bool:
        if not db.exists():
            return False
        with contextlib.suppress(Exception):
            summaries = optuna.get_all_study_summaries(f"sqlite:///{db}")
            if summaries:
                study = optuna.load_study(study_name=summaries[0].study_name, storage=f"sqlite:///{db}")
                # a trial its worker has signed: one killed in the few ms between the ask and
                # the signature would make the rerun wait 30 s before failing it
                trials = study.get_trials(deepcopy=False)
                return any(t.state == TrialState.RUNNING and "worker" in t.user_attrs for t in trials)
        return False

    _wait_for(a_trial_runs, 400, run, "an HPO trial")
    _kill_group(run)  # at once: a trial here lasts 2 s, and the next one starts unsigned
    pre = json.loads((repo / "reports/pretrain/metrics.json").read_text())
    assert pre["resumed_from_epoch"] == saved_epoch + 1  # at most one checkpoint interval was lost

    # 3. a second run while the third is going is refused with one line; the third completes
    run = _start(["pipeline", *stages], repo)
    lock = repo / ".dvc/tmp/mae-ops-pipeline.lock"  # still names the killed run: wait for this one's pid
    _wait_for(lambda: lock.exists() and f"pid {run.pid} " in lock.read_text(), 120, run, "the lock")
    _one_clear_line(_cli(["pipeline", *stages], repo, timeout=120), "another pipeline run")
    out, _ = run.communicate(timeout=900)
    assert run.returncode == 0, out[-4000:]
    assert _dvc_clean(repo, *stages)
    trials = pd.read_csv(repo / "reports/hpo/trials.csv")
    assert "RUNNING" not in set(trials["state"])  # the killed trial was failed (and queued again)
    assert "FAIL" in set(trials["state"])
    done = trials[trials["state"] != "FAIL"]
    params = [c for c in trials.columns if c.startswith("params_")]
    assert not done.duplicated(subset=params).any()  # the resumed search did not replay a finished trial

    # 4. the search switched off: the pipeline runs to the end (reports/hpo was a missing output);
    #    the override keeps the user's comments and is reported
    proc = _cli(["pipeline", "finetune", "--set", "hpo.enabled=false"], repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hpo.enabled: True -> False" in proc.stdout + proc.stderr
    assert (repo / "params.yaml").read_text().startswith(PARAMS_WITH_COMMENTS)
    assert "hpo.enabled is false" in (repo / "reports/hpo/README.md").read_text()
    assert not (repo / "reports/hpo/trials.csv").exists()  # no stale search reports
    assert _dvc_clean(repo, *stages)


def test_pipeline_params_replaces_params_yaml_once_it_is_valid(tmp_path: Path) -> None:
    """`mae-ops pipeline --params other.yaml` runs with that file: it becomes params.yaml (DVC's
    stages read it, dvc.lock records it); a bad one is refused, naming the key, and changes nothing."""
    repo = _project(tmp_path / "project")
    before = (repo / "params.yaml").read_text()
    params = yaml.safe_load(before)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**params, "pretrain": {**params["pretrain"], "mask_ratio": 3}}))
    _one_clear_line(_cli(["pipeline", "prepare", "--params", str(bad)], repo), "pretrain.mask_ratio")
    assert (repo / "params.yaml").read_text() == before
    other = tmp_path / "other.yaml"
    other.write_text(
        "# another data set\n" + yaml.safe_dump({**params, "data": {**params["data"], "val_fraction": 0.2}})
    )
    proc = _cli(["pipeline", "prepare", "--params", str(other), "--set", "data.seed=3"], repo)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = (repo / "params.yaml").read_text()
    assert written.startswith("# another data set")  # the file itself, comments kept, then --set on top
    assert yaml.safe_load(written)["data"] == {**params["data"], "val_fraction": 0.2, "seed": 3}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["val_fraction"] == 0.2
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["split_definition"]["val_fraction"] == 0.2


def test_a_pipeline_that_fails_preflight_changes_nothing(tmp_path: Path) -> None:
    repo = _project(tmp_path / "project")
    assert _cli(["pipeline", "prepare"], repo).returncode == 0
    params_before = (repo / "params.yaml").read_text()
    manifest_before = (repo / "data/prepared/manifest.json").read_text()
    missing = tmp_path / "no-such-folder"
    proc = _cli(["pipeline", "--set", f"data.source={missing}"], repo)
    _one_clear_line(proc, "data.source: folder not found")
    assert (repo / "params.yaml").read_text() == params_before  # the failed override is not kept
    assert (repo / "data/prepared/manifest.json").read_text() == manifest_before

    # a stage that stops on a user's mistake fails the run with its own line, and is not retried
    if not torch.cuda.is_available():
        proc = _cli(["pipeline", "pretrain", "--set", "pretrain.device=cuda"], repo)
        assert proc.returncode == 2
        assert "error: stage 'pretrain': device 'cuda' requested but CUDA is not available" in proc.stderr
        assert (proc.stdout + proc.stderr).count("Running stage 'pretrain'") == 1  # no retry
        (repo / "params.yaml").write_text(params_before)

    # a database password in params is refused, and appears nowhere
    secret = f"pw{uuid.uuid4().hex[:10]}"
    proc = _cli(["pipeline", "--set", f"hpo.storage=postgresql+psycopg://u:{secret}@127.0.0.1/db"], repo)
    _one_clear_line(proc, "hpo.storage: holds a password")
    assert secret not in proc.stdout + proc.stderr
    assert (repo / "params.yaml").read_text() == params_before
    for path in repo.rglob("*"):
        if path.is_file() and ".git" not in path.parts and path.stat().st_size < 10_000_000:
            assert secret.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------ two at once
def _image_folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, (i // 160, i % 160), axis=(0, 1))).save(path, quality=90)  # all distinct
    return root


def test_two_prepares_at_once_one_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    source = _image_folder(tmp_path / "images", 3000)
    cfg = tiny_config(tmp_path / "run", f"data.source={source}", "data.img_size=32")
    params = write_params(cfg, tmp_path / "params.yaml")
    runs = [_start(["prepare", "--params", str(params)], tmp_path) for _ in range(2)]  # at the same moment
    logs = [run.communicate(timeout=300)[0] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], logs
    refused = logs[[run.returncode for run in runs].index(2)]
    assert "another `mae-ops prepare` is writing it" in refused and "Traceback" not in refused
    assert PreparedData(cfg.data.out_dir).manifest["num_images"] == 3000


def test_a_crash_between_the_two_renames_loses_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "prepared"
    old = tmp_path / ".prepared.old-abc123"  # the previous output, moved aside when the run died
    old.mkdir()
    (old / "manifest.json").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_dir(dest):
        assert (dest / "manifest.json").read_text() == "previous"  # put back before anything else
        raise RuntimeError("boom")
    assert (dest / "manifest.json").read_text() == "previous" and not old.exists()
    with atomic.file_lock(tmp_path / ".prepared.lock", "prepared"):  # another process holds the folder
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from mae_ops.atomic import atomic_dir\n"
             "with atomic_dir(sys.argv[1]) as t: pass", str(dest)],
            capture_output=True, text=True, env=subprocess_env(),
        )  # fmt: skip
    assert proc.returncode != 0 and "BusyError" in proc.stderr
    assert (dest / "manifest.json").read_text() == "previous"


def _register_one(args: tuple[str, str]) -> str:
    return registry.register(Path(args[0]), Path(args[1]))["version"]


def test_concurrent_registrations_get_distinct_versions(tmp_path: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    repo = tmp_path / "run"
    (repo / "models/export").mkdir(parents=True)
    (repo / "models/export/model.onnx").write_bytes(os.urandom(4_000_000))
    (repo / "reports").mkdir()
    (repo / "reports/metrics.json").write_text('{"finetune": {"top1": 0.9}}')
    (repo / "data/prepared").mkdir(parents=True)
    (repo / "data/prepared/manifest.json").write_text('{"source_hash": "s", "content_hash": "c"}')
    reg = tmp_path / "registry"
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        versions = list(pool.map(_register_one, [(str(repo), str(reg))] * 6))
    assert sorted(versions) == [f"v{i:04d}" for i in range(1, 7)]
    for v in versions:
        assert json.loads((reg / "versions" / v / "info.json").read_text())["version"] == v
    assert [e["event"] for e in registry.history(reg)].count("registered") == 6


# ------------------------------------------------------------------- full disks
@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_one_clear_line_and_keeps_the_previous_outputs(tmp_path: Path, prepared_mnist: Path) -> None:
    with _tmpfs(tmp_path / "small", "6m") as small:
        # prepare: the previous data (4 MB) fills most of the disk; the new run (other pixels: 32 px,
        # so nothing can be reused from it) cannot fit
        out = small / "prepared"
        shutil.copytree(prepared_mnist, out)
        before = (out / "manifest.json").read_text()
        cfg = tiny_config(tmp_path, f"data.out_dir={out}", "data.img_size=32")
        proc = _cli(["prepare", "--params", str(write_params(cfg, tmp_path / "p1.yaml"))], tmp_path)
        _one_clear_line(proc, "disk full")
        assert (out / "manifest.json").read_text() == before
        assert not list(small.glob(".prepared.new-*"))
        shutil.rmtree(out)

        # a checkpoint write: the earlier checkpoint stays as it was
        ckpt_dir = small / "ckpt"
        ckpt_dir.mkdir()
        torch.save({"args": {"fingerprint": "an-earlier-run"}, "epoch": 0}, ckpt_dir / "last.pth")
        earlier = (ckpt_dir / "last.pth").read_bytes()
        (small / "filler").write_bytes(b"\0" * (6 * 2**20 - 300_000))  # leave less than one checkpoint
        cfg = tiny_config(tmp_path, f"data.out_dir={prepared_mnist}", f"pretrain.checkpoint_dir={ckpt_dir}",
                          "pretrain.save_every=1", "pretrain.epochs=1")  # fmt: skip
        proc = _cli(["pretrain", "--params", str(write_params(cfg, tmp_path / "p2.yaml"))], tmp_path)
        _one_clear_line(proc, "disk full")
        assert (ckpt_dir / "last.pth").read_bytes() == earlier


def test_dvc_failing_to_cache_an_output_fails_the_stage(tmp_path: Path) -> None:
    repo = git_dvc_repo(tmp_path / "repo")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"big": {
        "cmd": "head -c 3000000 /dev/urandom > out.bin", "outs": ["out.bin"]}}}))  # fmt: skip
    with _tmpfs(repo / ".dvc" / "cache", "1m"), pytest.raises(StageFailed, match="stage 'big'"):
        run_dvc_stage("big", repo, lambda line: None)  # DVC itself exited 0 and recorded the output
    # nothing changed, and the stage is run (and recorded) properly once there is room
    assert run_dvc_stage("big", repo, lambda line: None).ran
    assert not run_dvc_stage("big", repo, lambda line: None).ran


# ------------------------------------------------------------ corrupt files
def test_a_corrupt_production_pointer_is_named_and_promote_repairs_it(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    version = reg / "versions" / "v0001"
    version.mkdir(parents=True)
    (version / "info.json").write_text(json.dumps({"version": "v0001", "test_top1": 0.9, "created": "now",
                                                   "git_revision": "abc"}))  # fmt: skip
    (reg / "production.json").write_text('{"version": "v00')  # cut short by a crash or a bad edit
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"retrain": {"registry_dir": str(reg)}}))
    for item in ("flows", "dvc.yaml"):
        (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, tmp_path / item)
    for args in (["registry", "list"], ["registry", "show"], ["retrain"]):
        _one_clear_line(_cli([*args, "--params", str(params)], tmp_path), f"{reg / 'production.json'} is corrupt")
    proc = _cli(["registry", "promote", "v0001", "--params", str(params)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert registry.production(reg)["version"] == "v0001"

    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"retrain": {"registry_dir": str(tmp_path / "none")}}))
    _one_clear_line(_cli(["registry", "show", "--params", str(empty)], tmp_path), "no production model")
    listed = _cli(["registry", "list", "--params", str(empty)], tmp_path)
    assert listed.returncode == 0 and "no model versions registered" in listed.stderr


def test_a_corrupt_checkpoint_is_named_and_left_alone(tmp_path: Path, prepared_mnist: Path) -> None:
    ckpt = tmp_path / "ckpt" / "last.pth"
    ckpt.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}, "args": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-200])  # truncated by a kill during a non-atomic copy
    damaged = ckpt.read_bytes()
    cfg = tiny_config(tmp_path, f"data.out_dir={prepared_mnist}", f"pretrain.checkpoint_dir={ckpt.parent}")
    proc = _cli(["pretrain", "--params", str(write_params(cfg, tmp_path / "p.yaml"))], tmp_path)
    _one_clear_line(proc, f"{ckpt} is not a readable checkpoint")
    assert ckpt.read_bytes() == damaged
    with pytest.raises(Exception, match="not a readable checkpoint"):
        Checkpointer(ckpt, "x").load()


# -------------------------------------------------------------- HPO faults
def test_mixup_with_odd_batches_does_not_kill_the_study(run_root: Path) -> None:
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=2", "hpo.epochs=1", "hpo.pruner=none",
                    "finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.batch_size=33")  # fmt: skip
    finetune.run(cfg)  # timm's Mixup asserts an even batch: an odd one killed the whole study
    trials = pd.read_csv(run_root / "reports/hpo/trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE"]


def test_fp16_fine_tuning_scales_its_loss(run_root: Path) -> None:
    cfg = ft_config(run_root, "finetune.amp=fp16", "finetune.epochs=1", "finetune.save_every=1")
    data = PreparedData(cfg.data.out_dir, hide_test=True)
    rt = runtime.setup("cpu", "fp16")
    checkpointer = Checkpointer(run_root / "ft.pth", "fp16-run")
    result = finetuning.train_finetune(finetuning.encoder_spec(cfg, "pretrain"), cfg.finetune, data, rt, epochs=1,
                                       checkpointer=checkpointer)  # fmt: skip
    assert np.isfinite(result.history[-1]["train_loss"])
    scaler = torch.load(run_root / "ft.pth", weights_only=True)["scaler"]
    assert scaler and scaler["scale"] > 1.0  # a GradScaler scaled the fp16 loss


def test_kept_trial_models_missing_here_are_retrained(run_root: Path) -> None:
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=2", "hpo.epochs=1", "hpo.retrain=false",
                    "hpo.pruner=none")  # every trial finishes and keeps its model  # fmt: skip
    finetune.run(cfg)
    kept = list((run_root / "checkpoints/finetune/hpo").rglob("trial-*.pth"))
    assert len(kept) == 2  # kept in hpo.trial_dir, under the study's name
    for path in kept:  # as if the workers were other machines with their own disks
        path.unlink()
    finetune.run(cfg)
    metrics = json.loads((run_root / "reports/finetune/metrics.json").read_text())
    assert "not readable here" in metrics["hpo"]["retrained"]
    assert metrics["epochs"] == cfg.finetune.epochs


def test_a_dead_workers_trial_is_failed_and_a_resumed_search_proposes_new_params(run_root: Path) -> None:
    cfg = ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=1", "hpo.epochs=1", "hpo.pruner=none")
    finetune.run(cfg)
    data = PreparedData(cfg.data.out_dir)
    study = hpo.create_study(cfg, data.manifest["content_hash"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = study.ask()  # a trial whose worker was killed before its first heartbeat
    ghost.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    finetune.run(ft_config(run_root, "hpo.enabled=true", "hpo.n_trials=3", "hpo.epochs=1", "hpo.pruner=none"))
    trials = pd.read_csv(run_root / "reports/hpo/trials.csv")
    assert trials.loc[trials["number"] == ghost.number, "state"].item() == "FAIL"
    assert "RUNNING" not in set(trials["state"])
    first, *later = [tuple(r) for r in trials[trials["state"] == "COMPLETE"].filter(like="params_").to_numpy()]
    assert first not in later  # trial 0's params were not proposed again


def _worker_killed_after(url: str, sign: bool) -> None:
    """A worker process that asks the study for a trial and is killed (SIGKILL) before its
    objective signs it, or after it signed it and drew a learning rate."""
    steps = "t = s.ask()" + ("; t.set_user_attr('worker', f'{socket.gethostname()}:{os.getpid()}')"
                             "; t.suggest_float('lr', 0.1, 1.0)" if sign else "")  # fmt: skip
    code = (f"import os, signal, socket, optuna; s = optuna.load_study(study_name='s', storage={url!r}); "
            f"{steps}; os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_trials_of_dead_workers_fail_and_a_live_worker_s_trial_waits_for_its_signature(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    _worker_killed_after(url, sign=False)  # between Optuna's ask and the signature: no heartbeat either
    _worker_killed_after(url, sign=True)
    live = study.ask()  # this process's worker signs its trial 2 s after asking
    sign = threading.Timer(2.0, live.set_user_attr, ("worker", f"{socket.gethostname()}:{os.getpid()}"))
    sign.start()
    start = time.monotonic()
    failed = hpo.fail_dead_trials(study, grace_s=4)
    waited = time.monotonic() - start
    sign.join()
    assert sorted(failed) == [0, 1] and 4 <= waited < 30, (failed, waited)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    retry = trials[3]  # the signed trial's params are queued once more; the unsigned one had none
    assert len(trials) == 4 and retry.state == TrialState.WAITING
    assert retry.user_attrs == {"retry_of": 1} and retry.system_attrs["fixed_params"] == trials[1].params
    assert hpo.fail_dead_trials(study, grace_s=4) == []  # the live trial is signed now: no wait, nothing failed


# ---------------------------------------------------- inputs that make no sense
def test_inputs_that_cannot_make_sense_are_refused(tmp_path: Path, prepared_mnist: Path) -> None:
    with pytest.raises(ParamsError, match=r"pretrain.mask_ratio \(0.99\) leaves 0 of 49 patches visible"):
        load_params(None, ["pretrain.mask_ratio=0.99"])

    # a batch larger than the data: the lr follows the batch really used
    root = tmp_path / "big-batch"
    shutil.copytree(prepared_mnist, root / "data/prepared")
    cfg = tiny_config(root, "pretrain.epochs=1", "pretrain.batch_size=100000", "pretrain.base_lr=0.001")
    metrics = pretrain.run(cfg)
    n = metrics["num_images"]
    assert metrics["effective_batch"] == n and metrics["lr"] == pytest.approx(0.001 * n / 256)

    # `serve` without a Prefect server would wait for ever: refused at once
    env = {k: v for k, v in subprocess_env().items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([*MAE_OPS, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**env, "PREFECT_HOME": str(tmp_path / "prefect")})  # fmt: skip
    _one_clear_line(proc, "needs a Prefect server")


# ------------------------------------------------------------------- messages
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    from mae_ops import cli
    from mae_ops.stages import evaluate

    monkeypatch.setitem(cli._DEBUG, "on", False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mae-ops", "evaluate"])
    with pytest.raises(SystemExit) as stop:  # a user's mistake: nothing prepared yet
        cli.main()
    assert stop.value.code == 2 and "run `mae-ops prepare` first" in capsys.readouterr().err

    def bug(cfg):
        raise FileNotFoundError("/internal/lookup-table.json")  # a programming error

    monkeypatch.setattr(evaluate, "run", bug)
    with pytest.raises(FileNotFoundError, match="lookup-table"):  # not turned into a one-liner
        cli.main()
    monkeypatch.setattr(sys, "argv", ["mae-ops", "--debug", "prepare", "--set", "data.source=/nowhere"])
    with pytest.raises(Exception, match="folder not found"):  # --debug: the user's error with its traceback
        cli.main()


def test_an_onnx_file_with_our_metadata_and_another_graph_is_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["logits"])], "other",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    helper.set_model_props(model, {"classes": '["a", "b"]', "img_size": "8", "channels": "3"})
    onnx.save(model, tmp_path / "other.onnx")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    proc = _cli(["predict", str(tmp_path / "other.onnx"), str(tmp_path / "x.png")], tmp_path)
    _one_clear_line(proc, "does not match its mae-ops metadata")


def test_the_run_summary_shows_only_latency_measured_for_its_model(tmp_path: Path) -> None:
    (tmp_path / "models/finetune").mkdir(parents=True)
    (tmp_path / "models/finetune/model.pth").write_bytes(b"this run's model")
    bench = {"model_sha256": "0" * 64, "cpu": "x86_64", "measured": "2026-01-01T00:00:00",
             "results": {"torch_eager": {"batch1_p50_ms": 3.81}}}  # fmt: skip
    atomic.write_json(tmp_path / "reports/export/benchmark.json", bench)
    summary = run_summary(tmp_path, [], [])
    assert "3.81" not in summary and "not measured for this run's model" in summary
    import hashlib

    bench["model_sha256"] = hashlib.sha256(b"this run's model").hexdigest()
    atomic.write_json(tmp_path / "reports/export/benchmark.json", bench)
    assert "torch_eager 3.81 ms" in run_summary(tmp_path, [], [])
