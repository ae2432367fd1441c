"""The pre-training study's settings and its report: which runs a sweep needs, and the
table, direction checks and PNG plots made from their probe scores (no training here:
flows/study.py runs the stages)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from mae_ops.atomic import write_json, write_text
from mae_ops.config import Config, apply_overrides, validate
from mae_ops.models.presets import preset_config
from mae_ops.plots import sweep_plot

SCORES = ("knn_top1", "linprobe_top1", "finetune_top1")


RUN_KEYS = ("out_dir", "checkpoint_dir", "reports_dir", "device", "num_workers")  # where and how, not what


def settings(cfg: Config, data_hash: str) -> list[dict[str, Any]]:
    """One entry per swept (key, value): its config, with the run folders keyed by what
    pre-training computes (the same setting in two sweeps, e.g. the base, runs once)."""
    raw = cfg.model_dump(mode="json")
    out = []
    for key, values in cfg.study.sweeps.items():
        for value in values:
            one = validate(apply_overrides(raw, [f"{key}={json.dumps(value)}"]))
            semantic = {
                "model": {
                    "preset": one.model.preset,  # the decoder as built: the preset's depth written out or not
                    "decoder_depth": one.model.decoder_depth or preset_config(one.model.preset)["decoder_depth"],
                },
                "data": data_hash,
                "pretrain": {k: v for k, v in one.pretrain.model_dump(mode="json").items() if k not in RUN_KEYS},
                "probe": one.study.model_dump(mode="json", exclude={"sweeps"}),
            }
            run = hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:12]
            models, reports = Path(cfg.study.models_dir) / run, Path(cfg.study.reports_dir) / "runs" / run
            where = {"out_dir": str(models), "checkpoint_dir": str(models / "checkpoints"), "reports_dir": str(reports)}
            one = one.model_copy(update={"pretrain": one.pretrain.model_copy(update=where)})
            out.append({"key": key, "value": value, "run": run, "config": one, "probe": reports / "probe.json"})
    return out


def _label(value: Any) -> str:
    if value is None:
        return "preset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _verdict(a: float, b: float, n: int, paper: str) -> str:
    """Whether a > b as the paper says, and whether the gap is above the noise of ``n`` validation images
    (two standard errors of the difference of two accuracies)."""
    noise = 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))
    verdict = f"as the paper ({paper})" if a > b else "NOT as the paper"
    return verdict + (
        f", beyond the noise (±{noise:.1%})" if abs(a - b) > noise else f", within the noise (±{noise:.1%})"
    )


def directions(rows: list[dict]) -> list[str]:
    """The paper's Table 1 directions, checked on these rows (a sweep without the values is left out)."""
    by: dict[str, dict[Any, dict]] = {}
    for r in rows:
        by.setdefault(r["key"], {})[r["value"]] = r
    lines = []
    score = "finetune_top1" if all("finetune_top1" in r for r in rows) else "linprobe_top1"
    n = min((int(r.get("num_val", 0)) for r in rows), default=0)
    mask = by.get("pretrain.mask_ratio", {})
    if len(mask) >= 2:
        lo = min(mask)
        hi = 0.75 if 0.75 in mask and lo < 0.75 else max(mask)  # the paper's choice, against the lowest ratio
        a, b = mask[hi][score], mask[lo][score]
        lines.append(f"mask ratio {hi:g} vs {lo:g} ({score}): {a:.2%} vs {b:.2%}, {_verdict(a, b, n, 'high wins')}")
    npl = by.get("pretrain.norm_pix_loss", {})
    if True in npl and False in npl:
        a, b = npl[True][score], npl[False][score]
        lines.append(f"norm-pix loss on vs off ({score}): {a:.2%} vs {b:.2%}, {_verdict(a, b, n, 'it helps')}")
    dec = by.get("model.decoder_depth", {})
    if len(dec) >= 2 and all("finetune_top1" in r for r in dec.values()):
        lp, ft = ([r[s] for r in dec.values()] for s in ("linprobe_top1", "finetune_top1"))
        a, b = max(lp) - min(lp), max(ft) - min(ft)
        verdict = "as the paper (the probe is the sensitive one)" if a > b else "NOT as the paper"
        lines.append(f"decoder depth: the linear probe spans {a:.2%}, fine-tuning {b:.2%}, {verdict} "
                     f"(one accuracy's noise: ±{2 * math.sqrt(0.25 / max(n, 1)):.1%} at most)")  # fmt: skip
    ep = by.get("pretrain.epochs", {})
    if len(ep) >= 2:
        curve = [ep[e]["linprobe_top1"] for e in sorted(ep)]
        shape = "still rising at the longest" if curve[-1] >= max(curve) else "peaked earlier"
        lines.append(f"pre-training epochs {sorted(ep)}: linear probe {', '.join(f'{v:.2%}' for v in curve)}, {shape}")
    return lines


def report(rows: list[dict], cfg: Config, dest: Path) -> dict:
    """results.csv / results.json, summary.md and one PNG per swept key into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    fields = ["key", "value", "run", *SCORES, "num_val", "final_loss", "pretrain_s", "probe_s"]
    with open(dest / "results.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (dest / "results.csv.tmp").replace(dest / "results.csv")
    checks = directions(rows)
    write_json(dest / "results.json", {"rows": rows, "directions": checks})
    lines = [
        "# Pre-training study",
        "",
        f"Data: `{cfg.data.source}` ({cfg.data.img_size} px), model `{cfg.model.preset}`. Each setting changes "
        f"one key from the params; each is scored on the validation split: k-NN on the frozen features "
        f"(k = {cfg.study.knn_k}), the linear probe, a {cfg.study.finetune_epochs}-epoch fine-tune.",
        "",
    ]
    header = "| value | k-NN | linear probe | fine-tune | final loss | pre-train s |"
    for key in cfg.study.sweeps:
        sub = [r for r in rows if r["key"] == key]
        png = f"{key.replace('.', '_')}.png"
        lines += [f"## {key}", "", f"![{key}]({png})", "", header, "|" + " --- |" * 6]
        for r in sub:
            cells = " | ".join(f"{r[s]:.2%}" if s in r else "–" for s in SCORES)
            lines.append(f"| {_label(r['value'])} | {cells} | {r['final_loss']:.4f} | {r['pretrain_s']:.0f} |")
        lines.append("")
        series = {s: [r.get(s) for r in sub] for s in SCORES}
        sweep_plot([_label(r["value"]) for r in sub], series, dest / png, title=f"{key} ({Path(cfg.data.source).name})")
    lines += ["## Against the paper (He et al. 2021, Table 1)", "", *[f"- {c}" for c in checks], ""]
    write_text(dest / "summary.md", "\n".join(lines))
    return {"rows": rows, "directions": checks}
