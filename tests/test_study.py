"""`mae-ops study`: pre-training settings swept and scored on the validation split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from scipy.stats import t as t_dist

from mae_ops import study as plan
from tests.conftest import load_flow_module, tiny_config


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_study_runs_each_setting_once_scores_it_and_resumes(mnist_root: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    root = mnist_root
    cfg = tiny_config(
        root, "pretrain.epochs=1", "pretrain.norm_pix_loss=true", "finetune.linprobe_epochs=3",
        "study.finetune_epochs=1", f"study.models_dir={root}/models/study", f"study.reports_dir={root}/reports/study",
        'study.sweeps={"pretrain.mask_ratio": [0.25, 0.75], "pretrain.norm_pix_loss": [false, true], '
        '"model.decoder_depth": [1, 2]}',
    )  # fmt: skip
    runs = plan.settings(cfg, "data")
    assert len(runs) == 6 and len({r["run"] for r in runs}) == 4  # mask 0.75 = norm-pix on = depth 1 (the preset's)
    assert {r["config"].model.decoder_depth for r in runs} == {None, 1, 2}

    study = load_flow_module("study").study
    with prefect_test_harness(server_startup_timeout=120):
        result = study(cfg)
        reports = root / "reports/study"
        rows = _rows(reports / "results.csv")
        assert [(r["key"], r["value"]) for r in rows] == [(r["key"], str(r["value"])) for r in runs]
        for r in rows:
            for score in ("knn_top1", "linprobe_top1", "finetune_top1"):
                assert 0.0 <= float(r[score]) <= 1.0
        assert len(list((root / "models/study").iterdir())) == 4
        for key in ("pretrain_mask_ratio", "pretrain_norm_pix_loss", "model_decoder_depth"):
            assert (reports / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
        summary = (reports / "summary.md").read_text()
        assert "## pretrain.mask_ratio" in summary and "Against the paper" in summary
        # the planned checks: mask, norm-pix, and decoder depth on the probe and on fine-tuning
        assert [(t["key"], t["score"]) for t in result["tests"]] == [
            ("pretrain.mask_ratio", "finetune_top1"), ("pretrain.norm_pix_loss", "finetune_top1"),
            ("model.decoder_depth", "linprobe_top1"), ("model.decoder_depth", "finetune_top1")]  # fmt: skip
        assert all(t["p_holm"] >= t["p"] for t in result["tests"]) and len(result["directions"]) == 4
        probe = json.loads(next((reports / "runs").glob("*/probe-*.json")).read_text())
        assert probe["num_val"] > 0 and probe["knn_k"] == 20
        # the 1-epoch probe fine-tune warms up for the full fine-tune's share of its epochs, not 5 epochs
        share = cfg.finetune.warmup_epochs / cfg.finetune.epochs
        assert probe["finetune_warmup_epochs"] == pytest.approx(share, abs=1e-3)
        # every check is paired on the same validation images
        assert result["tests"] and all(t["p"] is not None and t["pairs"] == probe["num_val"] for t in result["tests"])

        # a second run finds every setting scored: nothing is trained again
        encoders = {p: p.stat().st_mtime_ns for p in (root / "models/study").glob("*/encoder.pth")}
        again = study(cfg)
        assert again["directions"] == result["directions"]
        assert {p: p.stat().st_mtime_ns for p in encoders} == encoders


def _probe_files(tmp: Path, name: str, seed: int, labels: np.ndarray, right: np.ndarray) -> dict:
    pred = np.where(right, labels, (labels + 1) % 10)
    path = tmp / f"{name}-{seed}.predictions.npz"
    np.savez(path, val_ids=np.arange(len(labels)), labels=labels, linprobe=pred)
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
    z = dict(np.load(rows_b[0]["predictions"]))
    z["val_ids"] = z["val_ids"] + 1
    np.savez(rows_b[0]["predictions"], **z)
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


def test_a_continued_setting_is_keyed_by_its_checkpoints_content(tmp_path: Path) -> None:
    weights = tmp_path / "mae_full.pth"
    sweep = f'study.sweeps={{"pretrain.init": [null, "{weights}"]}}'
    weights.write_bytes(b"one")
    first = plan.settings(tiny_config(tmp_path, sweep), "data")
    weights.write_bytes(b"two")
    second = plan.settings(tiny_config(tmp_path, sweep), "data")
    assert first[0]["run"] == second[0]["run"]  # from scratch: the same run
    assert first[1]["run"] != second[1]["run"]  # other weights under the same name: another run


def test_seeds_multiply_the_runs_and_fine_tuning_params_rescore(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "study.seeds=[0, 1]", 'study.sweeps={"pretrain.mask_ratio": [0.5, 0.75]}')
    runs = plan.settings(cfg, "data")
    assert [(r["value"], r["seed"]) for r in runs] == [(0.5, 0), (0.5, 1), (0.75, 0), (0.75, 1)]
    assert len({r["run"] for r in runs}) == 4
    assert all(r["config"].pretrain.seed == r["seed"] == r["config"].finetune.seed for r in runs)
    other = plan.settings(tiny_config(tmp_path, "study.seeds=[0, 1]", "finetune.base_lr=0.01",
                                      'study.sweeps={"pretrain.mask_ratio": [0.5, 0.75]}'), "data")  # fmt: skip
    assert [r["run"] for r in other] == [r["run"] for r in runs]  # the same encoders...
    assert not {r["probe"] for r in other} & {r["probe"] for r in runs}  # ...scored again
