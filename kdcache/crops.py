"""Random-resized crops for image folders, drawn per sample from (seed, epoch, sample index) and cut by
FFCV's decoder from a table of boxes.

FFCV's RandomResizedCropRGBImageDecoder draws its boxes from an unseeded generator inside the decoder:
two runs with one seed saw other pixels, and a stored view could not be replayed. Here the box (drawn as
torchvision's RandomResizedCrop draws it, on the stored image's own height and width) and the flip are
drawn on the host for a whole epoch at once, written into a table, and FFCV's decoder (`table_decoder`)
cuts each sample's box from the decoded image in its own threads with its own resize (what its random
crop does with a random box), then mirrors it where flipped. A box is kept as normalised coordinates in
uint16 (1/65535 of a side, as FKD keeps its boxes compactly; they map back to the drawn pixels exactly),
so a stored view and a training crop are made by the same code from the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .errors import UserError
from .rng import uniforms

SCALE = (0.08, 1.0)        # torchvision RandomResizedCrop's defaults: area fraction ...
RATIO = (3 / 4, 4 / 3)     # ... and aspect ratio (width / height), drawn log-uniform
ATTEMPTS = 10              # torchvision's tries before its fallback (the whole image, ratio clamped)
UNIT = 65535               # a normalised coordinate v in [0, 1] is stored as round(v * UNIT), uint16
PARAMS = 5                 # a crop: (y0, x0, y1, x1, flip), uint16
_VIEW_STREAMS = 1 << 40    # draw's epoch for stored view v is this + v: never a training epoch's


def recipe(size: int, side: int) -> str:
    """The stored views' recipe, recorded as the store's `view_recipe`: what a replay must match. `size`:
    the side of the crops models see; `side`: the longest stored side of the images they are cut from (the
    same source converted at another --max-side gives other pixels for the same boxes); `resize=ffcv`: how a box
    is resized (FFCV's own resize, `table_decoder`)."""
    return (f"random-resized-crop-flip scale=({SCALE[0]:g},{SCALE[1]:g}) ratio=(3/4,4/3) size={size} from={side} "
            "resize=ffcv")


def view_recipe(info) -> str:
    """What a stored view of this data (a DatasetInfo) is: small images' pad-4 crop + flip, image folders'
    random-resized crop + flip at the side models see."""
    from .augment import VIEW_RECIPE
    return VIEW_RECIPE if info.small else recipe(info.image_size, info.max_side)


def check_size(info) -> None:
    """Refuse (UserError) crops of an image folder (a DatasetInfo) larger than its stored images allow (their
    longest side is max_side: a larger crop would only enlarge pixels)."""
    if info.image_size > info.max_side:
        raise UserError(f"{info.path}: crops of {info.image_size} px are larger than its images allow (stored "
                        f"at {info.max_side} px at most): convert the data again with a larger --max-side "
                        "or a smaller --crop-side")


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
    shorter side), unflipped: the clean image, cut by `table_decoder` like every view."""
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    c = (ratio * np.minimum(height, width)).astype(np.int64)
    box = np.stack([(height - c) // 2, (width - c) // 2, c, c], axis=1)
    return encode(box, height, width, np.zeros(len(box), bool))


def image_sizes(beton: str) -> tuple[np.ndarray, np.ndarray]:
    """Every stored image's (heights, widths) in sample-index order, from the beton's metadata table. The
    crop tables are by beton position: kdcache's betons hold sample i at position i (`kdcache data`)."""
    from ffcv.reader import Reader

    meta = Reader(str(beton)).metadata
    if not np.array_equal(meta["f2"], np.arange(len(meta))):  # fields: f0 image, f1 label, f2 index
        raise UserError(f"{beton}: its samples are not stored in index order; convert it with kdcache data")
    return meta["f0"]["height"].astype(np.int64), meta["f0"]["width"].astype(np.int64)


def table_decoder(size: int, table: np.ndarray):
    """An FFCV decoder that decodes each stored image and cuts from it the crops `table` (beton positions,
    V, 5) uint16 holds for its sample (boxes and flips as `draw` makes them), each resized to `size` x
    `size` by FFCV's own resize (OpenCV's, what FFCV's random-resized crop uses) and
    mirrored where its flip is set: the one code that makes a crop's pixels, for the dump's teacher and
    the trainer's student alike. Output per sample: (size, size, 3) uint8 when V is 1, else (V, size,
    size, 3).

    The table is read while batches are decoded: numba compiles its address in, not its contents, so the
    loader refills it in place before each epoch (and never while an epoch is being decoded). It must
    stay alive and C-contiguous as long as the decoder is used."""
    import numba
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    assert table.dtype == np.uint16 and table.ndim == 3 and table.shape[2] == PARAMS and table.flags.c_contiguous
    n, views = table.shape[:2]

    @intrinsic
    def pointer(typingctx, address):  # an integer address as a pointer numba.carray can view
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.intp), codegen

    class TableCropDecoder(ResizedCropRGBImageDecoder):
        get_crop_generator = None  # the boxes come from the table

        def declare_state_and_memory(self, previous_state):
            state, (out, scratch) = super().declare_state_and_memory(previous_state)
            if views == 1:
                return state, (out, scratch)
            shape = (views, size, size, 3)
            return replace(state, shape=shape), (AllocationQuery(shape, out.dtype), scratch)

        def generate_code(self):
            jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            address, unit = table.ctypes.data, float(UNIT)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                boxes = numba.carray(pointer(address), (n, views, 5), np.uint16)
                out = destination.reshape(len(destination), views, size, size, 3)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        image = temp_storage[dst_ix]
                        imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    h, w = np.float64(height) / unit, np.float64(width) / unit
                    for v in range(views):
                        box = boxes[source_ix, v]  # normalised corners back to the drawn pixels (exact)
                        crop = out[dst_ix, v]
                        resize_crop_c(image, np.int64(box[0] * h + 0.5), np.int64(box[2] * h + 0.5),
                                      np.int64(box[1] * w + 0.5), np.int64(box[3] * w + 0.5), crop)
                        if box[4]:
                            last = size - 1
                            for r in range(size):
                                for c in range(size // 2):
                                    for ch in range(3):
                                        crop[r, c, ch], crop[r, last - c, ch] = crop[r, last - c, ch], crop[r, c, ch]
                return destination[:len(batch_indices)]
            decode.is_parallel = True
            return decode

    return TableCropDecoder((size, size))
