"""FFCV loaders over a beton: batches of (normalised images, labels, sample indices) on a device."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .beton import DatasetInfo


def _pipelines(augment: bool, size: int, small: bool) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToTensor, ToTorchImage

    from .beton import CROP_RATIO

    if small:
        image = [SimpleRGBImageDecoder()]
        if augment:  # random crop with 4 px zero padding + flip, the CIFAR standard (DeepCore)
            image += [RandomTranslate(padding=4), RandomHorizontalFlip()]
    elif augment:
        image = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
    else:
        image = [CenterCropRGBImageDecoder((size, size), ratio=CROP_RATIO)]
    image += [ToTensor(), ToTorchImage(channels_last=True)]
    return {"image": image, "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]}


class Batches:
    """Iterate an FFCV loader; each batch is normalised on `device` and copied out of FFCV's reused
    buffers, so a batch stays valid after the next one arrives.

    `train` means random order and augmentation (unless `augment` says otherwise); otherwise the
    samples come in index order, unaugmented, every one of them."""

    def __init__(self, info: DatasetInfo, *, batch_size: int, train: bool, device: torch.device | str = "cpu",
                 indices: Sequence[int] | None = None, seed: int = 0, distributed: bool = False,
                 num_workers: int = -1, augment: bool | None = None):
        from ffcv.loader import Loader, OrderOption

        self.device = torch.device(device)
        self.size = info.image_size
        if indices is not None:
            indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.loader = Loader(
            info.path, batch_size=batch_size, num_workers=num_workers,
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, seed=seed,
            indices=indices, distributed=distributed,
            # Never drop a partial batch: an epoch visits every selected sample exactly once (under
            # `distributed`, FFCV pads shorter shares with repeats, up to world - 1 of them; BatchNorm
            # in conv layers normalises over N*H*W, so even a last batch of one sample is fine).
            drop_last=False,
            pipelines=_pipelines(train if augment is None else augment, self.size, info.small))
        self.mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, index in self.loader:
            x = images.to(self.device, non_blocking=True).float()  # .float() makes a fresh tensor
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            yield (x, labels.reshape(-1).to(self.device, copy=True),
                   index.reshape(-1).to(self.device, copy=True))
