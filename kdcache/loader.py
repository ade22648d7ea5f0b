"""FFCV loaders over a beton: batches of (normalised images, labels, sample indices) on a device."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from . import crops
from .augment import apply_view, choose_view, crop_flip, draw
from .beton import DatasetInfo


def _pipelines(augment: bool, size: int, small: bool, table: np.ndarray | None = None) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    from .beton import CROP_RATIO

    if small:  # augmented, if at all, on the device from seeded draws: kdcache.augment
        image = [SimpleRGBImageDecoder()]
    elif table is not None:  # image folders' crops, cut by FFCV's decoder from a table of seeded boxes
        image = [crops.table_decoder(size, table)]
        if table.shape[1] > 1:  # several crops per sample: (V, H, W, C) each, arranged by Batches
            return {"image": image + [ToTensor()], "label": [IntDecoder(), ToTensor()],
                    "index": [IntDecoder(), ToTensor()]}
    else:
        image = [CenterCropRGBImageDecoder((size, size), ratio=CROP_RATIO)]
    image += [ToTensor(), ToTorchImage(channels_last=True)]
    return {"image": image, "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]}


class Batches:
    """Iterate an FFCV loader; each batch is (images, labels, sample indices, views), normalised on
    `device` and copied out of FFCV's reused buffers, so a batch stays valid after the next one arrives.

    `train` means random order and augmentation (unless `augment` says otherwise); otherwise the
    samples come in index order, unaugmented, every one of them. Small images are augmented with
    `kdcache.augment` (crop + flip drawn from seed, epoch and sample index: reproducible); image folders
    with `kdcache.crops`' random-resized crop + flip, drawn the same way for a whole epoch and cut by
    FFCV's decoder (`crops.table_decoder`) in its threads.

    `views`, the (N, K, 3) view table of a multi-view cache, replaces the random crop: in each epoch a
    sample shows one of its K stored views (`augment.choose_view`), and the batch's fourth element says
    which (None without a table); an image folder's table holds `kdcache.crops` boxes. `normalise=False`
    gives the raw pixels, as floats, for `normalise`; `crops` (image folders: an (N, V, 5) table of
    `kdcache.crops` boxes by sample index) those V crops of each sample, (B, V, C, H, W), in index order
    (the dump's clean image and stored views)."""

    def __init__(self, info: DatasetInfo, *, batch_size: int, train: bool, device: torch.device | str = "cpu",
                 indices: Sequence[int] | None = None, seed: int = 0, distributed: bool = False,
                 num_workers: int = -1, augment: bool | None = None, views: np.ndarray | None = None,
                 normalise: bool = True, crops: np.ndarray | None = None):
        from ffcv.loader import Loader, OrderOption

        from .crops import PARAMS, check_size, image_sizes
        given = crops
        self.device = torch.device(device)
        self.size = info.image_size
        self.seed = seed
        augmenting = train if augment is None else augment
        self.crop_flip = info.small and augmenting
        self.views, self.normalised = views, normalise
        # image folders: the crops FFCV's decoder cuts, by beton position (= sample index): refilled before
        # each epoch from seeded draws or stored views, or given (`crops`)
        self.table = self.refill = None
        if not info.small and (augmenting or views is not None or given is not None):
            check_size(info)
            self.heights, self.widths = image_sizes(info.path)
            self.refill = given is None
            shape = (info.size, 1, PARAMS) if given is None else given.shape
            self.table = np.zeros(shape, np.uint16) if given is None else np.ascontiguousarray(given, np.uint16)
        if indices is not None:
            indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.selected = np.arange(info.size) if indices is None else indices
        self.loader = Loader(
            info.path, batch_size=batch_size, num_workers=num_workers,
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, seed=seed,
            indices=indices, distributed=distributed,
            # Never drop a partial batch: an epoch visits every selected sample exactly once (under
            # `distributed`, FFCV pads shorter shares with repeats, up to world - 1 of them; BatchNorm
            # in conv layers normalises over N*H*W, so even a last batch of one sample is fine).
            drop_last=False,
            pipelines=_pipelines(augmenting, self.size, info.small, self.table))
        self.mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def next_epoch(self) -> int:
        """The epoch the next iteration serves: FFCV's counter, which seeds its order (a resume sets it)."""
        return self.loader.next_epoch

    @next_epoch.setter
    def next_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        epoch = self.loader.next_epoch  # FFCV's counter (it seeds the order); restored on resume
        shown = self._fill(epoch) if self.refill else None  # before FFCV starts decoding this epoch
        for images, labels, index in self.loader:
            x = self._to_device(images, copy=False).float()  # .float() makes a fresh tensor
            i, view = index.numpy().ravel(), None
            if self.table is not None:  # image folders: cut by the decoder; several crops: (B, V, C, H, W)
                if x.dim() == 5:
                    x = x.permute(0, 1, 4, 2, 3)
                elif not self.refill:  # given crops: (B, V, C, H, W) whatever V
                    x = x.unsqueeze(1)
                if shown is not None:
                    view = shown[self._to_device(index.reshape(-1)).long()]
            elif self.views is not None:
                chosen = choose_view(self.seed, epoch, i, self.views.shape[1])
                x = apply_view(x, self._to_device(torch.from_numpy(self.views[i, chosen].astype(np.int32))))
                view = self._to_device(torch.from_numpy(chosen))
            elif self.crop_flip:
                dy, dx, flip = self._to_device(torch.from_numpy(np.stack(draw(self.seed, epoch, i))))
                x = crop_flip(x, dy, dx, flip.bool())
            if self.normalised:
                x = self.normalise(x)
            yield x, self._to_device(labels.reshape(-1)), self._to_device(index.reshape(-1)), view

    def _fill(self, epoch: int) -> torch.Tensor | None:
        """Write every selected sample's crop in `epoch` into the decoder's table (its seeded random-resized
        crop, or the stored view it shows), drawn for the whole epoch at once; return the (N,) views shown
        on the device (None without a view table)."""
        sel = self.selected
        if self.views is None:
            self.table[sel, 0] = crops.draw(self.seed, epoch, sel, self.heights[sel], self.widths[sel])
            return None
        chosen = choose_view(self.seed, epoch, sel, self.views.shape[1])
        self.table[sel, 0] = self.views[sel, chosen]
        shown = np.zeros(len(self.table), np.int64)
        shown[sel] = chosen
        return self._to_device(torch.from_numpy(shown))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw float pixels -> the network's input, in place (x must be the caller's own tensor)."""
        return x.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)

    def _to_device(self, t: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """A copy of `t` (FFCV reuses its buffers) on the device: `to_device`."""
        return to_device(t, self.device, copy=copy)


def staged(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A private copy of `t`, in pinned memory when `pin`: the only buffer an asynchronous copy reads."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    return out.copy_(t)


def to_device(t: torch.Tensor, device: torch.device, copy: bool = True) -> torch.Tensor:
    """`t` on `device`, never aliasing `t`'s storage once the caller's next batch arrives.

    To CUDA the copy is asynchronous (a plain copy from pageable memory waits for all queued GPU work,
    stalling the next step), so it must read a buffer nobody refills before the GPU has read it. FFCV
    1.0.2 already pins its output ring: `t.pin_memory()` would return that very ring slot, and the
    `non_blocking` copy would read it later, while FFCV's threads may be decoding a later batch into it
    (torn batches once the step is fast). So every batch is first copied on the host into a private
    pinned staging buffer (`staged`: a memcpy of a few hundred KB); PyTorch's caching host allocator
    records the copy's CUDA event on that block and hands it out again only after the copy completed,
    which gives one staging buffer per batch in flight, however many are."""
    if device.type == "cuda":
        return staged(t, pin=True).to(device, non_blocking=True)
    return t.to(device, copy=copy)
