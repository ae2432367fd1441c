"""data.bit_depth on real photos: a folder of photos made into the frames a 12-bit grey camera
saves (16-bit PNGs, each exposed at 1/4 to 1 of full scale, seeded), prepared with the default
data.bit_depth (16) and with 12: the grey levels each stored image keeps and the files whose
values were clipped, and, with --budget, the CIFAR-10 speedrun (benchmarks/cifar10_speedrun.py,
its `speedrun` part) on both, at the same epochs (the 12-bit run's calibration sizes both).
Also the same frames as a camera that stores its 12 bits in the high bits of the 16-bit word
(values * 16) saves them, prepared both ways: the setting's trap, which prepare must report.

    python benchmarks/bit_depth.py --data <cifar10-subset> --budget 300 \\
        --set model.preset=mae_vit_micro_patch4 --set pretrain.batch_size=256 --set finetune.batch_size=256 \\
        --out benchmarks/results/cpu-bit_depth-cifar10.json

``--data``: train/<class>/* and test/<class>/* (or any folder of class folders). Prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pretrain_throughput import code_version, run_device  # a sibling script: its folder is on sys.path when run

from mae_ops.atomic import write_json
from mae_ops.config import load_params
from mae_ops.data import PreparedData
from mae_ops.serving import expand_paths
from mae_ops.stages import prepare

REPO = Path(__file__).resolve().parents[1]
SENSOR_BITS = 12
EXPOSURE = (0.25, 1.0)  # of full scale: dim frames are where a 0..65535 reading loses most


def make_frames(src: Path, dest: Path, seed: int, shift: int = 0) -> int:
    """Each photo as grey 12-bit values in a 16-bit PNG, at a random exposure, stored ``shift``
    bits up in the word; kept when made."""
    files = expand_paths([src])
    if dest.exists() and sum(1 for _ in dest.rglob("*.png")) == len(files):
        return len(files)
    rng = np.random.default_rng(seed)
    top = 2**SENSOR_BITS - 1
    for f in files:
        gain = np.exp(rng.uniform(np.log(EXPOSURE[0]), np.log(EXPOSURE[1])))
        with Image.open(f) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float64)
        out = dest / f.relative_to(src).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        values = np.clip(np.round(grey / 255 * top * gain), 0, top).astype(np.uint16)
        Image.fromarray(values << shift).save(out)
    return len(files)


def grey_levels(root: Path, block: int = 1024) -> dict:
    """How many of the 256 grey levels each stored image uses, and its brightest one; the
    store is read ``block`` rows at a time (memory does not grow with the folder)."""
    data = PreparedData(root)
    levels, brightest = [], []
    for start in range(0, len(data.split), block):
        rows = np.asarray(data.images[start : start + block])
        flat = rows.reshape(len(rows), -1)
        used = np.zeros((len(flat), 256), dtype=bool)
        used[np.arange(len(flat))[:, None], flat] = True
        levels.append(used.sum(1))
        brightest.append(flat.max(1))
    levels, brightest = np.concatenate(levels), np.concatenate(brightest)
    return {
        "images": len(levels),
        "median": float(np.median(levels)),
        "p10": float(np.percentile(levels, 10)),
        "p90": float(np.percentile(levels, 90)),
        "brightest_median": float(np.median(brightest)),
    }


def prepare_frames(source: Path, root: Path, bits: int, img_size: int) -> dict:
    """The prepare stage on ``source`` at data.bit_depth ``bits``: its time, skipped and clipped
    files, and the grey levels the stored images keep."""
    sets = [f"data.source={source}", f"data.img_size={img_size}", "data.crop_pct=1", f"data.bit_depth={bits}"]
    cfg = load_params(REPO / "params.yaml", [*sets, f"data.out_dir={root}"])
    t0 = time.perf_counter()
    manifest = prepare.run(cfg)
    return {
        "prepare_s": round(time.perf_counter() - t0, 1),
        "skipped": len(manifest["skipped"]),
        "clipped": manifest["clipped"]["files"],
        "grey_levels": grey_levels(root),
    }


def speedrun(frames: Path, work: Path, bits: int, budget: float, sets: list[str], calibration: Path | None) -> dict:
    out = work / f"speedrun-{bits}bit.json"
    script = REPO / "benchmarks/cifar10_speedrun.py"
    cmd = [sys.executable, str(script), "--data", str(frames), "--parts", "speedrun", "--budget", str(budget)]
    cmd += ["--work", str(work / f"speedrun-{bits}bit"), "--out", str(out)]
    for s in [*sets, "data.channels=1", f"data.bit_depth={bits}"]:
        cmd += ["--set", s]
    if calibration is not None:
        cmd += ["--calibration", str(calibration)]
    subprocess.run(cmd, check=True)
    part = json.loads(out.read_text())["parts"]["speedrun"]
    return {
        "test_top1": part["test_top1"],
        "num_test": part["num_test"],
        "val_top1": part["finetune"]["val_top1"],
        "epochs": {"pretrain": part["pretrain"]["epochs"], "finetune": part["finetune"]["epochs"]},
        "wall_s": part["wall_s_pretrain_finetune"],
        "json": str(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a folder of class folders (or train/ and test/)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mae-ops-bit-depth"))
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=None, help="seconds of each speedrun; none: no speedrun")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value, for the speedruns")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    frames, high_word = args.work / "frames", args.work / "frames-high-word"
    report: dict = {
        "measured_by": "benchmarks/bit_depth.py",
        "device": run_device(),
        "code": code_version(),
        "data": args.data.name,
        "frames": {
            "files": make_frames(args.data, frames, args.seed),
            "sensor_bits": SENSOR_BITS,
            "exposure": list(EXPOSURE),
            "seed": args.seed,
        },
        "high_word_frames": {"files": make_frames(args.data, high_word, args.seed, 16 - SENSOR_BITS)},
        "prepared": {},
        "prepared_high_word": {},
    }
    for key, source in (("prepared", frames), ("prepared_high_word", high_word)):
        for bits in (16, SENSOR_BITS):
            report[key][str(bits)] = prepare_frames(source, args.work / f"{key}-{bits}bit", bits, args.img_size)
    if args.budget is not None:
        first = speedrun(frames, args.work, SENSOR_BITS, args.budget, args.sets, None)
        again = speedrun(frames, args.work, 16, args.budget, args.sets, Path(first["json"]))
        report["speedrun"] = {"budget_s": args.budget, "sets": args.sets, str(SENSOR_BITS): first, "16": again}
    if args.out is not None:
        write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
