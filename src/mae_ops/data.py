"""Reading data/prepared/ for training, and batched on-device augmentation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from mae_ops.errors import UserError
from mae_ops.images import TYPE_BITS, center_crop, eval_side
from mae_ops.store import SPLITS, EvalView, ShardedImages, open_images


class PreparedData:
    """Memory-mapped view of a prepared data folder."""

    def __init__(self, root: str | Path, hide_test: bool = False) -> None:
        """``hide_test``: training and tuning code opens the data this way, so
        that asking for the held-out test split is an error, not a leak."""
        self.root = Path(root)
        self.hide_test = hide_test
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise UserError(f"{manifest} not found: run `mae-ops prepare` first")
        self.manifest = json.loads(manifest.read_text())
        self.images = open_images(self.root, self.manifest)  # (N, C, S, S) uint8 at the store's side S
        # what evaluation sees: resize by crop_pct and centre crop to img_size (timm's eval transform)
        self.eval_images = EvalView(self.images, self.img_size, self.crop_pct)
        self.labels = np.load(self.root / "labels.npy")
        self.split = np.load(self.root / "split.npy")
        self.labelled = np.load(self.root / "labelled.npy")

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_size(self) -> int:
        """The side the model sees (the store may keep more pixels: ``store_size``)."""
        return int(self.manifest.get("img_size", self.images.shape[-1]))

    @property
    def store_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def crop_pct(self) -> float:
        return float(self.manifest.get("crop_pct", 1.0))

    @property
    def bit_depth(self) -> int:
        """The bits of 16/32-bit integer files' values that prepare scaled to 0..255 (data.bit_depth)."""
        return int(self.manifest.get("decoder", {}).get("bit_depth", TYPE_BITS))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def mean(self) -> list[float]:
        return list(self.manifest["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.manifest["std"])

    def indices(self, *splits: str, labelled_only: bool = False) -> np.ndarray:
        if self.hide_test and "test" in splits:
            raise PermissionError("the test split is held out: only evaluation may read it")
        mask = np.isin(self.split, [SPLITS[s] for s in splits])
        if labelled_only:
            mask &= self.labelled
        return np.flatnonzero(mask)


BatchTransform = Callable[[np.ndarray, np.random.SeedSequence], np.ndarray]  # uint8 (N, C, H, W), its draws


class _BatchReader(Dataset):
    """Indexed by (epoch, a whole batch of positions): one sorted memmap read per batch,
    then ``transform`` (per-image host augmentation) if any, in whichever process reads
    the batch. Its draws are keyed by the seed, the epoch and the batch's first sample,
    not by the process: any number of loader workers gives the same batches."""

    def __init__(self, images: ShardedImages, labels: np.ndarray, ids: np.ndarray,
                 transform: BatchTransform | None = None, seed: int = 0) -> None:  # fmt: skip
        self.images, self.labels, self.ids = images, labels, ids
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, positions = key
        rows = np.sort(self.ids[np.asarray(positions)])
        images = np.ascontiguousarray(self.images[rows])
        if self.transform is not None and len(rows):  # batches of an epoch are disjoint: the first row keys it
            images = self.transform(images, np.random.SeedSequence([self.seed, epoch, int(rows[0])]))
        return torch.from_numpy(images), torch.from_numpy(self.labels[rows])


class _EpochBatches(BatchSampler):
    """A BatchSampler whose batches carry their epoch: (epoch, positions)."""

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:  # type: ignore[override]
        for batch in super().__iter__():
            yield self.sampler.epoch, batch


def _positions(n: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world_size: int) -> DistributedSampler:
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)  # fmt: skip


def _batch_sampler(
    n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world_size: int
) -> BatchSampler:
    return BatchSampler(_positions(n, shuffle, seed, drop_last, rank, world_size), batch_size, drop_last=drop_last)


WINDOW_SHARDS = 4  # shards (about 1 GiB) shuffled together by pretrain.shuffle: windows


class ShardWindowSampler(Sampler[int]):
    """Every position once per epoch (padded or cut to equal shares per rank, as
    DistributedSampler does), in an order that reads the store a few shards at a time:
    the shards are shuffled, taken ``window`` at a time, and the samples of a window
    shuffled among themselves (the shuffle of WebDataset and MosaicML Streaming). While
    a window is served the next one's shards are read ahead (``read_ahead``), so a store
    larger than memory streams at the disk's sequential speed, not at its random-read
    speed. Rank r takes every world_size-th sample of the order: all ranks read the same
    window at once."""

    def __init__(
        self, shard_of: np.ndarray, *, seed: int, drop_last: bool, rank: int, world_size: int, window: int,
        read_ahead: Callable[[list[int]], None] | None = None,
    ) -> None:  # fmt: skip
        self.shard_of, self.seed, self.rank, self.world_size = np.asarray(shard_of), seed, rank, world_size
        self.window, self.read_ahead, self.epoch = max(1, window), read_ahead, 0
        n = len(self.shard_of)
        self.per_rank = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def _windows(self) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """This epoch's windows (their shards, in order), every position sorted by its
        window and shuffled within it (one sort, whatever the number of windows), and
        the number of positions in each window."""
        rng = np.random.default_rng([self.seed, self.epoch])
        shards = rng.permutation(np.unique(self.shard_of))
        window_of = np.empty(int(shards.max(initial=-1)) + 1, dtype=np.int64)
        window_of[shards] = np.arange(len(shards)) // self.window
        window = window_of[self.shard_of]
        order = np.lexsort((rng.random(len(window)), window))
        groups = [shards[s : s + self.window].tolist() for s in range(0, len(shards), self.window)]
        return groups, order, np.bincount(window, minlength=len(groups))

    def __iter__(self) -> Iterator[int]:
        groups, order, sizes = self._windows()
        total = self.per_rank * self.world_size
        order = np.resize(order, total) if total > len(order) else order[:total]  # pad by wrapping, or cut
        mine = order[self.rank :: self.world_size]
        ends = np.cumsum(sizes) // self.world_size  # where each window ends in `mine`
        if self.read_ahead is not None and groups:
            self.read_ahead(groups[0])
        start = 0
        for k, end in enumerate(ends):
            if self.read_ahead is not None and k + 1 < len(groups):
                self.read_ahead(groups[k + 1])  # the kernel reads the next window while this one is served
            yield from mine[start:end].tolist()
            start = end
        yield from mine[start:].tolist()


def batch_loader(
    data: PreparedData,
    ids: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    window_shards: int = 0,
    transform: BatchTransform | None = None,
) -> DataLoader:
    """uint8 image batches (and labels) over ``ids``, read from the memmap on the
    host (pinned when CUDA is present); sharded across ranks like
    DistributedSampler. ``window_shards`` > 0 (with ``shuffle``): shuffled that many
    shards at a time (``ShardWindowSampler``), for stores larger than memory.
    ``transform`` runs on each batch in the ``num_workers`` loader processes (in this
    one with 0), its draws the same for any number of them. Call
    ``set_epoch(loader, e)`` before each epoch."""
    if window_shards and shuffle:
        positions: Sampler[int] = ShardWindowSampler(
            data.images.where[ids, 0], seed=seed, drop_last=drop_last, rank=rank, world_size=world_size,
            window=window_shards, read_ahead=data.images.read_ahead,
        )  # fmt: skip
    else:
        positions = _positions(len(ids), shuffle, seed, drop_last, rank, world_size)
    return DataLoader(
        _BatchReader(data.images, data.labels, ids, transform, seed),
        sampler=_EpochBatches(positions, batch_size, drop_last=drop_last),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # its workers' seeds from its own generator: the global RNG (dropout, Mixup) is
        # left alone, however many workers and however often an epoch starts
        generator=torch.Generator().manual_seed(seed),
    )


class DeviceBatches:
    """The same batches as ``batch_loader`` (same sampler, same order), served
    from a copy of the uint8 images resident on ``device``: a step costs one
    on-device gather, and the host does no work per batch (one index copy per
    epoch). For data sets that fit in accelerator memory; the copy goes up in
    64 MiB pinned chunks, so host memory does not grow with the data."""

    def __init__(
        self, data: PreparedData, ids: np.ndarray, batch_size: int, device: torch.device, *, shuffle: bool,
        seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        self.sampler = _batch_sampler(len(ids), batch_size, shuffle, seed, drop_last, rank, world_size)
        self.rows = np.asarray(ids)
        self.images = torch.empty((len(self.rows), *data.images.shape[1:]), dtype=torch.uint8, device=device)
        step = max(1, (64 << 20) // int(np.prod(data.images.shape[1:])))  # 64 MiB of host memory at a time
        for start in range(0, len(self.rows), step):
            chunk = torch.from_numpy(data.images[self.rows[start : start + step]])
            self.images[start : start + len(chunk)].copy_(chunk.pin_memory() if device.type == "cuda" else chunk)
        self.labels = torch.from_numpy(data.labels[self.rows]).to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # each batch in ascending row order, as _BatchReader reads it
        batches = [b[np.argsort(self.rows[b], kind="stable")] for b in map(np.asarray, self.sampler)]
        if not batches:
            return
        order = torch.from_numpy(np.concatenate(batches)).to(self.device)
        start = 0
        for b in batches:
            idx = order[start : start + len(b)]
            start += len(b)
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)

    @staticmethod
    def fits(data: PreparedData, ids: np.ndarray, device: torch.device, share: float = 0.25) -> bool:
        """Whether the images of ``ids`` take at most ``share`` of the device's free memory."""
        if device.type != "cuda":
            return True
        need = len(ids) * int(np.prod(data.images.shape[1:]))
        return need <= share * torch.cuda.mem_get_info(device)[0]


def set_epoch(loader: DataLoader | DeviceBatches, epoch: int) -> None:
    """Reshuffle a ``batch_loader`` or ``DeviceBatches`` for ``epoch`` (same order on every rank)."""
    loader.sampler.sampler.set_epoch(epoch)


def normalize(x: torch.Tensor, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (N, C, H, W) -> standardised float. Pass ``mean`` and
    ``std`` as tensors on x's device in a training loop: building them from
    lists is a host-to-device copy, which waits for the device."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def center_view(x: torch.Tensor, img_size: int, crop_pct: float) -> torch.Tensor:
    """The evaluation crop on a float batch (N, C, S, S) on any device: resize to
    floor(img_size / crop_pct) when S differs (antialiased), centre crop img_size."""
    side = eval_side(img_size, crop_pct)
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    crop = center_crop(side, img_size)
    return x[..., crop, crop]


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample RandomResizedCrop (+ horizontal flip) for a whole batch at once.

    Same sampling as torchvision's RandomResizedCrop (area fraction uniform in
    ``scale``, log-uniform aspect ratio, 10 tries, whole image as fallback), but
    vectorised with one ``grid_sample`` so it runs on the GPU with no per-image
    Python work. x: (N, C, H, W) float -> (N, C, size, size).
    """
    n, dev = x.shape[0], x.device
    h_in, w_in = x.shape[-2:]
    tries = 10

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=dev, generator=generator)

    area = scale[0] + (scale[1] - scale[0]) * rand(n, tries)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))  # host floats: no device copy, no sync
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * rand(n, tries))
    # crop sides as fractions of the image sides
    cw = torch.sqrt(area * aspect * h_in / w_in)
    ch = torch.sqrt(area / aspect * w_in / h_in)
    ok = (cw <= 1) & (ch <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=dev))
    pick = first.unsqueeze(1)
    cw = torch.where(ok.any(1), cw.gather(1, pick).squeeze(1), torch.ones(n, device=dev))
    ch = torch.where(ok.any(1), ch.gather(1, pick).squeeze(1), torch.ones(n, device=dev))
    # crop centre so the crop stays inside the image, in [-1, 1] coordinates
    cx = (1 - cw) * (2 * rand(n) - 1)
    cy = (1 - ch) * (2 * rand(n) - 1)
    sign = torch.where(rand(n) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = cw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_affine(
    x: torch.Tensor,
    translate: float = 0.1,
    degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    hflip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random shift (fraction of the side), rotation, zoom and flip for
    a whole batch in one ``grid_sample``; empty borders are filled with the edge
    colour. x: (N, C, H, W) float."""
    n, dev = x.shape[0], x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, device=dev, generator=generator)

    angle = torch.deg2rad(uniform(-degrees, degrees))
    zoom = uniform(*scale)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = 2 * uniform(-translate, translate)
    theta[:, 1, 2] = 2 * uniform(-translate, translate)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
