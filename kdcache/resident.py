"""Small-image data resident on the device: the batches `loader.Batches` gives, without a loader.

For images of `RESIDENT_MAX_SIDE` px or less whose uint8 pixels (plus labels and indices) fit
`RESIDENT_BUDGET_BYTES`, the selected samples are read from the beton once and kept on the device.
Each epoch's order and augmentation draws are made once, on the host, and uploaded in one copy each;
a step is then a few gathers and elementwise kernels on the device, with no host work per batch (the
fastest CIFAR trainers, airbench and hlb-CIFAR10, do the same). The host-side loader costs about
10 ms per step whatever the model, which capped small-model training on a GPU.

The batches are bit-identical to `Batches`': the same order (FFCV's: `default_rng(seed + epoch)`'s
permutation of the sorted indices in training, index order otherwise), the same pixels (the same uint8
values, the same `crop_flip` / `apply_view` and `normalise` operations, in the same order), stored
views too. Distributed runs and image folders keep FFCV.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import apply_view, choose_view, crop_flip, draw
from .beton import DatasetInfo
from .config import DATA_PATHS

if TYPE_CHECKING:
    from .loader import Batches

RESIDENT_MAX_SIDE = 64                # px: CIFAR, Tiny ImageNet and their like; larger images stay with FFCV
RESIDENT_BUDGET_BYTES = 4 * 1024 ** 3  # images + labels + indices per set; CIFAR-10's 50k take 154 MB,
                                       # 64 px sets about 12 KB per image (350k images at this budget)


def resident_bytes(info: DatasetInfo, count: int) -> int:
    """Device memory a resident copy of `count` samples of `info` takes."""
    h, w, c = info.image_shape
    return count * (h * w * c + 2 * 8)


def fits(info: DatasetInfo, count: int, budget: int = RESIDENT_BUDGET_BYTES) -> bool:
    """Whether `count` samples of `info` may go resident: small images (not an image folder) under budget."""
    return info.small and max(info.image_shape[:2]) <= RESIDENT_MAX_SIDE and resident_bytes(info, count) <= budget


def read_images(info: DatasetInfo, indices: np.ndarray, workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images (n, H, W, 3) and labels of the sorted `indices`, in that order: the very pixels
    FFCV's `SimpleRGBImageDecoder` gives `Batches`."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(info.path, batch_size=1024, num_workers=workers, order=OrderOption.SEQUENTIAL,
                    indices=indices, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    images, labels, index = [], [], []
    for x, y, i in loader:  # np.array: a copy out of FFCV's reused buffers
        images.append(np.array(x)), labels.append(np.array(y).ravel()), index.append(np.array(i).ravel())
    index = np.concatenate(index)
    assert np.array_equal(index, indices), "FFCV's sequential order is not the sorted indices"
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


class ResidentBatches:
    """`Batches`' interface and batches (images, labels, sample indices, views), from device memory.

    `next_epoch` is the epoch the next iteration serves (as FFCV's counter: a resumed run sets it)."""

    def __init__(self, info: DatasetInfo, *, batch_size: int, train: bool, device: torch.device | str = "cpu",
                 indices: Sequence[int] | None = None, seed: int = 0, num_workers: int = -1,
                 augment: bool | None = None, views: np.ndarray | None = None, normalise: bool = True):
        self.device = torch.device(device)
        self.size = info.image_size
        self.seed, self.train, self.batch_size = seed, train, batch_size
        self.crop_flip = info.small and (train if augment is None else augment)
        self.views, self.normalised = views, normalise
        self.indices = (np.arange(info.size, dtype=np.int64) if indices is None
                        else np.sort(np.asarray(indices, dtype=np.int64)))
        images, labels = read_images(info, self.indices, num_workers)
        self.images = torch.from_numpy(images).to(self.device)  # (n, H, W, 3) uint8
        self.labels = torch.from_numpy(labels).to(self.device)
        self.index = torch.from_numpy(self.indices).to(self.device)
        self.mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1)
        self.next_epoch = 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Positions into the resident arrays, in the order FFCV serves them (ffcv.traversal_order)."""
        if not self.train:
            return np.arange(len(self.indices))
        order = np.random.default_rng(self.seed + epoch).permutation(self.indices)
        return np.searchsorted(self.indices, order)

    def _epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's order and draws, uploaded once (each step slices them: no host-to-device copy)."""
        pos = self.order(epoch)
        i = self.indices[pos]
        plan = {"pos": pos}
        if self.views is not None:
            chosen = choose_view(self.seed, epoch, i, self.views.shape[1])
            plan.update(params=self.views[i, chosen], view=chosen)
        elif self.crop_flip:
            plan["draws"] = np.stack(draw(self.seed, epoch, i))
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in plan.items()}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        plan = self._epoch(epoch)
        for start in range(0, len(self.indices), self.batch_size):
            part = slice(start, start + self.batch_size)
            pos = plan["pos"][part]
            # index_select: the gathers of `images[pos]`, without Python's advanced-indexing work per step
            x = self.images.index_select(0, pos).permute(0, 3, 1, 2).float()  # what Batches' .float() gives
            view = None
            if self.views is not None:
                x, view = apply_view(x, plan["params"][part]), plan["view"][part]
            elif self.crop_flip:
                dy, dx, flip = plan["draws"][:, part]
                x = crop_flip(x, dy, dx, flip.bool())
            if self.normalised:
                x = self.normalise(x)
            yield x, self.labels.index_select(0, pos), self.index.index_select(0, pos), view

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw float pixels -> the network's input, in place (x must be the caller's own tensor)."""
        return x.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)




def make_batches(info: DatasetInfo, *, path: str = "auto", distributed: bool = False,
                 indices: Sequence[int] | None = None, **options) -> Batches | ResidentBatches:
    """The batches of `info` (Batches' arguments) by `path`: "resident" on the device, "ffcv" through
    FFCV's loader, "auto" resident whenever that may be (`fits`, one process), else FFCV."""
    from .errors import UserError
    from .loader import Batches

    if path not in DATA_PATHS:
        raise UserError(f"--data-path must be one of {', '.join(DATA_PATHS)}, got {path!r}")
    count = info.size if indices is None else len(indices)
    may = fits(info, count) and not distributed
    if path == "resident" and not may:
        raise UserError(f"--data-path resident needs images of {RESIDENT_MAX_SIDE} px or less whose "
                        f"{resident_bytes(info, count) / 2 ** 30:.1f} GiB fit "
                        f"{RESIDENT_BUDGET_BYTES / 2 ** 30:.0f} GiB, "
                        "in one process: use --data-path ffcv (or auto)")
    if path == "ffcv" or not may:
        return Batches(info, distributed=distributed, indices=indices, **options)
    return ResidentBatches(info, indices=indices, **options)
