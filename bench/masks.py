"""Time masks.py against the same pipeline built with OpenCV, on 1024x1024 pairs: python bench/masks.py"""

import sys
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, ahead of this file's own folder
from masks import edit_mask, loss_weights  # noqa: E402

ELLIPSE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def opencv_edit_mask(references, target):
    """The official get_mask steps 1-4 (difference, closing, components under 30% dropped, intersection), in cv2."""
    masks = []
    for ref in references:
        m = cv2.morphologyEx((np.asarray(ImageChops.difference(ref, target).convert("L")) >= 18).astype(np.uint8),
                             cv2.MORPH_CLOSE, ELLIPSE) > 0
        _, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        small = np.bincount(labels.ravel()) < 0.3 * m.sum()
        small[0] = False
        masks.append(m & ~small[labels])
    return np.logical_and.reduce(masks)


def opencv_pipeline(references, target):
    """Steps 1-7 (edit_mask, max-pool 8, close, log weight) as the official code runs them."""
    mask = opencv_edit_mask(references, target)
    pooled = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None], kernel_size=8, stride=8)[0].numpy() > 0
    latent = cv2.morphologyEx(pooled.astype(np.uint8), cv2.MORPH_CLOSE, ELLIPSE) > 0
    return torch.where(torch.from_numpy(latent), round(np.log2(latent.size / latent.sum()) + 1, 6), 1.0)[None]

CASES = {"object edit": 0.0, "object edit + 0.1% specks": 1e-3, "object edit + 1% specks": 1e-2}


def make_pair(speck_density: float, size: int = 1024, seed: int = 0):
    """A photo-like reference and a target with an elliptical object edit (15% of the image, with holes), a smaller
    rectangle edit, faint noise everywhere and bright specks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    ref = np.clip(128 + 60 * np.sin(6 * xx + 3 * yy)[..., None] + rng.integers(-20, 21, (size, size, 3)), 0, 255)
    tgt = ref + rng.integers(-4, 5, ref.shape)
    blob = ((yy - 0.45) / 0.25) ** 2 + ((xx - 0.5) / 0.19) ** 2 < 1
    rect = (abs(yy - 0.8) < 0.06) & (abs(xx - 0.2) < 0.08)
    tgt = np.where((blob | rect)[..., None], tgt + rng.integers(-60, 61, ref.shape), tgt)
    tgt[rng.random((size, size)) < speck_density] += 80
    to_image = lambda a: Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return [to_image(ref)], to_image(tgt)


def median_ms(fns, runs: int = 30) -> list[float]:
    """Median wall time of each function; they take turns so that load from other processes hits both alike."""
    times = [[] for _ in fns]
    for _ in range(runs + 1):  # the first round warms up
        for t, fn in zip(times, fns, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t[1:])) for t in times]


if __name__ == "__main__":
    print("1024x1024 pair, median of 30 runs, ms. OpenCV: cv2.morphologyEx + cv2.connectedComponents")
    print(f"{'':<26} {'loss_weights (steps 1-7)':^26} | {'edit_mask (steps 1-4)':^26}")
    print(f"{'case':<26} {'masks.py':>8} {'OpenCV':>8} {'ratio':>8} | {'masks.py':>8} {'OpenCV':>8} {'ratio':>8}")
    for name, density in CASES.items():
        refs, target = make_pair(density)
        fns = [loss_weights, opencv_pipeline, edit_mask, opencv_edit_mask]
        ours, theirs, ours_mask, theirs_mask = median_ms([partial(fn, refs, target) for fn in fns])
        print(
            f"{name:<26} {ours:8.2f} {theirs:8.2f} {ours / theirs:7.2f}x | "
            f"{ours_mask:8.2f} {theirs_mask:8.2f} {ours_mask / theirs_mask:7.2f}x"
        )
