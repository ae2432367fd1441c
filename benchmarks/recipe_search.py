"""Which fine-tuning recipe does the search pick on a small labelled folder?

    python benchmarks/recipe_search.py --source /path/to/cifar10-subset --work /tmp/recipe-search \
        --out benchmarks/results/cpu-cifar-recipe-search.json

Prepares the folder, pre-trains the MAE, then runs `mae-ops finetune` with ``recipe``
among the searched knobs (``small-data`` or ``reference``, with lr and layer decay),
through the real CLI and Optuna study. Prints one JSON object (every trial with its
recipe and validation top-1, the best of each recipe, the search's choice, the final
model's validation top-1) and writes --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from mae_ops.atomic import write_json

SPACE = ("{recipe: {choices: [small-data, reference]}, base_lr: {low: 2.0e-3, high: 3.0e-2, log: true}, "
         "layer_decay: {low: 0.6, high: 0.95}}")  # fmt: skip


def settings(source: Path, work: Path, trials: int, trial_epochs: int, pretrain_epochs: int,
             finetune_epochs: int) -> list[str]:  # fmt: skip
    sets = {
        "data.source": str(source), "data.img_size": 32, "data.crop_pct": 1, "data.val_fraction": 0.2,
        "data.out_dir": work / "data/prepared",
        "pretrain.epochs": pretrain_epochs, "pretrain.warmup_epochs": 2, "pretrain.monitor_every": 5,
        "pretrain.crop_scale": "[0.2, 1.0]", "pretrain.hflip": "true", "pretrain.out_dir": work / "models/pretrain",
        "pretrain.checkpoint_dir": work / "ckpt/pretrain", "pretrain.reports_dir": work / "reports/pretrain",
        "finetune.recipe": "reference",  # the schema's default: what a new user's folder gets
        "finetune.epochs": finetune_epochs, "finetune.out_dir": work / "models/finetune",
        "finetune.checkpoint_dir": work / "ckpt/finetune", "finetune.reports_dir": work / "reports/finetune",
        "hpo.enabled": "true", "hpo.n_trials": trials, "hpo.epochs": trial_epochs, "hpo.startup_trials": 4,
        "hpo.warmup_epochs": 4, "hpo.storage": f"sqlite:///{work}/optuna.db", "hpo.reports_dir": work / "reports/hpo",
        "hpo.space": SPACE,
    }  # fmt: skip
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="a folder of labelled images (class subfolders)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/recipe-search"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--trial-epochs", type=int, default=10)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-cifar-recipe-search.json"))
    args = ap.parse_args()

    sets = settings(args.source.resolve(), args.work.resolve(), args.trials, args.trial_epochs, args.pretrain_epochs,
                    args.finetune_epochs)  # fmt: skip
    cli = Path(sys.executable).parent / "mae-ops"
    seconds = {}
    for stage in ("prepare", "pretrain", "finetune"):
        t0 = time.perf_counter()
        subprocess.run([str(cli), stage, "--params", str(args.params), *sets], check=True)
        seconds[stage] = round(time.perf_counter() - t0, 1)
    reports = args.work.resolve() / "reports"
    trials = pd.read_csv(reports / "hpo/trials.csv")
    rows = [{"trial": int(t.number), "recipe": t.params_recipe, "base_lr": round(float(t.params_base_lr), 5),
             "layer_decay": round(float(t.params_layer_decay), 3), "state": t.state,
             "val_top1": None if pd.isna(t.value) else round(float(t.value), 4)}
            for t in trials.itertuples()]  # fmt: skip
    done = [r for r in rows if r["val_top1"] is not None]
    best_of = {rec: max((r["val_top1"] for r in done if r["recipe"] == rec), default=None)
               for rec in ("small-data", "reference")}  # fmt: skip
    best = json.loads((reports / "hpo/best_params.json").read_text())
    final = json.loads((reports / "finetune/metrics.json").read_text())
    manifest = json.loads((args.work.resolve() / "data/prepared/manifest.json").read_text())
    result = {
        "measured_by": "benchmarks/recipe_search.py", "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        .stdout.strip(),
        "cpu": platform.processor() or platform.machine(), "source": args.source.name,
        "counts": manifest.get("counts"), "img_size": manifest.get("img_size"),
        "num_labelled": final.get("num_labelled"),
        "pretrain_epochs": args.pretrain_epochs, "trial_epochs": args.trial_epochs,
        "finetune_epochs": args.finetune_epochs,
        "space": SPACE, "trials": rows, "best_val_top1_by_recipe": best_of, "chosen": best["params"],
        "chosen_val_top1": best["value"], "final": {k: final[k] for k in final if "top1" in k},
        "seconds": seconds,
    }  # fmt: skip
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
