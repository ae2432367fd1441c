"""Embeddings on disk and exact cosine search over them (numpy and pyarrow, no torch).

An embeddings file is Parquet: one row per image, ``file`` (string) and ``embedding``
(fixed-size list of float32), written a row group at a time, so neither writing nor
the search holds more than the embeddings themselves (N x D float32: 1M x 192 is
0.8 GB) and one block of similarities.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mae_ops.atomic import atomic_path
from mae_ops.errors import UserError

ROW_GROUP = 4096


class EmbeddingsError(UserError, ValueError):
    """A file that is not an embeddings file `mae-ops embed` wrote."""


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (cosine similarity is then a dot product)."""
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def write_embeddings(rows: Iterable[tuple[str, np.ndarray]], dest: str | Path, metadata: dict[str, str]) -> int:
    """Stream (file, embedding) rows into ``dest`` atomically (a temporary file renamed
    at the end: an interrupted run leaves the previous file); returns the row count."""
    writer, count, files, vectors = None, 0, [], []

    def flush(tmp: Path) -> None:
        nonlocal writer
        block = np.stack(vectors).astype(np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block.shape[1])
        table = pa.table({"file": pa.array(files, pa.string()), "embedding": column})
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema.with_metadata(metadata))
        writer.write_table(table)
        files.clear()
        vectors.clear()

    with atomic_path(dest) as tmp:
        try:
            for f, v in rows:
                files.append(f)
                vectors.append(v)
                count += 1
                if len(files) >= ROW_GROUP:
                    flush(tmp)
            if files:
                flush(tmp)
            if writer is None:
                raise EmbeddingsError(f"no image could be embedded: {dest} not written")
        finally:
            if writer is not None:
                writer.close()
    return count


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(files, L2-normalised float32 embeddings (N, D), the file's metadata)."""
    try:
        table = pq.read_table(path, columns=["file", "embedding"])
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise EmbeddingsError(f"{path} is not an embeddings file from `mae-ops embed` ({exc})") from None
    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise EmbeddingsError(f"{path}: 'embedding' is {column.type}, not a fixed-size list of floats")
    emb = unit_rows(column.flatten().to_numpy().astype(np.float32).reshape(len(table), column.type.list_size))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table.column("file").to_pylist(), emb, meta


def nearest(index: np.ndarray, queries: np.ndarray, k: int, block: int = 1024,
            exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Exact top-``k`` cosine neighbours of each query row among ``index``'s rows, both
    L2-normalised: (ids (Q, k), similarities (Q, k)), best first. ``exclude_self``: the
    queries are ``index`` itself and a row is not its own neighbour."""
    k = min(k, len(index) - int(exclude_self))
    ids = np.empty((len(queries), k), dtype=np.int64)
    sims = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), block):
        s = queries[start : start + block] @ index.T  # (B, N)
        if exclude_self:
            rows = np.arange(len(s))
            s[rows, start + rows] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
        ids[start : start + block] = np.take_along_axis(top, order, 1)
        sims[start : start + block] = np.take_along_axis(s, ids[start : start + block], 1)
    return ids, sims


def near_duplicates(emb: np.ndarray, threshold: float, block: int = 1024) -> Iterator[tuple[int, int, float]]:
    """Every pair (i < j) of L2-normalised rows with cosine similarity >= ``threshold``,
    block by block over the upper triangle (exact, O(N^2 D) time, one block in memory)."""
    for start in range(0, len(emb), block):
        s = emb[start : start + block] @ emb[start:].T  # (B, N - start): columns j >= start
        rows, cols = np.nonzero(s >= threshold)
        keep = cols > rows  # j > i: each pair once, no self-pairs
        for r, c in zip(rows[keep], cols[keep], strict=True):
            yield int(start + r), int(start + c), float(s[r, c])
