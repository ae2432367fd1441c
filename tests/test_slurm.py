"""The cluster recipes, tried: `flows/slurm-pretrain.sbatch` and `flows/slurm-hpo-workers.sbatch`
submitted with sbatch to a real two-node Slurm cluster on 127.0.0.1 (slurmctld and two slurmd;
gloo on a CPU; the search's study in a real PostgreSQL).

CI starts the cluster with `.ci/slurm.sh` and sets MAE_OPS_TEST_SLURM_CONF to the slurm.conf
it prints (and MAE_OPS_REQUIRE_SLURM=1, so the test fails instead of skipping when the cluster
is missing); locally run `.ci/slurm.sh` and export its output as MAE_OPS_TEST_SLURM_CONF.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mae_ops import hpo
from mae_ops.data import PreparedData
from tests.conftest import BIN, REPO, ft_config, password_free, subprocess_env, tiny_project, write_params


@pytest.fixture
def slurm_env() -> dict[str, str]:
    conf = os.environ.get("MAE_OPS_TEST_SLURM_CONF")
    if not conf:
        if os.environ.get("MAE_OPS_REQUIRE_SLURM") == "1":
            pytest.fail("MAE_OPS_REQUIRE_SLURM=1 but MAE_OPS_TEST_SLURM_CONF is not set")
        pytest.skip("no Slurm cluster: run .ci/slurm.sh and export MAE_OPS_TEST_SLURM_CONF")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # one rank per node (the recipe's default is one per GPU); sbatch passes this environment on
    return {**subprocess_env(), "SLURM_CONF": conf, "MAE_OPS_NPROC_PER_NODE": "1", "MAE_OPS_RDZV_PORT": str(port)}


def _submit(repo: Path, env: dict[str, str], name: str, script: str, *options: str) -> subprocess.Popen:
    """sbatch a recipe of this repository from the project, as a user would, and wait for the job
    (--wait); its log is ``<name>.out`` in the project (``<name>-<task>.out`` for an array)."""
    out = f"{repo / name}-%a.out" if any(o.startswith("--array") for o in options) else f"{repo / name}.out"
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={out}", *options, str(REPO / "flows" / script)]
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pretrain(repo: Path, env: dict[str, str], name: str) -> subprocess.Popen:
    return _submit(repo, env, name, "slurm-pretrain.sbatch", "--gpus-per-node=0")


def _finish(job: subprocess.Popen, repo: Path, env: dict[str, str], name: str) -> tuple[int, str]:
    """The job's exit code and its logs; a job that hangs is cancelled and fails the test."""
    try:
        out = job.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], env=env, check=False)
        job.kill()
        out = f"job {name} still running after 600 s"
    logs = "".join(log.read_text() for log in sorted(repo.glob(f"{name}*.out")))
    if job.returncode is None or job.returncode < 0:
        pytest.fail(out + "\n" + logs[-3000:])
    return job.returncode, out + logs


def _rank_process(rank: int, job_name: str) -> int | None:
    """The pid of the stage's process with this RANK in this Slurm job (a worker of torchrun)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"mae_ops.cli" in cmdline and {f"RANK={rank}".encode(), f"SLURM_JOB_NAME={job_name}".encode()} <= environ:
            return int(proc.name)
    return None


def _run(cmd: list[str], repo: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_the_slurm_recipe_pretrains_on_two_nodes_and_dvc_records_it(tmp_path: Path, slurm_env: dict) -> None:
    repo = tiny_project(tmp_path / "project", pretrain={"batch_size": 64})
    _run([str(BIN / "mae-ops"), "pipeline", "prepare"], repo, slurm_env)
    _run(["git", "add", "-A"], repo, slurm_env)

    # a mistake in the params: the job fails, says why, and records nothing
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "data": {**params["data"], "img_size": 32}}))
    code, log = _finish(_pretrain(repo, slurm_env, "bad-params"), repo, slurm_env, "bad-params")
    assert code != 0 and "28px images but data.img_size is 32" in log, log[-3000:]
    assert not (repo / "reports/pretrain/metrics.json").exists()
    assert "pretrain" not in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    # the run, with rank 1 (one node's; rank 0 is on the other) killed after the first checkpoint:
    # torchrun restarts the ranks of both nodes, which resume from the checkpoint and finish
    params["pretrain"].update(epochs=4, save_every=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    job = _pretrain(repo, slurm_env, "pretrain")
    deadline = time.time() + 300
    while not (repo / "checkpoints/pretrain/last.pth").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = _rank_process(1, "pretrain")
    assert pid is not None, "rank 1 not found: the job ended before its first checkpoint"
    os.kill(pid, signal.SIGKILL)
    code, log = _finish(job, repo, slurm_env, "pretrain")
    assert code == 0, log[-3000:]
    assert "mae-pretrain: 2 nodes" in log and "pre-training done" in log, log[-3000:]
    metrics = json.loads((repo / "reports/pretrain/metrics.json").read_text())
    # two torchruns of one rank each met by rendezvous: one run of world size 2, resumed
    assert (metrics["world_size"], metrics["effective_batch"], metrics["epochs"]) == (2, 128, 4)
    assert metrics["resumed_from_epoch"] >= 1, metrics
    assert metrics["final_loss"] < metrics["first_loss"]
    # the recipe's `dvc commit` recorded the run: DVC and the pipeline see pre-training up to date
    status = _run([str(BIN / "dvc"), "status", "pretrain", "--json"], repo, slurm_env)
    assert json.loads(status) == {}, status
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]
    assert lock["params"]["params.yaml"]["pretrain"]["batch_size"] == 64
    out = _run([str(BIN / "mae-ops"), "pipeline", "pretrain"], repo, slurm_env)
    assert "0 stage(s) ran (none), 2 up to date" in out, out[-2000:]


def test_the_slurm_job_array_fills_one_postgres_study_with_hpo_workers(
    run_root: Path, postgres_url: str, slurm_env: dict
) -> None:
    bare, password = password_free(postgres_url)
    cfg = ft_config(
        run_root, "hpo.enabled=true", "hpo.n_trials=4", "hpo.pruner=none", "hpo.epochs=2",
        f"hpo.storage={bare}", f"hpo.study_name=slurm-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    write_params(cfg, run_root / "params.yaml")
    env = {**slurm_env, "OMP_NUM_THREADS": "1", **({"PGPASSWORD": password} if password else {})}
    job = _submit(run_root, env, "hpo", "slurm-hpo-workers.sbatch", "--array=0-1", "--gpus-per-task=0")
    code, out = _finish(job, run_root, env, "hpo")
    assert code == 0, out[-4000:]
    logs = [(run_root / f"hpo-{task}.out").read_text() for task in (0, 1)]
    # one worker per array task, each on its own node of the cluster
    assert [f"mae-hpo: worker {task} " in log for task, log in enumerate(logs)] == [True, True], logs
    assert sorted(log.split(" on ", 1)[1].split()[0] for log in logs) == ["node1", "node2"], logs

    name = hpo.study_name(cfg, PreparedData(cfg.data.out_dir).manifest["content_hash"])
    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials(deepcopy=False)
    assert len(trials) >= 4 and all(t.state in hpo.FINISHED for t in trials), [t.state for t in trials]
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost or run twice
    # both array tasks ran trials (each trial records its worker's host and process)
    assert len({t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}) == 2
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # distinct proposals
