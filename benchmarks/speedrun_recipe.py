"""Which recipe for the CIFAR-10 speedrun? One wall-clock budget spent several ways,
chosen on a CPU before the GPU minutes are spent (issue 26).

    python benchmarks/speedrun_recipe.py --data /tmp/cifar/cifar10-subset --budget 300 \\
        --set model.preset=mae_vit_micro_patch4 --set pretrain.batch_size=256 --set finetune.batch_size=256 \\
        --out benchmarks/results/cpu-cifar10-speedrun-recipe.json

Each variant is one run of ``cifar10_speedrun.py --budget`` (the pipeline up to the
fine-tune on ``benchmarks/cifar10.yaml``, in a fresh git + DVC copy of the project, the
epochs sized to the budget), scored on the test photos. A variant is a name, the
budget's share for pre-training and its own ``--set`` overrides on top of the common
ones; share 0 is the same ViT from random weights, all of the budget in fine-tuning
epochs (the speedrun's ``scratch`` part, with its own recipe: no layer decay).
Variants whose overrides differ only in seeds cost the same per epoch, so they share
one calibration (the first's): only the first of each pays for one.

``--out``: every variant's test top-1, its epochs, the predicted and the measured
seconds, where its calibration came from; the best setting with pre-training, its
margin over scratch (each setting by the mean of its seeds, so one lucky seed does not
decide), and the spread between seeds of one setting (the noise a margin has to
clear); a PNG beside it. Each variant's own JSON and log stay under ``--work``;
a variant whose JSON there is complete for the same photos, device, budget and
overrides is kept, so a study cut short resumes where it stopped. ``--keep``: an
earlier study's JSON (the same photos, budget, common overrides and device) whose
variants stay in the report, so a study gets more seeds without running again what
it has; its own ``kept`` nests inside.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from cifar10_speedrun import flags, log  # sibling scripts: their folder is on sys.path
from pretrain_throughput import code_version, run_device

from mae_ops.atomic import save_with, write_json

HERE = Path(__file__).resolve().parent


def without_seeds(sets: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(s for s in sets if not s.partition("=")[0].endswith(".seed")))


@dataclass(frozen=True)
class Variant:
    name: str
    share: float  # the budget's share for pre-training; 0: from random weights
    sets: tuple[str, ...] = ()

    @property
    def cost_key(self) -> tuple[str, ...]:
        """What the seconds per epoch depend on: the overrides, less the seeds."""
        return without_seeds(self.sets)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME SHARE [section.key=value ...]``"""
        try:
            name, share, *sets = text.split()
            if not 0.0 <= float(share) < 1.0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give NAME SHARE [section.key=value ...], SHARE in [0, 1)"
            ) from None
        return cls(name, float(share), tuple(sets))


# one setting changed at a time from the first, and the first again with other seeds
VARIANTS = (
    Variant("mae", 0.5),
    Variant("mae-share10", 0.1),
    Variant("mae-share25", 0.25),
    Variant("mae-share75", 0.75),
    Variant("mae-seed1", 0.5, ("pretrain.seed=1", "finetune.seed=1")),
    Variant("mask90", 0.5, ("pretrain.mask_ratio=0.9",)),
    Variant("decoder2", 0.5, ("model.decoder_depth=2",)),
    Variant("scratch", 0.0),
)


def finished(path: Path, v: Variant, same: dict) -> dict | None:
    """The variant's JSON from an earlier run of the same study (the same photos, device,
    common overrides and budget: what ``kept`` asks of a whole study), if it got to the end."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    part = r.get("parts", {}).get("scratch" if v.share == 0 else "speedrun", {})
    alike = (
        r.get("data") == same["data"]
        and r.get("device") == same["device"]
        and r.get("sets") == [*same["sets"], *v.sets]
        and r.get("budget", {}).get("seconds") == same["budget_s"]
    )
    return r if alike and "test_top1" in part and (v.share == 0 or r["budget"]["pretrain_share"] == v.share) else None


def run_variant(v: Variant, args: argparse.Namespace, calibration: Path | None) -> dict:
    """cifar10_speedrun.py for one variant; its JSON."""
    out = args.work / f"{v.name}.json"
    cmd = [sys.executable, str(HERE / "cifar10_speedrun.py"), "--data", str(args.data), "--work",
           str(args.work / v.name), "--out", str(out), "--budget", str(args.budget),
           "--parts", "scratch" if v.share == 0 else "speedrun",
           *(["--pretrain-share", str(v.share)] if v.share else []),
           *(["--calibration", str(calibration)] if calibration else []),
           *flags([*args.sets, *v.sets])]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=args.limit)
    shutil.rmtree(args.work / v.name)  # the project copy: its numbers are in out
    return json.loads(out.read_text())


def row(v: Variant, r: dict) -> dict:
    budget = r["budget"]
    if v.share == 0:
        part = r["parts"]["scratch"]
        epochs = {"pretrain": 0, "finetune": part["epochs"]}
        predicted, measured = part["predicted_wall_s"], part["wall_s"]
    else:
        part = r["parts"]["speedrun"]
        epochs = budget["epochs"]
        predicted, measured = budget["predicted_wall_s"], part["wall_s_pretrain_finetune"]
    sets = [*part.get("sets", ()), *v.sets]  # scratch: its own recipe's overrides first (cifar10_speedrun.SCRATCH)
    return {"name": v.name, "pretrain_share": v.share, "sets": sets, "test_top1": part["test_top1"],
            "num_test": part["num_test"], "epochs": epochs, "predicted_wall_s": predicted,
            "measured_wall_s": measured, "calibration": budget["calibration"].get("from", "its own")}  # fmt: skip


def summarise(rows: list[dict]) -> dict:
    """Each setting (share and overrides, less the seeds) scored by the mean of its seeds:
    the best setting with pre-training, its margin over the best from random weights, and
    the largest spread between seeds of one setting (the noise a margin has to clear)."""

    def setting(r: dict) -> tuple:
        return r["pretrain_share"], without_seeds(r["sets"])

    def mean(g: list[dict]) -> float:
        return round(sum(r["test_top1"] for r in g) / len(g), 5)

    by_setting: dict[tuple, list[dict]] = {}  # in the order of the rows, so a tie goes to the first
    for r in rows:
        by_setting.setdefault(setting(r), []).append(r)
    groups = list(by_setting.values())
    spreads = [max(r["test_top1"] for r in g) - min(r["test_top1"] for r in g) for g in groups if len(g) > 1]
    spread = round(max(spreads), 5) if spreads else None
    best = max((g for g in groups if g[0]["pretrain_share"] > 0), key=mean, default=None)
    scratch = max((g for g in groups if g[0]["pretrain_share"] == 0), key=mean, default=None)
    out: dict = {"best": best and best[0]["name"], "best_test_top1": best and mean(best),
                 "best_seeds": best and len(best), "seed_spread": spread}  # fmt: skip
    if best and scratch:
        out |= {"scratch_test_top1": mean(scratch), "scratch_seeds": len(scratch),
                "margin_over_scratch": round(mean(best) - mean(scratch), 5)}  # fmt: skip
    return out


def kept(path: Path, same: dict, names: set[str]) -> dict:
    """An earlier study's report, to add variants to: the same photos, budget, common
    overrides and device (or its numbers would not compare), and none of its names run again."""
    old = json.loads(path.read_text())
    for key, want in same.items():
        if old[key] != want:
            raise SystemExit(f"--keep {path}: its {key} is {old[key]!r}, this study's {want!r}")
    if again := names & {r["name"] for r in old["variants"]}:
        raise SystemExit(f"--keep {path}: already has {', '.join(sorted(again))}; give new variants other names")
    return old


def plot(report: dict, path: Path) -> None:
    rows = report["variants"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.9))
    names = [r["name"] for r in rows][::-1]
    tops = [100 * r["test_top1"] for r in rows][::-1]
    colours = ["0.6" if r["pretrain_share"] == 0 else "tab:blue" for r in rows][::-1]
    ax.barh(names, tops, color=colours)
    for y, r in enumerate(rows[::-1]):
        e = r["epochs"]
        ax.text(tops[y], y, f" {tops[y]:.1f} %  ({e['pretrain']} + {e['finetune']} epochs)", va="center", fontsize=8)
    s = report["summary"]
    if s["seed_spread"] is not None and s["best"]:
        best = 100 * s["best_test_top1"]
        ax.axvspan(best - 100 * s["seed_spread"], best, color="tab:orange", alpha=0.15,
                   label="best pre-trained setting − seed spread")  # fmt: skip
    if "scratch_test_top1" in s:
        ax.axvline(100 * s["scratch_test_top1"], color="0.3", ls="--", lw=1,
                   label="best setting from random weights (seed mean)")  # fmt: skip
    ax.set_xlim(0, max(tops) * 1.35)
    ax.set_xlabel("test top-1 (%)")
    ax.set_title(f"{report['budget_s']:.0f} s of pre-training + fine-tuning each, {report['device']}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # below the axes, clear of the bars' labels
        fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="train/ and test/ photo folders, or a git repo of them")
    ap.add_argument("--budget", type=float, required=True, help="seconds of pre-training + fine-tuning per variant")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value, for every variant")
    ap.add_argument("--variant", dest="variants", action="append", type=Variant.parse, default=None,
                    help="'NAME SHARE [section.key=value ...]' (repeat); default: " +
                         "; ".join(f"{v.name} {v.share} {' '.join(v.sets)}".strip() for v in VARIANTS))  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/speedrun-recipe"))
    ap.add_argument("--keep", type=Path, default=None,
                    help="an earlier study's JSON (same photos, --budget, --set, device): its rows stay")  # fmt: skip
    ap.add_argument("--limit", type=float, default=None, help="seconds each variant may take")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks/speedrun-recipe.json"))
    args = ap.parse_args()
    variants = args.variants or list(VARIANTS)
    if len({v.name for v in variants}) < len(variants):
        ap.error("variant names must differ")
    # what every row must share, checked before any run (seconds on one device say nothing of another's)
    same = {"data": args.data.name, "budget_s": args.budget, "sets": args.sets, "device": run_device()}
    earlier = kept(args.keep, same, {v.name for v in variants}) if args.keep else None
    args.work.mkdir(parents=True, exist_ok=True)

    calibrated: dict[tuple[str, ...], Path] = {}  # cost key -> the JSON holding its calibration
    results: dict[str, dict] = {}
    for v in variants:
        out = args.work / f"{v.name}.json"
        r = finished(out, v, same)
        if r is None:
            reuse = calibrated.get(v.cost_key)
            log(f"{v.name}: share {v.share}, {' '.join(v.sets) or 'the common settings'}"
                f"{f', calibration of {reuse.stem}' if reuse else ', calibrating'}")  # fmt: skip
            r = run_variant(v, args, reuse)
        else:
            log(f"{v.name}: kept from {out}")
        calibrated.setdefault(v.cost_key, out)
        results[v.name] = r
        log(f"{v.name}: test top-1 {row(v, r)['test_top1']:.4f}")

    first = next(iter(results.values()))
    report = {
        "measured_by": "benchmarks/speedrun_recipe.py",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu": platform.machine(),
        "torch": first["torch"],
        "code": code_version(__file__),
        **same,
        "variants": [*(earlier["variants"] if earlier else ()), *(row(v, results[v.name]) for v in variants)],
    }
    if earlier:  # where the kept rows came from, and what they said alone (and, nested, what it kept)
        report["kept"] = {k: earlier[k] for k in ("measured", "device", "code", "summary")} | {
            "file": args.keep.name, "variants": [r["name"] for r in earlier["variants"]]}  # fmt: skip
        if "kept" in earlier:
            report["kept"]["kept"] = earlier["kept"]
    report["summary"] = summarise(report["variants"])
    write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
