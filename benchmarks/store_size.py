"""How many pixels `data.store_size` should keep: fidelity of pre-training crops and cost.

    python benchmarks/store_size.py --images 200 --img-size 224

Pre-training takes RandomResizedCrop views (area 0.2-1 of the image, aspect 3/4-4/3)
and resizes each to img_size. The reference recipe cuts them from the original
photo; mae-ops cuts them from the stored centre square of side S. For photo-like
JPEGs of 256-600 px (the generator of prepare_scale.py) this measures, per S, the
PSNR of the crop taken from the store against the same crop taken from the
original file (higher is closer to the reference), the decode time per file and
the store's bytes per image. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from prepare_scale import _photo

from mae_ops.images import load_image


def crop_boxes(rng: np.random.Generator, n: int) -> list[tuple[float, float, float, float]]:
    """RandomResizedCrop boxes (scale 0.2-1, log-uniform ratio 3/4-4/3) in [0, 1] coordinates of a square."""
    boxes = []
    while len(boxes) < n:
        area = rng.uniform(0.2, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if w <= 1 and h <= 1:
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            boxes.append((x, y, x + w, y + h))
    return boxes


def view(img: Image.Image, box: tuple[float, float, float, float], out: int) -> np.ndarray:
    side = img.width
    return np.asarray(img.resize((out, out), Image.Resampling.BICUBIC, box=tuple(v * side for v in box)), np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 288, 320, 384])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results: dict[int, dict] = {s: {"psnr": [], "decode_ms": []} for s in args.sizes}
    with tempfile.TemporaryDirectory(prefix="store-size-") as tmp:
        for i in range(args.images):
            path = Path(tmp) / f"{i}.jpg"
            _photo(i).save(path, quality=90)
            with Image.open(path) as img:
                square = ImageOps.fit(img.convert("RGB"), (min(img.size),) * 2)  # full resolution, centre square
            boxes = crop_boxes(rng, args.crops)
            truth = [view(square, b, args.img_size) for b in boxes]
            for s in args.sizes:
                t0 = time.perf_counter()
                stored = load_image(path, s, 3)  # what prepare writes at store_size s
                results[s]["decode_ms"].append((time.perf_counter() - t0) * 1e3)
                small = Image.fromarray(stored.transpose(1, 2, 0))
                for b, t in zip(boxes, truth, strict=True):
                    mse = np.mean((view(small, b, args.img_size) - t) ** 2)
                    results[s]["psnr"].append(10 * math.log10(255**2 / max(mse, 1e-10)))
    report = {
        "img_size": args.img_size, "images": args.images, "crops_per_image": args.crops,
        "source": "photo-like JPEGs, 256-600 px (benchmarks/prepare_scale.py)",
        "by_store_size": {
            s: {"crop_psnr_db": round(float(np.mean(r["psnr"])), 2),
                "crop_psnr_db_p10": round(float(np.percentile(r["psnr"], 10)), 2),
                "decode_ms": round(float(np.median(r["decode_ms"])), 2),
                "store_kb_per_image": round(3 * s * s / 1024, 1),
                "store_gb_per_100k": round(3 * s * s * 100_000 / 1e9, 1)}
            for s, r in results.items()
        },
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
