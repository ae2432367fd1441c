"""The pre-training study's settings and its report: which runs a sweep needs, and the
table, the paired direction checks and the PNG plots made from their probe scores (no
training here: flows/study.py runs the stages)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from mae_ops.atomic import write_json, write_text
from mae_ops.config import Config, apply_overrides, semantic_params, validate
from mae_ops.models.presets import preset_config
from mae_ops.plots import sweep_plot

SCORES = ("knn_top1", "linprobe_top1", "finetune_top1")
NOT_PROBE_KEYS = ("sweeps", "seeds", "models_dir", "reports_dir")  # the study's keys that change no score


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def settings(cfg: Config, data_hash: str) -> list[dict[str, Any]]:
    """One entry per swept (key, value) and seed: its config, with the pre-training folders
    keyed by what pre-training computes (the same setting in two sweeps, e.g. the base,
    pre-trains once) and the probe's file keyed by what the probe computes too (changed
    fine-tuning params score the same encoders again)."""
    raw = cfg.model_dump(mode="json")
    out = []
    for key, values in cfg.study.sweeps.items():
        for value in values:
            for seed in cfg.study.seeds:
                sets = [f"pretrain.seed={seed}", f"finetune.seed={seed}", f"{key}={json.dumps(value)}"]
                one = validate(apply_overrides(raw, sets))
                depth = one.model.decoder_depth or preset_config(one.model.preset)["decoder_depth"]
                run = _hash({"model": {**one.model.model_dump(mode="json"), "decoder_depth": depth},  # as built
                             "data": data_hash, "pretrain": semantic_params(one.pretrain)})  # fmt: skip
                scored = _hash({"run": run, "finetune": semantic_params(one.finetune),
                                "study": one.study.model_dump(mode="json", exclude=set(NOT_PROBE_KEYS))})  # fmt: skip
                models, reports = Path(cfg.study.models_dir) / run, Path(cfg.study.reports_dir) / "runs" / run
                where = {"out_dir": str(models), "checkpoint_dir": str(models / "checkpoints"),
                         "reports_dir": str(reports)}  # fmt: skip
                one = one.model_copy(update={"pretrain": one.pretrain.model_copy(update=where)})
                out.append({"key": key, "value": value, "seed": seed, "run": run, "config": one,
                            "probe": reports / f"probe-{scored}.json"})  # fmt: skip
    return out


# -------------------------------------------------------------- paired checks
def _correct(row: dict, score: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(validation ids, 1 where the score's prediction is right) of one probe, or None
    when its predictions were not kept."""
    path = Path(row.get("predictions") or "")
    name = score.removesuffix("_top1")
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if name not in z.files:
            return None
        return z["val_ids"], (z[name] == z["labels"]).astype(np.int8)


def paired(a_rows: list[dict], b_rows: list[dict], score: str) -> dict | None:
    """Setting a against setting b on the same validation images, seed by seed: the
    accuracy gap, its 95 % interval (paired standard error) and McNemar's exact test on
    the images only one of them gets right. None where predictions are missing."""
    b_by_seed = {r.get("seed", 0): r for r in b_rows}
    ca, cb, per_seed = [], [], []
    for ra in a_rows:
        rb = b_by_seed.get(ra.get("seed", 0))
        one, two = _correct(ra, score), (_correct(rb, score) if rb else None)
        if one is None or two is None or not np.array_equal(one[0], two[0]):
            return None
        ca.append(one[1])
        cb.append(two[1])
        per_seed.append(float(one[1].mean() - two[1].mean()))
    if not ca:
        return None
    a, b = np.concatenate(ca), np.concatenate(cb)
    n, only_a, only_b = len(a), int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    diff = (only_a - only_b) / n
    se = math.sqrt(max(only_a + only_b - n * diff**2, 0.0)) / n
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": diff, "ci95": 1.96 * se, "p": float(p),
            "only_a": only_a, "only_b": only_b, "pairs": n, "per_seed": per_seed}  # fmt: skip


def _unpaired(a: float, b: float, n: int) -> dict:
    """The fallback without predictions: two independent accuracies (conservative)."""
    return {"a": a, "b": b, "diff": a - b, "ci95": 1.96 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1)),
            "p": None, "pairs": n}  # fmt: skip


def _compare(name: str, groups: dict, key: str, va: Any, vb: Any, score: str) -> dict:
    """Setting ``va`` of ``key`` against ``vb`` on ``score``: paired where the predictions
    were kept, else unpaired."""
    a, b = groups[key][va], groups[key][vb]
    test = paired(a["rows"], b["rows"], score) or _unpaired(a[score], b[score], min(a["num_val"], b["num_val"]))
    return {"check": name, "score": score, "setting_a": va, "setting_b": vb, **test}


def _said(c: dict) -> str:
    how = (f"McNemar p = {c['p']:.2g} over {c['pairs']} paired predictions" if c["p"] is not None
           else f"unpaired, {c['pairs']} images")  # fmt: skip
    sure = c["p"] < 0.05 if c["p"] is not None else abs(c["diff"]) > c["ci95"]
    said = (f"{c['diff'] * 100:+.1f} points (95 % CI ±{c['ci95'] * 100:.1f}, {how}): "
            + ("significant" if sure else "within the noise"))  # fmt: skip
    seeds = c.get("per_seed") or []
    if len(seeds) > 1:  # the test pools seeds; whether each seed agrees is the check it cannot make
        same = all(d > 0 for d in seeds) or all(d < 0 for d in seeds)
        said += (f"; per seed {' / '.join(f'{d * 100:+.1f}' for d in seeds)}, "
                 + ("the same sign in every seed" if same else "the sign changes between seeds"))  # fmt: skip
    return said


def directions(groups: dict[str, dict[Any, dict]]) -> tuple[list[str], list[dict]]:
    """The paper's Table 1 directions, checked on these settings (a sweep without the
    values is left out), each gap tested on the same validation images."""
    every = [g for by in groups.values() for g in by.values()]
    score = "finetune_top1" if all(g.get("finetune_top1") is not None for g in every) else "linprobe_top1"
    lines, tests = [], []

    def check(name: str, key: str, va: Any, vb: Any, s: str, paper: str) -> None:
        c = _compare(name, groups, key, va, vb, s)
        verdict = f"as the paper ({paper})" if c["diff"] > 0 else "no gap" if c["diff"] == 0 else "NOT as the paper"
        lines.append(f"{name} ({s}): {c['a']:.2%} vs {c['b']:.2%}, {verdict}, {_said(c)}")
        tests.append(c)

    mask = groups.get("pretrain.mask_ratio", {})
    if len(mask) >= 2:
        lo = min(mask)
        hi = 0.75 if 0.75 in mask and lo < 0.75 else max(mask)  # the paper's choice, against the lowest ratio
        check(f"mask ratio {hi:g} vs {lo:g}", "pretrain.mask_ratio", hi, lo, score, "high wins")
    npl = groups.get("pretrain.norm_pix_loss", {})
    if True in npl and False in npl:
        check("norm-pix loss on vs off", "pretrain.norm_pix_loss", True, False, score, "it helps")
    dec = groups.get("model.decoder_depth", {})
    if len(dec) >= 2 and all(g.get("finetune_top1") is not None for g in dec.values()):
        spans = {}
        for s in ("linprobe_top1", "finetune_top1"):
            best, worst = max(dec, key=lambda v: dec[v][s]), min(dec, key=lambda v: dec[v][s])
            spans[s] = _compare(f"decoder depth {best} vs {worst}", groups, "model.decoder_depth", best, worst, s)
            tests.append(spans[s])
        lp, ft = spans["linprobe_top1"], spans["finetune_top1"]
        verdict = "as the paper (the probe is the sensitive one)" if lp["diff"] > ft["diff"] else "NOT as the paper"
        lines.append(f"decoder depth: the linear probe spans {lp['diff']:.2%} (depth {lp['setting_a']} vs "
                     f"{lp['setting_b']}: {_said(lp)}), fine-tuning {ft['diff']:.2%} (depth {ft['setting_a']} vs "
                     f"{ft['setting_b']}: {_said(ft)}), {verdict}")  # fmt: skip
    ep = groups.get("pretrain.epochs", {})
    if len(ep) >= 2:
        order = sorted(ep)
        curve = [ep[e]["linprobe_top1"] for e in order]
        shape = "still rising at the longest" if curve[-1] >= max(curve) else "peaked earlier"
        c = _compare(f"epochs {order[-1]} vs {order[0]}", groups, "pretrain.epochs", order[-1], order[0],
                     "linprobe_top1")  # fmt: skip
        tests.append(c)
        lines.append(f"pre-training epochs {order}: linear probe {', '.join(f'{v:.2%}' for v in curve)}, {shape}; "
                     f"longest vs shortest {_said(c)}")  # fmt: skip
    return lines, tests


# ------------------------------------------------------------------- report
def _label(value: Any) -> str:
    if value is None:
        return "preset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def group(rows: list[dict]) -> dict[str, dict[Any, dict]]:
    """key -> value -> the mean (and spread over seeds) of each score, with its rows."""
    out: dict[str, dict[Any, dict]] = {}
    for r in rows:
        out.setdefault(r["key"], {}).setdefault(r["value"], {"rows": []})["rows"].append(r)
    for by in out.values():
        for g in by.values():
            for s in (*SCORES, "final_loss", "pretrain_s"):
                vals = [float(r[s]) for r in g["rows"] if r.get(s) not in (None, "")]
                g[s] = float(np.mean(vals)) if vals else None
                g[f"{s}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
            g["seeds"], g["num_val"] = len(g["rows"]), int(g["rows"][0]["num_val"])
    return out


def _cell(g: dict, s: str) -> str:
    if g.get(s) is None:
        return "–"
    return f"{g[s]:.2%}" + (f" ± {g[f'{s}_std']:.2%}" if g.get(f"{s}_std") is not None else "")


def report(rows: list[dict], cfg: Config, dest: Path) -> dict:
    """results.csv (one row per setting and seed), results.json, summary.md and one PNG
    per swept key into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    fields = ["key", "value", "seed", "run", *SCORES, "num_val", "final_loss", "pretrain_s", "probe_s"]
    with open(dest / "results.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (dest / "results.csv.tmp").replace(dest / "results.csv")
    groups = group(rows)
    checks, tests = directions(groups)
    write_json(dest / "results.json", {"rows": rows, "directions": checks, "tests": tests})
    seeds = cfg.study.seeds
    lines = [
        "# Pre-training study",
        "",
        f"Data: `{cfg.data.source}` ({cfg.data.img_size} px), model `{cfg.model.preset}`. Each setting changes "
        f"one key from the params; each is scored on the validation split: k-NN on the frozen features "
        f"(k = {cfg.study.knn_k}), the linear probe, a {cfg.study.finetune_epochs}-epoch fine-tune. "
        + (f"Each setting ran with seeds {seeds}: mean ± standard deviation over them." if len(seeds) > 1 else ""),
        "",
    ]
    header = "| value | k-NN | linear probe | fine-tune | final loss | pre-train s |"
    for key, by in groups.items():
        png = f"{key.replace('.', '_')}.png"
        lines += [f"## {key}", "", f"![{key}]({png})", "", header, "|" + " --- |" * 6]
        for value, g in by.items():
            cells = " | ".join(_cell(g, s) for s in SCORES)
            lines.append(f"| {_label(value)} | {cells} | {g['final_loss']:.4f} | {g['pretrain_s']:.0f} |")
        lines.append("")
        series = {s: [g[s] for g in by.values()] for s in SCORES}
        errors = {s: [1.96 * math.sqrt(g[s] * (1 - g[s]) / (g["num_val"] * g["seeds"])) if g[s] is not None else None
                      for g in by.values()] for s in SCORES}  # fmt: skip
        sweep_plot([_label(v) for v in by], series, dest / png, title=f"{key} ({Path(cfg.data.source).name})",
                   errors=errors)  # fmt: skip
    lines += ["## Against the paper (He et al. 2021, Table 1)", "",
              "Each gap is measured on the same validation images (and seeds): McNemar's exact test on the "
              "images only one of the two settings gets right; significant at p < 0.05.", "",
              *[f"- {c}" for c in checks], ""]  # fmt: skip
    write_text(dest / "summary.md", "\n".join(lines))
    return {"rows": rows, "directions": checks, "tests": tests}
