"""`mae-ops study`: pre-training settings swept and scored on the validation split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
        probe = json.loads(next((reports / "runs").glob("*/probe.json")).read_text())
        assert probe["num_val"] > 0 and probe["knn_k"] == 20

        # a second run finds every setting scored: nothing is trained again
        encoders = {p: p.stat().st_mtime_ns for p in (root / "models/study").glob("*/encoder.pth")}
        again = study(cfg)
        assert again["directions"] == result["directions"]
        assert {p: p.stat().st_mtime_ns for p in encoders} == encoders
