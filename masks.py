"""Adaptive edit-region loss weighting (UniWorld-V1 paper §3.5; official univa/utils/get_mask.py).

An edit changes only part of the image, so a plain per-pixel MSE is dominated by the unchanged background and small
edits are learned slowly. Paper §3.5 finds the edited region from the pixel difference between reference and target and
multiplies the flow-matching loss by w(x) inside it, where x = A_total / A_edit grows as the edit shrinks. The official
trainer computes the weight map per sample in the CPU data loader, from the reference image(s) and the target at the
same size:

    1. difference   |ref - tgt| per channel -> PIL grayscale "L" -> edited where >= 18
    2. closing      with a 5x5 ellipse (fills holes, joins nearby strokes)
    3. cleaning     drop 8-connected components smaller than 30% of the foreground area
    4. references   with several, intersect their masks                                   -> edit_mask()
    5. area ratio   0: weight 1 everywhere (reconstruction); below 0.001: EditTooSmall (draw another sample)
    6. latent grid  max-pool 8x8 (the VAE factor), then close again with the 5x5 ellipse
    7. weights      w(x) on edited latent pixels, 1 elsewhere, x measured on the latent grid -> loss_weights()

The official code does steps 2-3 with OpenCV; here they are a few lines of numpy that give the same masks
(tests/test_masks.py checks against cv2). Sides that are not multiples of 8 behave like the official max_pool2d
(floor): steps 1-5 use every pixel, and the last H % 8 rows and W % 8 columns never reach the latent grid.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageChops

THRESHOLD = 18  # official: a pixel is edited if its grayscale difference is >= 18
MIN_COMPONENT = 0.3  # components below this fraction of the foreground are noise
MIN_RATIO = 0.001  # edits covering less of the image are rejected
VAE_FACTOR = 8

# The paper's four weightings of x = A_total / A_edit >= 1: each has w(1) = 1 and grows with x.
WEIGHTINGS = {
    "linear": lambda x: x,
    "exp": lambda x: 2 ** (math.sqrt(x) - 1),  # exponential root
    "log": lambda x: math.log2(x) + 1,  # logarithmic, the official default
    "quad": lambda x: (math.sqrt(x) - 1) ** 2 + 1,  # quadratic root
}


class EditTooSmall(ValueError):
    """The edit is too small to learn from; the official loader catches the ValueError and draws another sample."""


def _difference_mask(reference: Image.Image, target: Image.Image) -> np.ndarray:
    """Step 1: (H, W) bool, grayscale difference >= 18. PIL's own "L", as official: (19595 R + 38470 G + 7471 B +
    2**15) >> 16, i.e. 299/587/114 per mille in 16-bit fixed point, which rounds differently from
    (299 R + 587 G + 114 B) / 1000 on ties and near the threshold."""
    diff = ImageChops.difference(reference.convert("RGB"), target.convert("RGB")).convert("L")
    return np.asarray(diff) >= THRESHOLD


def _dilate(m: np.ndarray) -> np.ndarray:
    """Binary dilation by cv2's 5x5 MORPH_ELLIPSE, zero outside the image (cv2's default border for dilation):
        . . # . .
        # # # # #
        # # # # #
        # # # # #
        . . # . .
    """
    H, W = m.shape
    p = np.zeros((H + 4, W + 4), dtype=bool)
    p[2:-2, 2:-2] = m
    wide = p[:, :-4] | p[:, 1:-3] | p[:, 2:-2] | p[:, 3:-1] | p[:, 4:]  # (H + 4, W): OR over columns -2..2
    return wide[1:-3] | wide[2:-2] | wide[3:-1] | p[:-4, 2:-2] | p[4:, 2:-2]  # (H, W)


def _close(m: np.ndarray) -> np.ndarray:
    """Step 2: closing = dilation, then erosion, as cv2.morphologyEx(MORPH_CLOSE). Erosion is the complement of the
    dilated complement, whose zero padding is cv2's default "max" border for erosion: the image border never erodes."""
    return ~_dilate(~_dilate(m))


def _runs(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels as flat [start, end) positions in an (H, W + 1) grid, sorted (a spacer column
    at the end of each row keeps runs from wrapping into the next row)."""
    H, W = m.shape
    padded = np.zeros((H, W + 2), dtype=bool)
    padded[:, 1:-1] = m
    flips = np.flatnonzero(padded[:, 1:] != padded[:, :-1])  # starts and ends alternate
    return flips[0::2], flips[1::2]


def _label_runs(start: np.ndarray, end: np.ndarray, row: int) -> np.ndarray:
    """Component of each run (its smallest run index) under 8-connectivity, by a vectorised union-find. A run [s, e)
    touches a run [s', e') of the next row iff s' <= e and e' >= s (diagonal steps count); those runs form one
    contiguous slice [lo, hi) of the sorted runs, found by binary search one row (`row` positions) down."""
    lo = np.searchsorted(end, start + row, side="left")
    hi = np.searchsorted(start, end + row, side="right")
    count = hi - lo  # (n,) touching runs below each run
    a = np.repeat(np.arange(len(start)), count)  # (E,) edges a - b
    b = np.arange(count.sum()) + np.repeat(lo - (np.cumsum(count) - count), count)
    parent = np.arange(len(start))  # each run points at a run of smaller or equal index; roots point at themselves
    while True:
        ra, rb = parent[a], parent[b]  # roots, since parent is fully compressed
        merge = ra != rb
        if not merge.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[merge], np.minimum(ra, rb)[merge])  # hook larger root under smaller
        while not np.array_equal(grand := parent[parent], parent):  # pointer jumping until all point at a root
            parent = grand


def _drop_small_components(m: np.ndarray) -> np.ndarray:
    """Step 3: remove 8-connected components smaller than 30% of the foreground area (not of the image)."""
    H, W = m.shape
    start, end = _runs(m)
    root = _label_runs(start, end, W + 1)
    length = end - start
    keep = np.bincount(root, weights=length)[root] >= MIN_COMPONENT * length.sum()  # (n,) component area per run
    if keep.all():
        return m
    # Rebuild from the kept runs: the flat grid alternates background and run segments.
    bounds = np.concatenate([[0], np.stack([start, end], axis=1).ravel(), [H * (W + 1)]])
    value = np.zeros(len(bounds) - 1, dtype=bool)
    value[1::2] = keep
    return np.repeat(value, np.diff(bounds)).reshape(H, W + 1)[:, :W]


def edit_mask(references: list[Image.Image], target: Image.Image) -> np.ndarray:
    """Steps 1-4: the edited pixels of `target` as an (H, W) bool array, intersected over the reference images."""
    if isinstance(references, Image.Image):
        raise ValueError("references must be a list of images; wrap a single reference as [reference]")
    if not references:
        raise ValueError("edit_mask needs at least one reference image (a text-to-image sample has no edit region)")
    for i, ref in enumerate(references):
        if ref.size != target.size:
            raise ValueError(f"reference {i} is {ref.size[0]}x{ref.size[1]} but the target is {target.size[0]}x"
                             f"{target.size[1]}; resize the references to the target size first, as the official "
                             "data loader does")
    per_reference = [_drop_small_components(_close(_difference_mask(ref, target))) for ref in references]
    return np.logical_and.reduce(per_reference)


def _to_latent_grid(m: np.ndarray, factor: int = VAE_FACTOR) -> np.ndarray:
    """Step 6: (H, W) -> (H // f, W // f): max-pool with kernel = stride = f (floor, like F.max_pool2d), close again.
    f = `factor`, the autoencoder's downsampling: 8 for FLUX's VAE (official), 2 for a pixel-space stand-in."""
    h, w = m.shape[0] // factor, m.shape[1] // factor
    rows = m[: h * factor, : w * factor].reshape(h, factor, w * factor).any(axis=1)
    return _close(rows.reshape(h, w, factor).any(axis=2))


def loss_weights(references: list[Image.Image], target: Image.Image, kind: str = "log", need_weight: bool = True,
                 factor: int = VAE_FACTOR) -> torch.Tensor:
    """Paper §3.5 loss weights per latent pixel, (1, H // factor, W // factor) float32: w(A_total / A_edit) on the edit.
    `references` is empty for text-to-image; `need_weight` is the per-dataset switch (3rd column of data.txt); kind
    "none" keeps every weight at 1. Raises EditTooSmall when the edit covers under 0.1% of the image."""
    if kind not in WEIGHTINGS and kind != "none":
        raise ValueError(f"unknown weighting kind {kind!r}; choose one of {sorted(WEIGHTINGS)} or 'none'")
    W, H = target.size
    if H < factor or W < factor:
        raise ValueError(f"the target is {W}x{H}; it needs at least {factor}x{factor} pixels (one latent pixel)")
    ones = torch.ones(1, H // factor, W // factor)
    if not references or not need_weight:
        return ones  # text-to-image, or a dataset without edit weighting: plain MSE
    mask = edit_mask(references, target)
    ratio = np.count_nonzero(mask) / mask.size
    if ratio == 0:
        return ones  # reconstruction: nothing changed
    if ratio < MIN_RATIO:
        raise EditTooSmall(f"the edit covers {ratio:.1e} of the image, under {MIN_RATIO}; draw another sample")
    latent = _to_latent_grid(mask, factor)
    if not latent.any():
        raise EditTooSmall(f"the edit lies only in the last {H % factor} rows or {W % factor} columns, outside the "
                           "latent grid")
    if kind == "none":
        return ones  # the same samples as with a weighting, all weighted 1: the ablation baseline
    w = round(WEIGHTINGS[kind](latent.size / latent.sum()), 6)  # official rounds to 6 decimals
    return torch.where(torch.from_numpy(latent), w, 1.0).float()[None]
