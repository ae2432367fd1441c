"""The `pretrain` stage itself on a large store, loader included, against the bare step.

`benchmarks/pretrain_throughput.py` times the training step on batches already on the
GPU. Issue 25 also asks what the stage gives on a real store: 100,000 images at 224 px
(stored at 256, as `mae-ops prepare` stores them for 224), read by the stage's own
loader (resident on the GPU when the store fits a quarter of its memory, else the host
loader), cropped, flipped and normalised by its own augmentation, with its checkpoints
and logs. Goal: the stage's steady images/s at least 90 % of the bare step's, same
preset, batch and fast path, measured in this same run.

    python benchmarks/pretrain_stage.py --store /tmp/stage-store --images 100000 \
        --preset mae_vit_base_patch16 --batch-size 256 --epochs 2 --out reports/benchmarks/pretrain-stage.json

The store is made once (random pixels in the layout `mae-ops prepare` writes: the
loader's and the step's speed do not depend on pixel values; `loader_throughput.py`'s
maker) and reused. The stage runs as `mae-ops pretrain` in a subprocess; its last
epoch's images/s (history.csv) is the steady rate (the first epoch compiles). The bare
step is `pretrain_throughput.py --modes fast@BATCH` on the same machine, or a rate given
with ``--step-images-per-s``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from loader_throughput import make_store  # sibling scripts: their folder is on sys.path when run
from pretrain_throughput import code_version, run_device

from mae_ops.atomic import write_json

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.9  # the stage's share of the bare step's images/s (issue 25)


def run_stage(args: argparse.Namespace, work: Path) -> dict:
    """`mae-ops pretrain` on the store: per-epoch images/s, the loader it chose, its seconds."""
    sets = [f"data.out_dir={args.store}", f"data.img_size={args.img_size}", f"model.preset={args.preset}",
            f"pretrain.batch_size={args.batch_size}", f"pretrain.epochs={args.epochs}", "pretrain.warmup_epochs=1",
            "pretrain.monitor_every=0", f"pretrain.save_every={args.epochs}", f"pretrain.fast={args.fast}",
            "pretrain.out_dir=models", "pretrain.checkpoint_dir=checkpoints", "pretrain.reports_dir=reports",
            "pretrain.nproc_per_node=1"]  # fmt: skip
    cmd = [sys.executable, "-m", "mae_ops.cli", "pretrain", "--params", str(REPO / "params.yaml")]
    cmd += [a for s in sets for a in ("--set", s)]
    log = work / "pretrain.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"mae-ops pretrain exited {proc.returncode}:\n" + "\n".join(text.splitlines()[-15:]))
    with (work / "reports/history.csv").open() as fh:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(fh)]
    metrics = json.loads((work / "reports/metrics.json").read_text())  # what the stage says it ran
    return {"images_per_s_per_epoch": rates, "images_per_s": rates[-1], "stage_s": round(seconds, 1),
            "fast_path": metrics["fast_path"], "loader": metrics["loader"],
            "data_on_device": metrics["loader"] == "device"}  # fmt: skip


def bare_step(args: argparse.Namespace, work: Path) -> float:
    """The same step on batches already on the device (pretrain_throughput.py, this machine)."""
    out = work / "step.json"
    cmd = [sys.executable, str(REPO / "benchmarks/pretrain_throughput.py"), "--preset", args.preset,
           "--img-size", str(args.img_size), "--in-chans", "3", "--modes", f"{args.mode}@{args.batch_size}",
           "--steps", "20", "--warmup", "3", "--curve-steps", "2", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return float(report["runs"][0]["results"][0]["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="folder for the store (made once, then reused)")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--store-size", type=int, default=256, help="stored side (prepare's for 224: 256)")
    ap.add_argument("--preset", default="mae_vit_base_patch16")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="the first compiles; the last is the steady rate")
    ap.add_argument("--fast", default="auto", help="pretrain.fast (auto: on with CUDA)")
    ap.add_argument("--mode", default="fast", help="the bare step's mode in pretrain_throughput.py")
    ap.add_argument("--step-images-per-s", type=float, default=None, help="the bare step's rate, if measured apart")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pretrain-stage"))
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks/pretrain-stage.json"))
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_store(args.store, args.images, args.store_size, img_size=args.img_size)
    report: dict = {
        "device": run_device(),
        "torch": torch.__version__, "code": code_version(__file__), "preset": args.preset,
        "images": args.images, "img_size": args.img_size, "store_size": args.store_size,
        "batch_size": args.batch_size, "epochs": args.epochs, "store_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    report["stage"] = run_stage(args, args.work)
    write_json(args.out, report)
    step = args.step_images_per_s
    report["step"] = {"mode": args.mode, "measured_here": step is None}
    report["step"]["images_per_s"] = step if step is not None else bare_step(args, args.work)
    ratio = report["stage"]["images_per_s"] / report["step"]["images_per_s"]
    report["stage_over_step"] = round(ratio, 3)
    report["goals"] = {f"stage >= {GOAL:.0%} of the bare step": ratio >= GOAL}
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
