"""Distributed HPO for real: two `mae-ops hpo-worker` processes (as on two
machines) share one Optuna study in PostgreSQL, then the fine-tuning stage
retrains from the study they filled.

.ci/run starts Debian's PostgreSQL on 127.0.0.1 and sets
MAE_OPS_TEST_POSTGRES_URL (and MAE_OPS_REQUIRE_POSTGRES=1, so the test fails
instead of skipping when the server is missing); locally run
`.ci/postgres.sh` and export the URL it prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mae_ops import hpo
from mae_ops.data import PreparedData
from mae_ops.stages import finetune
from tests.conftest import ft_config, password_free, subprocess_env, write_params


def test_workers_on_two_machines_share_one_postgres_study(
    run_root: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare, password = password_free(postgres_url)
    if password:
        monkeypatch.setenv("PGPASSWORD", password)
    cfg = ft_config(
        run_root, "hpo.enabled=true", "hpo.n_trials=4", "hpo.pruner=none", "hpo.epochs=2",
        f"hpo.storage={bare}", f"hpo.study_name=test-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    params = write_params(cfg, run_root / "params.yaml")
    if password:
        assert f":{password}@" not in params.read_text()
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mae_ops.cli", "hpo-worker", "--params", str(params)]
    workers = [
        subprocess.Popen([*cmd, "--worker", str(w)], cwd=run_root, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for w in (1, 2)
    ]  # fmt: skip
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]

    # what each worker says it ran, from its own output
    ran = [{int(n) for n in re.search(r"ran \d+ trial\(s\): \[([\d, ]*)\]", out).group(1).split(",") if n.strip()}
           for out in outputs]  # fmt: skip
    assert all(ran), f"a worker ran no trial: {ran}"
    assert not ran[0] & ran[1], "a trial number was run twice"

    data_hash = PreparedData(cfg.data.out_dir).manifest["content_hash"]
    name = hpo.study_name(cfg, data_hash)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost or duplicated
    assert {t.number for t in trials} == ran[0] | ran[1]
    assert all(t.state in hpo.FINISHED for t in trials), [t.state for t in trials]
    assert len(trials) >= 4
    assert len({t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}) == 2
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # distinct proposals

    # the pipeline's fine-tuning stage finds the study full and retrains from its best trial; its
    # password comes from MAE_OPS_STORAGE_PASSWORD (any database), the workers' from PGPASSWORD
    monkeypatch.delenv("PGPASSWORD", raising=False)
    if password:
        monkeypatch.setenv("MAE_OPS_STORAGE_PASSWORD", password)
    finetune.run(cfg)
    assert len(study.get_trials(deepcopy=False)) == len(trials)
    best = yaml.safe_load((run_root / "reports/hpo/best_params.json").read_text())
    assert best["study"] == name and best["trial"] == study.best_trial.number
    assert best["params"] == pytest.approx(study.best_params)
    assert (run_root / "models/finetune/model.pth").exists()
