"""`mae-ops prepare` at scale: images/s and peak memory for folders of realistic JPEGs.

    python benchmarks/prepare_scale.py --images 10000 50000 100000 --img-size 224

Makes the largest folder once (photo-like JPEGs of varied sizes, 256-600 px, in
10 class folders: 2,000 distinct pictures, the rest hard links to them, which
cost the same to decode; the smaller folders are hard-linked subsets), runs the real
`mae-ops prepare` on each in a subprocess and samples the memory of its whole
process tree (the stage and its decoding workers). Then adds 1% more files and
prepares again into the same store (the incremental path: only the new files are
decoded). Prints one JSON object: per N the wall time, images/s, peak RSS of the
stage's own process and of the tree, the store's size, and for the re-prepare
its time, its ratio to the full prepare, the files decoded and the files whose
split moved (must be 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


def _photo(seed: int) -> Image.Image:
    """A smooth, photo-like image of a random size (gradients + blobs + noise compress like photos)."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 601, size=2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * x / 37 + b * y / 53 + f * 6)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        img += (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None] * rng.uniform(-80, 80, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


DISTINCT = 2000  # distinct pictures; the rest of a large folder are hard links to them (same decode cost)


def _path(root: Path, i: int) -> Path:
    return root / f"class{i % 10}" / f"{i:07d}.jpg"


def _make(args: tuple[Path, int]) -> None:
    root, i = args
    if not _path(root, i).exists():
        _photo(i).save(_path(root, i), quality=90)


def make_folder(root: Path, n: int) -> None:
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make, [(root, i) for i in range(min(n, DISTINCT))], chunksize=64))
    for i in range(DISTINCT, n):  # same class folder as its original: i and i % DISTINCT agree mod 10
        if not _path(root, i).exists():
            os.link(_path(root, i % DISTINCT), _path(root, i))


def subset(full: Path, dest: Path, n: int) -> None:
    for i in range(n):
        src = _path(full, i)
        target = dest / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(src, target)


def run_prepare(source: Path, out: Path, img_size: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "mae-ops"), "prepare", "--set", f"data.source={source}",
           "--set", f"data.img_size={img_size}", "--set", f"data.out_dir={out}",
           "--set", "model.preset=mae_vit_base_patch16"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    main, peak_main, peak_tree = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            rss_main = main.memory_info().rss
            tree = rss_main + sum(c.memory_info().rss for c in main.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, rss_main), max(peak_tree, tree)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{output[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"images": manifest["num_images"], "seconds": round(seconds, 1),
            "images_per_s": round(manifest["num_images"] / seconds, 1),
            "peak_rss_main_mb": round(peak_main / 2**20), "peak_rss_tree_mb": round(peak_tree / 2**20),
            "store_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20),
            "decoded": manifest["reused"]["decoded"]}  # fmt: skip


def _splits(out: Path) -> dict[str, str]:
    with open(out / "index.csv", newline="") as fh:
        return {row["path"]: row["split"] for row in csv.DictReader(fh)}


def grow(source: Path, n: int) -> list[Path]:
    """1% more files (new names, hard links to existing pictures: the same decode cost)."""
    added = []
    for i in range(max(1, n // 100)):
        target = source / f"class{i % 10}" / f"added-{i:07d}.jpg"
        os.link(_path(source, i % min(n, DISTINCT)), target)
        added.append(target)
    return added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[10_000])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated folders here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare-scale-"))
    full = work / f"photos-{max(args.images)}"
    t0 = time.perf_counter()
    make_folder(full, max(args.images))
    made_s = time.perf_counter() - t0
    results = {}
    for n in sorted(args.images):
        source = full if n == max(args.images) else work / f"photos-{n}"
        if source != full:
            subset(full, source, n)
        out = work / f"prepared-{n}"
        shutil.rmtree(out, ignore_errors=True)
        results[n] = run_prepare(source, out, args.img_size)
        before = _splits(out)
        added = grow(source, n)
        again = run_prepare(source, out, args.img_size)
        after = _splits(out)
        results[n]["re_prepare_1pct"] = {
            "added": len(added), "seconds": again["seconds"], "decoded": again["decoded"],
            "ratio_to_full": round(again["seconds"] / results[n]["seconds"], 3),
            "peak_rss_tree_mb": again["peak_rss_tree_mb"],
            "moved_between_splits": sum(after.get(k) != v for k, v in before.items()),
        }  # fmt: skip
        for path in added:
            path.unlink()
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({n: results[n]}), file=sys.stderr, flush=True)
    report = {"img_size": args.img_size, "cores": os.cpu_count(), "generate_s": round(made_s, 1), "runs": results}
    print(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
