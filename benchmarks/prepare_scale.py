"""`mae-ops prepare` at scale: images/s and peak memory for folders of realistic JPEGs.

    python benchmarks/prepare_scale.py --images 10000 50000 100000 --img-size 224

Makes the largest folder once (photo-like JPEGs of varied sizes, 256-600 px, in
10 class folders, every one a distinct picture: a sample is its content, so copies
would be one sample; the smaller folders are hard-linked subsets of it), runs the
real `mae-ops prepare` on each in a subprocess and samples the memory of its whole
process tree (the stage and its decoding workers). Then adds 1% more distinct
pictures and prepares again into the same store (the incremental path: only the new
files are hashed and decoded). The page cache is dropped before every timed run
where the machine allows it (root), so files are read from disk, not from the
memory the generator left them in. Prints one JSON object: per N the wall time,
images/s, peak RSS of the stage's own process and of the tree, the store's size,
and for the re-prepare its time, its ratio to the full prepare, the files hashed
and decoded and the samples whose split moved (must be 0).
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
    """A smooth, photo-like image of a random size (gradients + blobs + noise compress like photos),
    different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 601, size=2))
    y, x = np.ogrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * x / 37 + b * y / 53 + f * 6, dtype=np.float32)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        y0, y1, x0, x1 = (int(max(0, cy - r)), int(min(h, cy + r + 1)), int(max(0, cx - r)), int(min(w, cx + r + 1)))
        inside = ((x[:, x0:x1] - cx) ** 2 + (y[y0:y1] - cy) ** 2) < r * r
        img[y0:y1, x0:x1] += inside[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)
    img += rng.integers(-10, 11, img.shape, dtype=np.int8)  # sensor noise, cheaper than normals
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _path(root: Path, i: int) -> Path:
    return root / f"class{i % 10}" / f"{i:07d}.jpg"


def _make(args: tuple[Path, int, int]) -> None:
    root, i, seed = args
    if not _path(root, i).exists():
        _photo(seed).save(_path(root, i), quality=90)


def make_folder(root: Path, n: int, start: int = 0) -> None:
    """Pictures start..n-1 of ``root``, each a distinct one (its number is its seed)."""
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make, [(root, i, i) for i in range(start, n)], chunksize=64))


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the next run reads the files from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def subset(full: Path, dest: Path, n: int) -> None:
    for i in range(n):
        src = _path(full, i)
        target = dest / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(src, target)


def run_prepare(source: Path, out: Path, img_size: int) -> dict:
    cold = drop_page_cache()
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
    manifest["reused"] = json.loads((out.parent / f".{out.name}.last-run.json").read_text())["reused"]
    return {"images": manifest["num_images"], "seconds": round(seconds, 1),
            "images_per_s": round(manifest["num_images"] / seconds, 1),
            "peak_rss_main_mb": round(peak_main / 2**20), "peak_rss_tree_mb": round(peak_tree / 2**20),
            "store_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20),
            "decoded": manifest["reused"]["decoded"], "hashed": manifest["reused"]["files_hashed"],
            "page_cache_dropped": cold}  # fmt: skip


def _splits(out: Path) -> dict[str, str]:
    with open(out / "index.csv", newline="") as fh:
        return {row["sample_id"]: row["split"] for row in csv.DictReader(fh)}


def grow(source: Path, n: int) -> list[Path]:
    """1% more files: new, distinct pictures (seeds no folder uses)."""
    added = n // 100 or 1
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make, [(source, 10**7 + i, 10**8 + n + i) for i in range(added)], chunksize=16))
    return [_path(source, 10**7 + i) for i in range(added)]


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
            "added": len(added), "seconds": again["seconds"], "decoded": again["decoded"], "hashed": again["hashed"],
            "ratio_to_full": round(again["seconds"] / results[n]["seconds"], 3),
            "peak_rss_tree_mb": again["peak_rss_tree_mb"],
            "moved_between_splits": sum(after.get(k) != v for k, v in before.items()),
        }  # fmt: skip
        for path in added:
            path.unlink()
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({n: results[n]}), file=sys.stderr, flush=True)
    report = {"img_size": args.img_size, "cores": os.cpu_count(), "distinct_pictures": True,
              "generate_s": round(made_s, 1), "runs": results}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
