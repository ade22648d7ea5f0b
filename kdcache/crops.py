"""Random-resized crops for image folders, drawn per sample from (seed, epoch, sample index) and made on
the device in one batched crop-and-resize.

FFCV's RandomResizedCropRGBImageDecoder draws its boxes from an unseeded generator inside the decoder:
two runs with one seed saw other pixels, and a stored view could not be replayed. Here FFCV only
decodes each stored image onto a fixed square canvas (`CanvasDecoder`: the whole image, resized to
max_side x max_side; no stored pixel is lost since the longest side already is max_side), and the crop
box (drawn as torchvision's RandomResizedCrop draws it, on the stored image's own height and width) is
cut out of the canvas and resized by `torchvision.ops.roi_align` for the whole batch at once. A box is
kept as normalised coordinates in uint16 (1/65535 of a side, as FKD keeps its boxes compactly), so a
stored view and a training crop are made by the same function from the same numbers: `apply_crop`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .rng import uniforms

SCALE = (0.08, 1.0)        # torchvision RandomResizedCrop's defaults: area fraction ...
RATIO = (3 / 4, 4 / 3)     # ... and aspect ratio (width / height), drawn log-uniform
ATTEMPTS = 10              # torchvision's tries before its fallback (the whole image, ratio clamped)
UNIT = 65535               # a normalised coordinate v in [0, 1] is stored as round(v * UNIT), uint16
PARAMS = 5                 # a crop: (y0, x0, y1, x1, flip), uint16
_VIEW_STREAMS = 1 << 40    # draw's epoch for stored view v is this + v: never a training epoch's


def recipe(size: int) -> str:
    """The stored views' recipe, recorded as the store's `view_recipe`: what a replay must match."""
    return f"random-resized-crop-flip scale=({SCALE[0]:g},{SCALE[1]:g}) ratio=(3/4,4/3) size={size}"


def view_recipe(info) -> str:
    """What a stored view of this data (a DatasetInfo) is: small images' pad-4 crop + flip, image folders'
    random-resized crop + flip at the side models see."""
    from .augment import VIEW_RECIPE
    return VIEW_RECIPE if info.small else recipe(info.image_size)


def boxes(u: np.ndarray, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(n, 4) int64 boxes (top, left, h, w) in pixels of images of these heights and widths, drawn as
    torchvision's RandomResizedCrop.get_params draws them from `u` (n, 2 * ATTEMPTS + 2) uniforms: per
    attempt a scale and a log-ratio; the first attempt that fits wins; else the centred fallback."""
    n = len(u)
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    area = (height * width).astype(np.float64)
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    h, w = np.zeros(n, np.int64), np.zeros(n, np.int64)
    found = np.zeros(n, bool)
    for a in range(ATTEMPTS):
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, 2 * a])
        aspect = np.exp(lo + (hi - lo) * u[:, 2 * a + 1])
        tw = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        th = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        take = ~found & (tw > 0) & (tw <= width) & (th > 0) & (th <= height)
        h[take], w[take] = th[take], tw[take]
        found |= take
    # a position uniform over the fitting ones (torchvision: randint(0, H - h + 1))
    top[found] = np.minimum((u[found, -2] * (height - h + 1)[found]).astype(np.int64), (height - h)[found])
    left[found] = np.minimum((u[found, -1] * (width - w + 1)[found]).astype(np.int64), (width - w)[found])
    miss = ~found
    if miss.any():  # the fallback: the largest centred box whose ratio is within RATIO
        H, W = height[miss], width[miss]
        ratio = W / H
        fh = np.where(ratio < RATIO[0], np.rint(W / RATIO[0]), np.where(ratio > RATIO[1], H, H)).astype(np.int64)
        fw = np.where(ratio < RATIO[0], W, np.where(ratio > RATIO[1], np.rint(H * RATIO[1]), W)).astype(np.int64)
        h[miss], w[miss] = fh, fw
        top[miss], left[miss] = (H - fh) // 2, (W - fw) // 2
    return np.stack([top, left, h, w], axis=1)


def encode(box: np.ndarray, height: np.ndarray, width: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """(n, 5) uint16 crop parameters: the pixel boxes (top, left, h, w) as normalised corners, and the flip."""
    height, width = np.asarray(height, np.float64), np.asarray(width, np.float64)
    corners = np.stack([box[:, 0] / height, box[:, 1] / width,
                        (box[:, 0] + box[:, 2]) / height, (box[:, 1] + box[:, 3]) / width], axis=1)
    out = np.empty((len(box), PARAMS), np.uint16)
    out[:, :4] = np.rint(np.clip(corners, 0, 1) * UNIT)
    out[:, 4] = flip
    return out


def draw(seed: int, epoch: int, index: np.ndarray, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(n, 5) uint16: each sample's random-resized crop and flip in `epoch`, a function of (seed, epoch,
    sample index) and the image's stored size only."""
    u = uniforms(seed, index, 2 * ATTEMPTS + 3, stream=epoch + 1)
    return encode(boxes(u[:, :-1], height, width), height, width, u[:, -1] < 0.5)


def view_params(seed: int, index: np.ndarray, views: int, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(n, K, 5) uint16: each sample's K stored views, a function of (seed, sample index, view) only."""
    return np.stack([draw(seed, _VIEW_STREAMS + v, index, height, width) for v in range(views)], axis=1)


def centre(height: np.ndarray, width: np.ndarray, ratio: float) -> np.ndarray:
    """(n, 5) uint16: the centre crop FFCV's CenterCropRGBImageDecoder takes (a square `ratio` of the
    shorter side), unflipped: the clean image, made by `apply_crop` like every view."""
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    c = (ratio * np.minimum(height, width)).astype(np.int64)
    box = np.stack([(height - c) // 2, (width - c) // 2, c, c], axis=1)
    return encode(box, height, width, np.zeros(len(box), bool))


def apply_crop(canvas: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """The crops (B, 5) `params` describe of the canvases (B, C, S, S) (raw float pixels), each resized to
    `size` x `size` and mirrored where its flip is set: the one function that makes a crop's pixels,
    for the dump's teacher and the trainer's student alike. roi_align averages ceil(box / size) samples
    per output pixel each way, so a large box is shrunk without aliasing."""
    from torchvision.ops import roi_align

    b, _, s, t = canvas.shape
    p = params.to(torch.float32)
    corners = p[:, :4] / UNIT
    rois = torch.stack([torch.arange(b, device=canvas.device, dtype=torch.float32),
                        corners[:, 1] * t, corners[:, 0] * s, corners[:, 3] * t, corners[:, 2] * s], dim=1)
    out = roi_align(canvas, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(params[:, 4].bool().view(-1, 1, 1, 1), out.flip(3), out)


def image_sizes(beton: str) -> tuple[np.ndarray, np.ndarray]:
    """Every stored image's (heights, widths) in sample-index order, from the beton's metadata table."""
    from ffcv.reader import Reader

    meta = Reader(str(beton)).metadata
    order = meta["f2"].astype(np.int64)  # fields: f0 image, f1 label, f2 index
    height, width = np.empty(len(meta), np.int64), np.empty(len(meta), np.int64)
    height[order], width[order] = meta["f0"]["height"], meta["f0"]["width"]
    return height, width


def full_image(height, width, _, __):
    """FFCV crop generator: the whole image (then resized onto the canvas)."""
    return 0, 0, height, width


def canvas_decoder(side: int):
    """An FFCV decoder that resizes each whole stored image onto a `side` x `side` canvas."""
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    class CanvasDecoder(ResizedCropRGBImageDecoder):
        def __init__(self, output_size):
            super().__init__(output_size)
            self.scale, self.ratio = None, 1.0

        @property
        def get_crop_generator(self):
            return full_image

    return CanvasDecoder((side, side))
