"""The pre-training study: its settings as DVC experiments of the pipeline, read back from
`dvc exp show --json`, and the report made of them: the table, the paired direction
checks and the PNG plots (the queue runs the stages; flows/study.py orchestrates).

Each setting (one swept key changed, one seed) is one experiment, `study-<key>-<value>-s<seed>`,
queued with `dvc exp run --queue -S ...` up to `finetune` (or `pretrain` alone when
study.finetune_epochs is 0) and run by DVC's queue: its scores are the pipeline's own metrics
(the pre-training monitor's k-NN and linear probe at the last epoch, the short fine-tune's
validation top-1), its per-image predictions the stages' CSV files. DVC's run cache decides
what must run again; `dvc exp apply NAME` brings a setting into the workspace.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest
from scipy.stats import t as t_dist

from mae_ops.atomic import write_json, write_text
from mae_ops.config import Config, apply_overrides, redact, validate
from mae_ops.errors import UserError
from mae_ops.orchestration import dvc_executable, stream, tool_env
from mae_ops.plots import sweep_plot
from mae_ops.reporting import MONITOR_PREDICTIONS, VAL_PREDICTIONS, read_predictions, write_predictions

SCORES = ("knn_top1", "linprobe_top1", "finetune_top1")
NOT_COMPARED = ("study",)  # params sections that change no experiment's result


@dataclass(frozen=True)
class Setting:
    """One experiment of the study: a swept key's value, under one seed."""

    key: str
    value: Any
    seed: int
    name: str  # the experiment's name
    sets: tuple[str, ...]  # its `dvc exp run -S` overrides
    target: str  # the last stage it runs


def _yaml(value: Any) -> str:
    return "null" if value is None else json.dumps(value)


def settings(cfg: Config) -> list[Setting]:
    """One experiment per swept (key, value) and seed, on top of params.yaml: the seed of
    both stages, the value, and the study's short fine-tune (no search, study.finetune_epochs
    with its warm-up scaled); the monitor scores the last epoch at least."""
    target = "finetune" if cfg.study.finetune_epochs > 0 else "pretrain"
    out = []
    for key, values in cfg.study.sweeps.items():
        for value in values:
            for seed in cfg.study.seeds:
                sets = [f"pretrain.seed={seed}", f"finetune.seed={seed}", f"{key}={_yaml(value)}"]
                epochs = validate(apply_overrides(cfg.model_dump(mode="json"), sets)).pretrain.epochs
                if not cfg.pretrain.monitor_every:
                    sets.append(f"pretrain.monitor_every={epochs}")  # the last epoch only
                if target == "finetune":
                    sets += ["hpo.enabled=false", "finetune.mode=finetune",
                             f"finetune.epochs={cfg.study.finetune_epochs}",
                             f"finetune.warmup_epochs={warmup_epochs(cfg)}"]  # fmt: skip
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"study-{key}-{label(key, value)}-s{seed}").replace("..", ".")
                out.append(Setting(key, value, seed, name, tuple(sets), target))
    return out


def warmup_epochs(cfg: Config) -> float:
    """The short fine-tune's warm-up: study.finetune_warmup_epochs, or the full
    fine-tune's share of its epochs (5 of 80 gives 0.94 of 15), so a 10-epoch probe
    does not spend half of itself warming up."""
    if cfg.study.finetune_warmup_epochs is not None:
        return cfg.study.finetune_warmup_epochs
    share = cfg.finetune.warmup_epochs / max(cfg.finetune.epochs, 1)
    return round(min(share, 1.0) * cfg.study.finetune_epochs, 3)


# ------------------------------------------------------------ DVC experiments
def dvc(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """A `dvc` command in ``repo``; its stdout, or a UserError with its last lines."""
    proc = subprocess.run([dvc_executable(), *args], cwd=repo, env=env or tool_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = redact("\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:]))
        raise UserError(f"`dvc {' '.join(args[:3])} ...` failed in {repo}:\n{tail}")
    return proc.stdout


def experiments(repo: Path) -> dict[str, dict]:
    """The experiments of the checked-out commit, by name (`dvc exp show --json`): state,
    rev, params, metrics."""
    out = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json", "--no-pager") or "[]"):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            data = rev.get("data") or {}
            out[exp.get("name") or rev.get("name")] = {
                "state": (exp.get("executor") or {}).get("state", "success"),
                "log": ((exp.get("executor") or {}).get("local") or {}).get("log"),
                "rev": rev["rev"],
                "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data", {}),
                "metrics": {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()},
            }
    return out


def _compared(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in NOT_COMPARED}


def wanted_params(repo: Path, setting: Setting) -> dict:
    """The params.yaml an experiment of ``setting`` runs with."""
    import yaml

    raw = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    return json.loads(json.dumps(apply_overrides(raw, list(setting.sets))))


def to_run(repo: Path, runs: list[Setting], known: dict[str, dict]) -> list[Setting]:
    """The settings without a successful experiment of the same params on this commit."""
    todo = []
    for s in runs:
        exp = known.get(s.name)
        if exp and exp["state"] == "success" and _compared(exp["params"]) == _compared(wanted_params(repo, s)):
            continue
        todo.append(s)
    return todo


def queue(repo: Path, s: Setting, known: dict[str, dict]) -> None:
    """`dvc exp run --queue`, after removing an experiment of the same name (other params, or failed)."""
    if s.name in known:
        dvc(repo, "exp", "remove", s.name)
    dvc(
        repo,
        "exp",
        "run",
        "--queue",
        "--name",
        s.name,
        *[a for item in s.sets for a in ("-S", f"++{item}")],
        s.target,
    )  # ++: set the key whether params.yaml lists it or leaves it to the schema's default


def run_queue(repo: Path, log: Callable[[str], None]) -> None:
    """`dvc exp run --run-all`: DVC's queue runs every queued experiment, one at a time
    (each uses every core); its log streams into ``log`` (a failed experiment is told by
    ``rows``, from DVC's record of it)."""
    stream([dvc_executable(), "exp", "run", "--run-all", "--jobs", "1"], repo, log, tool_env())


def sources(cfg: Config) -> dict[str, tuple[str, str, str, str]]:
    """Where each score lives in an experiment (paths as dvc.yaml names them, in the stages'
    reports_dir): (metrics file, key, predictions table, column)."""
    outs = cfg.outputs()
    pre_metrics, ft_metrics = outs.pretrain_metrics.as_posix(), outs.finetune_metrics.as_posix()
    monitor = (outs.pretrain_metrics.parent / MONITOR_PREDICTIONS).as_posix()
    return {"knn_top1": (pre_metrics, "knn_val_top1", monitor, "knn"),
            "linprobe_top1": (pre_metrics, "probe_val_top1", monitor, "probe"),
            "finetune_top1": (ft_metrics, "val_top1", (outs.finetune_metrics.parent / VAL_PREDICTIONS).as_posix(),
                              "pred")}  # fmt: skip


def rows(repo: Path, cfg: Config, runs: list[Setting], dest: Path) -> list[dict]:
    """One row per setting from its experiment: the scores, and its predictions gathered
    into ``dest``/<name>.csv; a setting whose experiment failed is a UserError naming it."""
    known = experiments(repo)
    where = sources(cfg)
    failed = [s.name for s in runs if known.get(s.name, {}).get("state") != "success"]
    if failed:
        first = known.get(failed[0], {}).get("log")
        tail = Path(first).read_text().strip().splitlines()[-6:] if first and Path(first).exists() else []
        raise UserError(f"{len(failed)} experiment(s) of the study failed: {', '.join(failed)} "
                        f"(`dvc queue logs {failed[0]}`)" + ("\n" + "\n".join(tail) if tail else ""))  # fmt: skip
    out = []
    for s in runs:
        exp = known[s.name]
        pre = exp["metrics"].get(where["knn_top1"][0], {})
        row = {"key": s.key, "value": s.value, "seed": s.seed, "run": s.name, "rev": exp["rev"],
               "final_loss": pre.get("final_loss"), "pretrain_s": pre.get("train_time_s")}  # fmt: skip
        preds: dict[str, np.ndarray] = {}
        for score, (metrics, key, table, column) in where.items():
            value = exp["metrics"].get(metrics, {}).get(key)
            if value is None or (score == "finetune_top1" and s.target != "finetune"):
                continue
            row[score] = value
            read = read_predictions(_read(repo, table, exp["rev"]))
            preds.setdefault("id", read["id"])
            preds.setdefault("label", read["label"])
            preds[score.removesuffix("_top1")] = read[column]
        none = np.zeros(0, np.int64)  # no score: the monitor found no labelled images or no validation split
        ids, labels = preds.pop("id", none), preds.pop("label", none)
        row["num_val"], row["predictions"] = len(ids), str(dest / f"{s.name}.csv")
        write_predictions(row["predictions"], ids, labels, preds)
        out.append(row)
    return out


def _read(repo: Path, path: str, rev: str) -> str:
    import dvc.api

    return dvc.api.read(path, repo=str(repo), rev=rev)


# -------------------------------------------------------------- paired checks
def _correct(row: dict, score: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(validation ids, 1 where the score's prediction is right) of one run, or None
    when its predictions were not kept."""
    path = Path(row.get("predictions") or "")
    name = score.removesuffix("_top1")
    if not path.is_file():
        return None
    table = read_predictions(path.read_text())
    if name not in table:
        return None
    return table["id"], (table[name] == table["label"]).astype(np.int8)


def _mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """One seed: the gap and McNemar's exact test on the images only one setting gets right."""
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"diff": (only_a - only_b) / len(a), "only_a": only_a, "only_b": only_b, "p": float(p)}


def paired(a_rows: list[dict], b_rows: list[dict], score: str) -> dict | None:
    """Setting a against setting b on the same validation images, with the same seeds.

    Seed by seed: the gap and McNemar's exact test (which speaks for that seed's two
    training runs only). Over seeds: the mean gap and a t test whose standard error
    holds both sources of noise: the images (the per-image gap averaged over seeds:
    an image counts once, however many seeds saw it) and the training runs (the
    spread of the per-seed gaps), with Welch-Satterthwaite degrees of freedom. One
    seed measures no run-to-run variance; copying a seed adds no evidence. None where
    predictions are missing or were made on other validation images."""
    b_by_seed = {r.get("seed", 0): r for r in b_rows}
    seeds, ca, cb = [], [], []
    for ra in a_rows:
        rb = b_by_seed.get(ra.get("seed", 0))
        one, two = _correct(ra, score), (_correct(rb, score) if rb else None)
        if one is None or two is None or not np.array_equal(one[0], two[0]) or (ca and len(one[1]) != len(ca[0])):
            return None
        seeds.append(ra.get("seed", 0))
        ca.append(one[1])
        cb.append(two[1])
    if not ca:
        return None
    a, b = np.stack(ca).astype(np.float64), np.stack(cb).astype(np.float64)  # (seeds, images)
    per_seed = [{"seed": s, **_mcnemar(x, y)} for s, x, y in zip(seeds, ca, cb, strict=True)]
    n, n_seeds = a.shape[1], a.shape[0]
    per_image = (a - b).mean(axis=0)
    gaps = np.array([p["diff"] for p in per_seed])
    var_images = per_image.var(ddof=1) / n if n > 1 else 0.0
    var_seeds = gaps.var(ddof=1) / n_seeds if n_seeds > 1 else 0.0
    diff, se = float(per_image.mean()), math.sqrt(var_images + var_seeds)
    if se > 0:
        df = se**4 / (var_images**2 / max(n - 1, 1) + (var_seeds**2 / (n_seeds - 1) if n_seeds > 1 else 0.0))
        p, half = float(2 * t_dist.sf(abs(diff) / se, df)), float(t_dist.ppf(0.975, df) * se)
    else:  # every image scored alike by both, in every seed
        df, p, half = float("inf"), 1.0 if diff == 0 else 0.0, 0.0
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": diff, "ci95": half, "p": p, "df": df,
            "se_images": math.sqrt(var_images), "se_seeds": math.sqrt(var_seeds), "pairs": n, "seeds": n_seeds,
            "per_seed": per_seed}  # fmt: skip


def _unpaired(a: float, b: float, n: int) -> dict:
    """The fallback without predictions: two independent accuracies (conservative)."""
    return {"a": a, "b": b, "diff": a - b, "ci95": 1.96 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1)),
            "p": None, "pairs": n, "seeds": 1, "per_seed": []}  # fmt: skip


def _compare(name: str, groups: dict, key: str, va: Any, vb: Any, score: str, paper: str) -> dict:
    """Setting ``va`` of ``key`` against ``vb`` on ``score``: paired where the predictions
    were kept, else unpaired."""
    a, b = groups[key][va], groups[key][vb]
    test = paired(a["rows"], b["rows"], score) or _unpaired(a[score], b[score], min(a["num_val"], b["num_val"]))
    return {"check": name, "key": key, "score": score, "setting_a": va, "setting_b": vb, "paper": paper, **test}


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment over a family of tests (None stays None)."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[i] = running
    return out


def _said(c: dict) -> str:
    if c["p"] is None:
        sure, how = abs(c["diff"]) > c["ci95"], f"unpaired, {c['pairs']} images"
    else:
        sure = (c.get("p_holm") if c.get("p_holm") is not None else c["p"]) < 0.05
        how = (f"t test over {c['pairs']} images and {c['seeds']} seed{'s' if c['seeds'] > 1 else ''}, "
               f"p = {c['p']:.2g}" + (f", Holm {c['p_holm']:.2g}" if c.get("p_holm") is not None else ""))  # fmt: skip
    said = f"{c['diff'] * 100:+.1f} points (95 % CI ±{c['ci95'] * 100:.1f}, {how}): " + (
        "significant" if sure else "within the noise"
    )
    seeds = c.get("per_seed") or []
    if seeds:
        said += "; per seed " + " / ".join(f"{s['diff'] * 100:+.1f} (McNemar p = {s['p']:.2g})" for s in seeds)
        if len(seeds) > 1:
            same = all(s["diff"] > 0 for s in seeds) or all(s["diff"] < 0 for s in seeds)
            said += ", the same sign in every seed" if same else ", the sign changes between seeds"
        else:
            said += " (one seed: the run-to-run variance is not in the interval)"
    return said


# The paper's Table 1 directions, fixed before any result is seen: which values of a sweep
# are compared is a function of the swept values alone, never of the scores.
def _planned(groups: dict[str, dict[Any, dict]], score: str) -> list[tuple[str, str, Any, Any, str, str]]:
    plan = []
    mask = groups.get("pretrain.mask_ratio", {})
    if len(mask) >= 2:
        lo = min(mask)
        hi = 0.75 if 0.75 in mask and lo < 0.75 else max(mask)  # the paper's choice, against the lowest ratio
        plan.append((f"mask ratio {hi:g} vs {lo:g}", "pretrain.mask_ratio", hi, lo, score, "high wins"))
    npl = groups.get("pretrain.norm_pix_loss", {})
    if True in npl and False in npl:
        plan.append(("norm-pix loss on vs off", "pretrain.norm_pix_loss", True, False, score, "it helps"))
    dec = groups.get("model.decoder_depth", {})
    if len(dec) >= 2 and None not in dec:
        deep, shallow = max(dec), min(dec)
        for s in ("linprobe_top1", score):
            plan.append((f"decoder depth {deep} vs {shallow}", "model.decoder_depth", deep, shallow, s,
                         "deeper wins" if s == "linprobe_top1" else "little difference"))  # fmt: skip
    ep = groups.get("pretrain.epochs", {})
    if len(ep) >= 2:
        for s in ("linprobe_top1", score):
            plan.append((f"epochs {max(ep)} vs {min(ep)}", "pretrain.epochs", max(ep), min(ep), s, "longer wins"))
    init = groups.get("pretrain.init", {})
    for start in (v for v in init if v is not None and None in init):  # from existing weights vs from scratch
        for s in ("linprobe_top1", score):
            plan.append((f"continued from {Path(start).name} vs scratch", "pretrain.init", start, None, s,
                         "continuing wins"))  # fmt: skip
    return list(dict.fromkeys(plan))  # a score named twice is one test


def directions(groups: dict[str, dict[Any, dict]]) -> tuple[list[str], list[dict]]:
    """The planned checks on these settings (a sweep without the values is left out), each
    gap tested on the same validation images and seeds, Holm-adjusted over the family."""
    every = [g for by in groups.values() for g in by.values()]
    score = "finetune_top1" if all(g.get("finetune_top1") is not None for g in every) else "linprobe_top1"
    tests = [_compare(name, groups, key, va, vb, s, paper) for name, key, va, vb, s, paper in _planned(groups, score)]
    for t, adjusted in zip(tests, holm([t["p"] for t in tests]), strict=True):
        t["p_holm"] = adjusted
    lines = []
    for t in tests:
        if t["paper"] == "little difference":
            verdict = "as the paper (no clear gap)" if abs(t["diff"]) <= t["ci95"] else "NOT as the paper (a clear gap)"
        else:
            source = "expected" if t["check"].startswith("continued") else "the paper"
            verdict = f"as {source} ({t['paper']})" if t["diff"] > 0 else f"NOT as {source}"
        lines.append(f"{t['check']} ({t['score']}): {t['a']:.2%} vs {t['b']:.2%}, {verdict}, {_said(t)}")
    return lines, tests


# ------------------------------------------------------------------- report
def label(key: str, value: Any) -> str:
    """How a swept value is shown: null is the preset's (or, for pretrain.init, scratch);
    a checkpoint by its file name."""
    if value is None:
        return "scratch" if key == "pretrain.init" else "preset"
    if isinstance(value, bool):
        return str(value).lower()
    if key == "pretrain.init":
        return Path(value).name
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


def accuracy_halfwidth(g: dict, s: str) -> float | None:
    """95 % half-width of a setting's mean accuracy: the binomial noise of its validation
    images (each counted once, not once per seed) plus the spread across its seeds."""
    if g.get(s) is None:
        return None
    spread = (g.get(f"{s}_std") or 0.0) ** 2 / g["seeds"]
    return 1.96 * math.sqrt(g[s] * (1 - g[s]) / g["num_val"] + spread)


def _cell(g: dict, s: str) -> str:
    if g.get(s) is None:
        return "–"
    return f"{g[s]:.2%}" + (f" ± {g[f'{s}_std']:.2%}" if g.get(f"{s}_std") is not None else "")


def report(rows: list[dict], cfg: Config, dest: Path) -> dict:
    """results.csv (one row per setting and seed), results.json, summary.md and one PNG
    per swept key into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    fields = ["key", "value", "seed", "run", "rev", *SCORES, "num_val", "final_loss", "pretrain_s"]
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
        f"one key from the params and is one DVC experiment (`run` below: `dvc exp show`, `dvc exp apply`); each "
        f"is scored on the validation split: the pre-training monitor's k-NN and linear probe on the final "
        f"encoder's features"
        + (f", a {cfg.study.finetune_epochs}-epoch fine-tune. " if cfg.study.finetune_epochs else ". ")
        + (f"Each setting ran with seeds {seeds}: mean ± standard deviation over them." if len(seeds) > 1 else ""),
        "",
    ]
    header = "| value | k-NN | linear probe | fine-tune | final loss | pre-train s |"
    for key, by in groups.items():
        png = f"{key.replace('.', '_')}.png"
        lines += [f"## {key}", "", f"![{key}]({png})", "", header, "|" + " --- |" * 6]
        for value, g in by.items():
            cells = " | ".join(_cell(g, s) for s in SCORES)
            lines.append(f"| {label(key, value)} | {cells} | {g['final_loss']:.4f} | {g['pretrain_s']:.0f} |")
        lines.append("")
        series = {s: [g[s] for g in by.values()] for s in SCORES}
        errors = {s: [accuracy_halfwidth(g, s) for g in by.values()] for s in SCORES}
        sweep_plot([label(key, v) for v in by], series, dest / png, title=f"{key} ({Path(cfg.data.source).name})",
                   errors=errors)  # fmt: skip
    lines += ["## Against the paper (He et al. 2021, Table 1)", "",
              "The pairs compared were fixed before the runs (the paper's directions; which values are compared "
              "depends on the swept values only). Each gap is measured on the same validation images and seeds: "
              "a t test whose error holds the image-to-image noise (each image once) and the spread between "
              "seeds, Holm-adjusted over the checks below, significant at adjusted p < 0.05; McNemar's exact "
              "test seed by seed beside it. Error bars in the plots: 95 % of each mean accuracy, images and "
              "seeds alike.", "", *[f"- {c}" for c in checks], ""]  # fmt: skip
    write_text(dest / "summary.md", "\n".join(lines))
    return {"rows": rows, "directions": checks, "tests": tests}
