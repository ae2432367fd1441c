"""The prepared image store: immutable numpy shards and a table saying where each sample is.

Layout inside ``data/prepared/``:
  shards/<name>.npy   (n, C, S, S) uint8 .npy files of at most ``SHARD_BYTES``, written once,
                      never modified afterwards (so a re-prepare can hard-link them)
  where.npy           (N, 2) int64: shard number (into manifest["shards"]) and row of sample i
  pixel_sums.npy      (N, C, 2) int64: per-channel sum and sum of squares of sample i's pixels

Why numpy shards rather than WebDataset / LitData / MosaicML Streaming: MAE training
here draws batches by index (DistributedSampler order, the same batches on CPU, DDP
and the device-resident loader), which memory-mapped .npy files serve with one
gather per batch and no decode; tar streams only shuffle within a buffer, and the
streaming libraries bring their own samplers, chunk caches and object-store clients
for a layout this project reads from a local or shared file system. Immutable
shards also make a re-prepare incremental: unchanged files keep their shard, which
is hard-linked, not copied.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np

from mae_ops.images import eval_view
from mae_ops.reporting import file_sha256

SHARD_DIR = "shards"
SHARD_BYTES = 256 << 20
STORE_VERSION = 3  # 3: samples are file contents (index.csv sample_id), content-named shards
SPLITS = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}  # codes in split.npy


def rows_per_shard(row_shape: tuple[int, ...], shard_bytes: int = SHARD_BYTES) -> int:
    return max(1, shard_bytes // int(np.prod(row_shape)))


class ShardedImages:
    """An (N, C, S, S) uint8 array spread over shards, indexed like a numpy array
    (integer, slice, integer or boolean array); each shard is memory-mapped when first
    read. Picklable without its maps, so DataLoader workers open their own."""

    def __init__(self, root: str | Path, shards: list[str], where: np.ndarray) -> None:
        self.root, self.names, self.where = Path(root), list(shards), np.asarray(where, dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}
        row_shape = self._shard(0).shape[1:] if self.names else (0, 0, 0)
        self.shape: tuple[int, ...] = (len(self.where), *row_shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def read_ahead(self, shards: list[int]) -> None:
        """Ask the kernel to read these shards into the page cache now, in the background
        (sequential reads: what a disk does fastest)."""
        if not hasattr(os, "posix_fadvise"):  # not on macOS or Windows: the reads come as they are asked
            return
        for i in shards:
            fd = os.open(self.root / SHARD_DIR / self.names[i], os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.load(self.root / SHARD_DIR / self.names[i], mmap_mode="r")
        return self._maps[i]

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, tuple):  # rows first, then the rest on the rows read
            if not idx:
                return self[:]
            rows = self[idx[0]]
            return rows[idx[1:]] if isinstance(idx[0], (int, np.integer)) else rows[(slice(None), *idx[1:])]
        if isinstance(idx, (int, np.integer)):
            shard, row = self.where[idx]
            return np.asarray(self._shard(int(shard))[row])
        ids = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        ids = np.flatnonzero(ids) if ids.dtype == bool else ids.astype(np.int64, copy=False)
        out = np.empty((len(ids), *self.shape[1:]), dtype=np.uint8)
        loc = self.where[ids]
        order = np.lexsort((loc[:, 1], loc[:, 0]))  # by shard, then row: sequential reads
        shards, starts = np.unique(loc[order, 0], return_index=True)
        for shard, pos in zip(shards, np.split(order, starts[1:]), strict=True):
            out[pos] = self._shard(int(shard))[loc[pos, 1]]
        return out


class EvalView:
    """The stored images as evaluation sees them (``images.eval_view``): (N, C, img, img)."""

    def __init__(self, images: ShardedImages, img_size: int, crop_pct: float) -> None:
        self.images, self.img_size, self.crop_pct = images, img_size, crop_pct
        self.shape = (len(images), images.shape[1], img_size, img_size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return eval_view(self.images[[idx]], self.img_size, self.crop_pct)[0]
        return eval_view(self.images[idx], self.img_size, self.crop_pct)


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


def compact(path: Path, keep: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """Drop the rows not in ``keep`` from the .npy file ``path`` in place (rows move up in
    bounded chunks, the header gets the new length, the file is truncated): no second copy."""
    arr = np.load(path, mmap_mode="r")
    row_shape, row_bytes, offset = arr.shape[1:], int(np.prod(arr.shape[1:])), arr.offset
    del arr
    step = max(1, chunk_bytes // row_bytes)
    kept = np.flatnonzero(keep)
    for start in range(0, len(kept), step):
        arr = np.load(path, mmap_mode="r+")  # a map per chunk: the pages touched are let go after it
        src = kept[start : start + step]
        arr[start : start + len(src)] = arr[src]  # destination rows never pass their sources
        arr.flush()
        del arr
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (len(kept), *row_shape)}
    )
    if header.tell() != offset:  # cannot happen for a shorter shape; fail loudly rather than corrupt
        raise RuntimeError(f"cannot rewrite the header of {path} in place")
    with open(path, "r+b") as fh:
        fh.write(header.getvalue())
        fh.truncate(offset + len(kept) * row_bytes)


class StoreWriter:
    """Builds the shards of a new store in ``root`` (a temporary folder that replaces
    the old store when complete): new shards to decode into, or old ones taken over
    by hard link. A shard is named by its content (the start of its SHA-256), so the
    same images decoded the same way give the same files, whatever machine made them."""

    def __init__(self, root: Path, row_shape: tuple[int, int, int]) -> None:
        self.dir = root / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.row_shape = row_shape
        self.names: list[str] = []
        self.hashes: list[str] = []

    def link(self, src: Path, sha256: str) -> int:
        """Take over an unchanged shard of the previous store (same bytes, no copy)."""
        dest = self.dir / src.name
        if not dest.exists():
            try:
                os.link(src, dest)
            except OSError:  # a file system without hard links
                shutil.copyfile(src, dest)
        self.names.append(src.name)
        self.hashes.append(sha256)
        return len(self.names) - 1

    def new(self, rows: int) -> tuple[int, Path]:
        """A new shard of ``rows`` zeroed rows, its disk space reserved (named when sealed)."""
        path = self.dir / f".new-{len(self.names):05d}.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, *self.row_shape)).flush()
        _reserve(path)
        self.names.append(path.name)
        self.hashes.append("")
        return len(self.names) - 1, path

    def rows(self) -> int:
        """Rows in all shards, used or not."""
        return sum(np.load(self.dir / n, mmap_mode="r").shape[0] for n in self.names)

    def seal(self, shard: int, keep: np.ndarray | None = None) -> None:
        """Finish a new shard: drop the rows of files that failed to decode, name it by its hash."""
        path = self.dir / self.names[shard]
        if keep is not None and not keep.all():
            compact(path, keep)
        digest = file_sha256(path)
        name = f"{digest[:24]}.npy"
        if (self.dir / name).exists():  # the same bytes are there already (a linked shard)
            path.unlink()
        else:
            os.replace(path, self.dir / name)
        self.names[shard], self.hashes[shard] = name, digest


def write_table(root: Path, where: np.ndarray, sums: np.ndarray) -> None:
    np.save(root / "where.npy", np.asarray(where, dtype=np.int64).reshape(-1, 2))
    np.save(root / "pixel_sums.npy", np.asarray(sums, dtype=np.int64))


def open_images(root: str | Path, manifest: dict) -> ShardedImages:
    return ShardedImages(root, manifest["shards"], np.load(Path(root) / "where.npy"))


def open_eval_images(root: str | Path, manifest: dict) -> EvalView:
    return EvalView(open_images(root, manifest), manifest["img_size"], manifest.get("crop_pct", 1.0))


def channel_stats(sums: np.ndarray, pixels_per_channel: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units from rows of ``pixel_sums`` (exact: integer sums)."""
    if len(sums) == 0:
        c = sums.shape[1] if sums.ndim == 3 else 1
        return [0.5] * c, [0.5] * c
    total = sums.sum(axis=0).astype(np.float64)  # (C, 2)
    count = len(sums) * pixels_per_channel
    mean = total[:, 0] / count / 255.0
    var = total[:, 1] / count / 255.0**2 - mean**2
    return mean.round(6).tolist(), np.sqrt(np.maximum(var, 1e-12)).round(6).tolist()
