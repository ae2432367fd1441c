"""`mae-ops study`: pre-training settings swept and scored on the validation split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

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
        assert len(result["directions"]) == 3 and all(" vs " in d or "spans" in d for d in result["directions"])
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


def test_paired_check_counts_the_images_only_one_setting_gets_right(tmp_path: Path) -> None:
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
    assert (c["only_a"], c["only_b"], c["pairs"]) == (40, 10, 400)
    assert c["diff"] == pytest.approx(30 / 400)
    assert c["p"] == pytest.approx(binomtest(40, 50, 0.5).pvalue) and c["p"] < 0.001
    # the paired interval is narrower than two independent accuracies' interval
    unpaired = plan._unpaired(c["a"], c["b"], 400)
    assert c["ci95"] < unpaired["ci95"] / 2
    # two seeds pool their pairs; seeds are matched, not rows' order
    rows_a.append(_probe_files(tmp_path, "a", 1, labels, a_right))
    rows_b.insert(0, _probe_files(tmp_path, "b", 1, labels, b_right))
    c2 = plan.paired(rows_a, rows_b, "linprobe_top1")
    assert (c2["only_a"], c2["only_b"], c2["pairs"]) == (80, 20, 800)
    assert c2["per_seed"] == pytest.approx([30 / 400, 30 / 400]) and "the same sign in every seed" in plan._said(c2)
    # predictions of another validation split cannot be paired: the check falls back, unpaired
    z = dict(np.load(rows_b[0]["predictions"]))
    z["val_ids"] = z["val_ids"] + 1
    np.savez(rows_b[0]["predictions"], **z)
    assert plan.paired(rows_a, rows_b, "linprobe_top1") is None

    groups = plan.group(rows_a + rows_b)
    g = groups["pretrain.mask_ratio"]["a"]
    assert g["seeds"] == 2 and g["linprobe_top1"] == pytest.approx(a_right.mean()) and g["linprobe_top1_std"] == 0


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
