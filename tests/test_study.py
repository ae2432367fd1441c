"""`mae-ops study`: pre-training settings swept and scored on the validation split."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest
from scipy.stats import t as t_dist

from mae_ops import study as plan
from mae_ops.reporting import read_predictions, write_predictions
from tests.conftest import BIN, load_flow_module, subprocess_env, tiny_config, tiny_project


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_study_runs_its_settings_as_dvc_experiments_and_resumes(tmp_path: Path) -> None:
    """Each setting is a DVC experiment run by DVC's queue: dvc exp show lists it with its
    params and its DVCLive metrics, the report is built from them, a second study queues
    nothing, and dvc exp apply brings a setting into the workspace."""
    from prefect.testing.utilities import prefect_test_harness

    root = tiny_project(tmp_path / "project", pretrain={"monitor_every": 0}, finetune={"linprobe_epochs": 2})
    # the stages a study runs (a project that ran its whole pipeline has the others' outputs in DVC's
    # cache, which `dvc exp apply` checks out too)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k in ("prepare", "pretrain", "finetune")}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=root, check=True, env=subprocess_env())
    overrides = ["study.finetune_epochs=1",
                 'study.sweeps={"pretrain.mask_ratio": [0.25, 0.75], "model.decoder_depth": [1, 2]}']  # fmt: skip
    study = load_flow_module("study").study
    with prefect_test_harness(server_startup_timeout=120):
        result = study(str(root), overrides)
        reports = root / "reports/study"
        rows = _rows(reports / "results.csv")
        names = ["study-pretrain.mask_ratio-0.25-s0", "study-pretrain.mask_ratio-0.75-s0",
                 "study-model.decoder_depth-1-s0", "study-model.decoder_depth-2-s0"]  # fmt: skip
        assert [r["run"] for r in rows] == names
        for r in rows:
            assert all(0.0 <= float(r[s]) <= 1.0 for s in ("knn_top1", "linprobe_top1", "finetune_top1"))
            assert int(r["num_val"]) > 0
        exps = plan.experiments(root)
        assert all(exps[n]["state"] == "success" for n in names)
        assert exps[names[0]]["params"]["pretrain"]["mask_ratio"] == 0.25
        assert exps[names[3]]["params"]["model"]["decoder_depth"] == 2
        one = exps[names[0]]
        assert one["params"]["hpo"]["enabled"] is False and one["params"]["finetune"]["epochs"] == 1
        # the scores are the experiment's own metrics, DVCLive's among them
        assert float(rows[0]["finetune_top1"]) == one["metrics"]["reports/finetune/metrics.json"]["val_top1"]
        assert float(rows[0]["linprobe_top1"]) == one["metrics"]["reports/pretrain/metrics.json"]["probe_val_top1"]
        assert one["metrics"]["reports/pretrain/live/metrics.json"]["step"] == 1
        assert "loss" in one["metrics"]["reports/pretrain/live/metrics.json"]
        assert "val_top1" in one["metrics"]["reports/finetune/live/metrics.json"]
        for key in ("pretrain_mask_ratio", "model_decoder_depth"):
            assert (reports / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
        summary = (reports / "summary.md").read_text()
        assert "## pretrain.mask_ratio" in summary and "Against the paper" in summary
        assert [(t["key"], t["score"]) for t in result["tests"]] == [
            ("pretrain.mask_ratio", "finetune_top1"), ("model.decoder_depth", "linprobe_top1"),
            ("model.decoder_depth", "finetune_top1")]  # fmt: skip
        # every check is paired on the same validation images
        assert all(t["p"] is not None and t["pairs"] == int(rows[0]["num_val"]) for t in result["tests"])

        # a second study finds every setting done on this commit: nothing is queued or run again
        again = study(str(root), overrides)
        assert again["directions"] == result["directions"]
        assert {n: e["rev"] for n, e in plan.experiments(root).items()} == {n: e["rev"] for n, e in exps.items()}

    # a setting is applied with DVC's own tool
    proc = subprocess.run([str(BIN / "dvc"), "exp", "apply", names[0]], cwd=root, env=subprocess_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    applied = yaml.safe_load((root / "params.yaml").read_text())
    assert applied["pretrain"]["mask_ratio"] == 0.25


def test_the_study_refuses_a_params_file_outside_a_project(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    proc = subprocess.run([str(BIN / "mae-ops"), "study", "--params", str(params)], capture_output=True, text=True,
                          env=subprocess_env())  # fmt: skip
    assert proc.returncode == 2 and "DVC experiments" in proc.stderr


def _probe_files(tmp: Path, name: str, seed: int, labels: np.ndarray, right: np.ndarray) -> dict:
    pred = np.where(right, labels, (labels + 1) % 10)
    path = tmp / f"{name}-{seed}.csv"
    write_predictions(path, np.arange(len(labels)), labels, {"linprobe": pred})
    return {
        "key": "pretrain.mask_ratio",
        "value": name,
        "seed": seed,
        "num_val": len(labels),
        "linprobe_top1": float(right.mean()),
        "predictions": str(path),
        "final_loss": 0.5,
        "pretrain_s": 1.0,
    }


def test_paired_check_counts_each_image_once_and_the_spread_between_seeds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    both = rng.random(400) < 0.6
    a_right, b_right = both.copy(), both.copy()
    a_right[:40] = True  # a alone right on the first 40 images, b alone on 10 others
    a_right[40:50], b_right[40:50] = False, True
    b_right[:40] = False
    rows_a = [_probe_files(tmp_path, "a", 0, labels, a_right)]
    rows_b = [_probe_files(tmp_path, "b", 0, labels, b_right)]
    c = plan.paired(rows_a, rows_b, "linprobe_top1")
    seed0 = c["per_seed"][0]
    assert (seed0["only_a"], seed0["only_b"], c["pairs"], c["seeds"]) == (40, 10, 400, 1)
    assert c["diff"] == pytest.approx(30 / 400)
    assert seed0["p"] == pytest.approx(binomtest(40, 50, 0.5).pvalue) and c["p"] < 0.001
    d = a_right.astype(float) - b_right
    assert c["ci95"] == pytest.approx(t_dist.ppf(0.975, 399) * d.std(ddof=1) / 20)  # the paired t interval
    assert c["ci95"] < plan._unpaired(c["a"], c["b"], 400)["ci95"] / 2  # narrower than two independent accuracies

    # the same predictions again as a second seed add no evidence: an image counts once
    rows_a.append(_probe_files(tmp_path, "a", 1, labels, a_right))
    rows_b.insert(0, _probe_files(tmp_path, "b", 1, labels, b_right))  # seeds are matched, not rows' order
    copied = plan.paired(rows_a, rows_b, "linprobe_top1")
    assert (copied["pairs"], copied["seeds"]) == (400, 2)
    assert copied["p"] == pytest.approx(c["p"]) and copied["ci95"] == pytest.approx(c["ci95"])
    assert "the same sign in every seed" in plan._said(copied)

    # a second seed that disagrees: the run-to-run spread widens the interval, the gap is not significant
    flipped = [_probe_files(tmp_path, "a", 1, labels, b_right), _probe_files(tmp_path, "b", 1, labels, a_right)]
    noisy = plan.paired([rows_a[0], flipped[0]], [rows_b[1], flipped[1]], "linprobe_top1")
    assert noisy["diff"] == pytest.approx(0.0) and noisy["p"] > 0.5 and noisy["se_seeds"] > noisy["se_images"]
    assert "the sign changes between seeds" in plan._said(noisy)
    spread = [_probe_files(tmp_path, "a", 1, labels, a_right & (rng.random(400) < 0.9)), rows_b[0]]
    wide = plan.paired([rows_a[0], spread[0]], [rows_b[1], spread[1]], "linprobe_top1")
    gaps = [s["diff"] for s in wide["per_seed"]]
    assert wide["se_seeds"] == pytest.approx(np.std(gaps, ddof=1) / 2**0.5) and wide["se_seeds"] > 0
    se = (wide["se_images"] ** 2 + wide["se_seeds"] ** 2) ** 0.5  # both noise sources in the interval
    assert wide["ci95"] == pytest.approx(t_dist.ppf(0.975, wide["df"]) * se) and wide["df"] < 399

    # predictions of another validation split cannot be paired: the check falls back, unpaired
    z = read_predictions(Path(rows_b[0]["predictions"]).read_text())
    write_predictions(rows_b[0]["predictions"], z.pop("id") + 1, z.pop("label"), z)
    assert plan.paired(rows_a, rows_b, "linprobe_top1") is None

    groups = plan.group(rows_a + rows_b)
    g = groups["pretrain.mask_ratio"]["a"]
    assert g["seeds"] == 2 and g["linprobe_top1"] == pytest.approx(a_right.mean()) and g["linprobe_top1_std"] == 0
    # the error bar counts each validation image once, whatever the number of seeds
    acc = a_right.mean()
    assert plan.accuracy_halfwidth(g, "linprobe_top1") == pytest.approx(1.96 * (acc * (1 - acc) / 400) ** 0.5)


def test_holm_and_planned_pairs_do_not_depend_on_the_scores() -> None:
    assert plan.holm([0.01, None, 0.04, 0.03]) == [pytest.approx(0.03), None, pytest.approx(0.06),
                                                   pytest.approx(0.06)]  # fmt: skip
    base = {"rows": [], "num_val": 100, "seeds": 1}
    dec = {v: {**base, "linprobe_top1": top1, "finetune_top1": 0.5} for v, top1 in ((1, 0.3), (2, 0.1), (4, 0.2))}
    tests = plan.directions({"model.decoder_depth": dec})[1]
    assert {(t["setting_a"], t["setting_b"]) for t in tests} == {(4, 1)}  # deepest vs shallowest, not best vs worst
    init = {v: {**base, "linprobe_top1": 0.4, "finetune_top1": 0.5} for v in (None, "/w/mae_full.pth")}
    tests = plan.directions({"pretrain.init": init})[1]
    assert {(t["setting_a"], t["setting_b"], t["score"]) for t in tests} == {
        ("/w/mae_full.pth", None, "linprobe_top1"),
        ("/w/mae_full.pth", None, "finetune_top1"),
    }
    assert tests[0]["check"] == "continued from mae_full.pth vs scratch"
    assert plan.label("pretrain.init", None) == "scratch" and plan.label("model.decoder_depth", None) == "preset"


def test_each_setting_is_one_experiment_with_its_overrides(tmp_path: Path) -> None:
    sweeps = 'study.sweeps={"pretrain.mask_ratio": [0.5, 0.75], "pretrain.init": [null, "/w/mae_full.pth"]}'
    cfg = tiny_config(tmp_path, "study.seeds=[0, 1]", "study.finetune_epochs=3", "pretrain.monitor_every=0", sweeps)
    runs = plan.settings(cfg)
    assert [(r.key, r.value, r.seed) for r in runs][:4] == [
        ("pretrain.mask_ratio", 0.5, 0), ("pretrain.mask_ratio", 0.5, 1), ("pretrain.mask_ratio", 0.75, 0),
        ("pretrain.mask_ratio", 0.75, 1)]  # fmt: skip
    assert len({r.name for r in runs}) == 8 and runs[6].name == "study-pretrain.init-mae_full.pth-s0"
    first = set(runs[0].sets)
    assert {"pretrain.seed=0", "finetune.seed=0", "pretrain.mask_ratio=0.5", "hpo.enabled=false",
            "finetune.epochs=3", f"pretrain.monitor_every={cfg.pretrain.epochs}"} <= first  # fmt: skip
    assert "pretrain.init=null" in runs[4].sets and 'pretrain.init="/w/mae_full.pth"' in runs[6].sets
    assert all(r.target == "finetune" for r in runs)
    probes_only = plan.settings(tiny_config(tmp_path, "study.finetune_epochs=0", "pretrain.monitor_every=2"))
    assert all(r.target == "pretrain" and not any(x.startswith(("finetune.epochs", "pretrain.monitor_every"))
                                                  for x in r.sets) for r in probes_only)  # fmt: skip


def test_a_setting_runs_again_when_its_params_changed_or_it_failed(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"epochs": 2}, "study": {"seeds": [0]}}))
    cfg = tiny_config(tmp_path, 'study.sweeps={"pretrain.mask_ratio": [0.5, 0.75]}')
    runs = plan.settings(cfg)
    done = {r.name: {"state": "success", "params": plan.wanted_params(tmp_path, r)} for r in runs}
    assert plan.to_run(tmp_path, runs, done) == []
    # the study section changes no result; another epoch count does; so does a failure
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"epochs": 2}, "study": {"seeds": [0, 1]}}))
    assert plan.to_run(tmp_path, runs, done) == []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"epochs": 3}, "study": {"seeds": [0]}}))
    assert plan.to_run(tmp_path, runs, done) == runs
    done = {r.name: {"state": "success", "params": plan.wanted_params(tmp_path, r)} for r in runs}
    done[runs[1].name]["state"] = "failed"
    assert plan.to_run(tmp_path, runs, done) == [runs[1]]
