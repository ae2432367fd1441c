"""The host loader at scale: can it feed the GPU's pre-training step?

When the store is larger than a quarter of the GPU's free memory, pre-training reads
its batches on the host (``mae_ops.data.batch_loader``: memory-mapped shards, rows of
a batch read in shard order, pinned when CUDA is present) and crops, flips and
normalises them on the device. This measures that host path, per core:

  read       uint8 batches delivered by the loader (the host's whole job on a GPU run)
  read+aug   the same plus RandomResizedCrop to 224 px + flip + normalise on this CPU
             (the whole job on a CPU run; on a GPU this part runs on the device)
  randaug    read + timm RandAugment (``--randaug``, PIL, per image) in the loader
             processes: fine-tuning's host work when its recipe has RandAugment

from a store larger than RAM (the page cache dropped first when allowed), in the
global order (DistributedSampler's: random rows) and in shard windows
(``pretrain.shuffle: windows``: a few shards at a time, read ahead), and from a part
of it in the page cache, with 0, 1, ... loader processes; and raw disk reads
(sequential and random rows) for the bandwidth. It then says how many cores and how much disk bandwidth the fast
path's measured step rate needs (``--gpu-images-per-s``, 4,855 img/s: ViT-B/16 on
an H200).

    python benchmarks/loader_throughput.py --store /tmp/loader-store --images 150000 --size 256 \
        --out benchmarks/results/cpu-loader-throughput.json

The store is made once (random uint8 rows: the loader's speed does not depend on
pixel values) in the layout ``mae-ops prepare`` writes, and kept for later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from prepare_scale import drop_page_cache  # a sibling script: its folder is on sys.path when run

from mae_ops.atomic import write_json
from mae_ops.data import WINDOW_SHARDS, PreparedData, batch_loader, normalize, random_resized_crop, set_epoch
from mae_ops.finetuning import HostRandAugment
from mae_ops.reporting import git_revision
from mae_ops.store import StoreWriter, rows_per_shard, write_table

COLD, WARM = "larger than RAM", "in the page cache"


def make_store(root: Path, n: int, size: int, channels: int = 3, img_size: int | None = None) -> PreparedData:
    """A prepared folder of ``n`` random ``size``-px images (reused when already there),
    for a model at ``img_size`` px (default: ``size``; pre-training crops from the larger store)."""
    img_size = img_size or size
    if (root / "manifest.json").exists():
        data = PreparedData(root)
        if len(data.images) == n and data.store_size == size and data.img_size == img_size:
            return data
        raise SystemExit(f"{root} holds another store: remove it or choose another --store")
    rng = np.random.default_rng(0)
    writer = StoreWriter(root, (channels, size, size))
    per_shard, where = rows_per_shard((channels, size, size)), []
    for start in range(0, n, per_shard):
        rows = min(per_shard, n - start)
        shard, path = writer.new(rows)
        images = np.load(path, mmap_mode="r+")
        for i in range(0, rows, 256):
            images[i : i + 256] = rng.integers(0, 256, (min(256, rows - i), channels, size, size), dtype=np.uint8)
        images.flush()
        del images
        writer.seal(shard)
        where.append(np.stack([np.full(rows, shard), np.arange(rows)], 1))
        print(f"store: {start + rows}/{n} images", flush=True)
    write_table(root, np.concatenate(where), np.zeros((n, channels, 2), dtype=np.int64))
    np.save(root / "labels.npy", np.zeros(n, dtype=np.int64))
    np.save(root / "split.npy", np.zeros(n, dtype=np.int8))
    np.save(root / "labelled.npy", np.zeros(n, dtype=bool))
    manifest = {"classes": ["x"], "content_hash": "synthetic", "shards": writer.names, "img_size": img_size,
                "crop_pct": img_size / size, "mean": [0.5] * channels, "std": [0.25] * channels}  # fmt: skip
    write_json(root / "manifest.json", manifest)
    return PreparedData(root)


def loader_rate(data: PreparedData, ids: np.ndarray, batch: int, workers: int, seconds: float, augment: bool,
                crop: int, window_shards: int, randaug: str = "") -> dict:  # fmt: skip
    """Images/s the loader delivers (optionally augmented here, or RandAugment-ed in its
    processes) over ``seconds`` after one warm-up batch."""
    transform = HostRandAugment(randaug, data.mean) if randaug else None
    loader = batch_loader(data, ids, batch, shuffle=True, seed=1, drop_last=True, num_workers=workers,
                          window_shards=window_shards, transform=transform)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seen, t0, epoch = 0, None, 0
    while t0 is None or time.perf_counter() - t0 < seconds:
        set_epoch(loader, epoch)
        for imgs, _ in loader:
            if augment:
                x = random_resized_crop(imgs.float().div_(255.0), crop, (0.2, 1.0), generator=gen)
                normalize(x, data.mean, data.std)
            if t0 is None:
                t0 = time.perf_counter()  # after the first batch: worker start-up excluded
                continue
            seen += imgs.shape[0]
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    elapsed = time.perf_counter() - t0
    cores = max(1, workers) + (1 if augment and workers else 0)  # workers read; the main process augments
    rate = seen / elapsed
    return {"order": f"windows of {window_shards} shards" if window_shards else "global",
            "workers": workers, "augment": augment, "randaug": randaug, "images_per_s": round(rate, 1),
            "mb_per_s": round(rate * data.images[0].nbytes / 1e6, 1), "cores_busy": cores,
            "images_per_s_per_core": round(rate / min(cores, os.cpu_count() or 1), 1)}  # fmt: skip


def disk_read(data: PreparedData, rows: int, random_order: bool) -> dict:
    """MB/s reading ``rows`` single rows straight from the shards, in order or at random (cold cache)."""
    rows = min(rows, len(data.images))
    order = np.random.default_rng(2).permutation(len(data.images))[:rows] if random_order else np.arange(rows)
    t0 = time.perf_counter()
    total = 0
    for i in order:
        total += int(np.asarray(data.images[int(i)]).sum(dtype=np.int64) >= 0) * data.images[0].nbytes
    elapsed = time.perf_counter() - t0
    return {"order": "random rows" if random_order else "sequential", "rows": rows,
            "mb_per_s": round(total / elapsed / 1e6, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="folder for the store (made once, then reused)")
    ap.add_argument("--images", type=int, default=150_000)
    ap.add_argument("--size", type=int, default=256, help="stored side in px")
    ap.add_argument("--crop", type=int, default=224, help="side after RandomResizedCrop")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    ap.add_argument("--cached-gib", type=float, default=4.0, help="size of the part read from the page cache")
    ap.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", help="RandAugment spec measured; '' skips it")
    ap.add_argument("--gpu-images-per-s", type=float, default=4855.0, help="the step rate to feed")
    ap.add_argument("--keep-page-cache", action="store_true", help="do not drop it (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks/loader_throughput.json"))
    args = ap.parse_args()

    data = make_store(args.store, args.images, args.size)
    row_bytes = data.images[0].nbytes
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    store_bytes = len(data.images) * row_bytes
    report: dict = {
        "benchmark": "loader_throughput", "commit": git_revision(Path(__file__).resolve().parents[1]),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "ram_gib": round(ram / 2**30, 1),
        "store": {"images": len(data.images), "side_px": data.img_size, "gib": round(store_bytes / 2**30, 2),
                  "larger_than_ram": store_bytes > ram},
        "batch_size": args.batch_size, "crop_px": args.crop, "results": [],
    }  # fmt: skip
    cold = (lambda: False) if args.keep_page_cache else drop_page_cache
    report["page_cache_dropped"] = cold()
    report["disk"] = [disk_read(data, 2000, False), disk_read(data, 2000, True)]
    print(json.dumps(report["disk"]), flush=True)

    every = np.arange(len(data.images))
    cached = every[: int(args.cached_gib * 2**30 // row_bytes)]
    # larger than RAM: reading is the whole question (augmenting is measured on the cached part)
    plan = [(COLD, every, False, order, "") for order in (0, WINDOW_SHARDS)]
    plan += [(WARM, cached, augment, 0, "") for augment in (False, True)]
    plan += [(WARM, cached, False, 0, args.randaug)] if args.randaug else []
    for where, ids, augment, window, randaug in plan:
        for workers in args.workers:
            if where == COLD:
                cold()
            for start in range(0, len(cached), 1024):  # read once: the cached part is in the page cache
                np.asarray(data.images[cached[start : start + 1024]])
            result = {"store": where, **loader_rate(data, ids, args.batch_size, workers, args.seconds, augment,
                                                     args.crop, window, randaug)}  # fmt: skip
            print(json.dumps(result), flush=True)
            report["results"].append(result)

    def best(where: str, augment: bool, window: bool, randaug: str = "") -> dict:
        rows = [r for r in report["results"] if r["store"] == where and r["augment"] == augment
                and (r["order"] != "global") == window and r["randaug"] == randaug]  # fmt: skip
        return max(rows, key=lambda r: r["images_per_s"])

    need = args.gpu_images_per_s
    feed = {}
    for name, where, window in (("larger than RAM, global order", COLD, False),
                                ("larger than RAM, shard windows", COLD, True),
                                ("in the page cache", WARM, False)):  # fmt: skip
        top = best(where, False, window)
        feed[name] = {"best_images_per_s": top["images_per_s"], "with_workers": top["workers"],
                      "images_per_s_per_core": top["images_per_s_per_core"],
                      "cores_to_feed_gpu": int(np.ceil(need / top["images_per_s_per_core"]))}  # fmt: skip
    cpu_aug = best(WARM, True, False)
    report["to_feed_the_gpu"] = {
        "gpu_images_per_s": need, "disk_mb_per_s": round(need * row_bytes / 1e6, 1), **feed,
        "cpu_augment_images_per_s_per_core": cpu_aug["images_per_s_per_core"],
    }  # fmt: skip
    if args.randaug:  # fine-tuning with RandAugment: its loader processes' rate
        rows = {r["workers"]: r["images_per_s"] for r in report["results"] if r["randaug"]}
        top = best(WARM, False, False, args.randaug)
        report["randaug"] = {
            "spec": args.randaug,
            "images_per_s_by_workers": rows,
            "best_images_per_s": top["images_per_s"],
            "with_workers": top["workers"],
            "images_per_s_per_core": top["images_per_s_per_core"],
            "best_over_main_process": round(top["images_per_s"] / rows[0], 2) if 0 in rows else None,
        }
        print(json.dumps(report["randaug"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(json.dumps(report["to_feed_the_gpu"], indent=1))


if __name__ == "__main__":
    main()
