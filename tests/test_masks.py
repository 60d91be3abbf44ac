"""masks.py against the official OpenCV pipeline, on random pairs and on hand-made cases."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops

import masks
from masks import WEIGHTINGS, EditTooSmall, edit_mask, loss_weights

ELLIPSE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def opencv_close(m: np.ndarray) -> np.ndarray:
    return cv2.morphologyEx(m.astype(np.uint8) * 255, cv2.MORPH_CLOSE, ELLIPSE) > 0


def opencv_drop_small(m: np.ndarray) -> np.ndarray:
    _, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)  # much faster than ...WithStats
    small = np.bincount(labels.ravel()) < 0.3 * m.sum()
    small[0] = False  # label 0 is the background
    return m & ~small[labels]


def opencv_edit_mask(references, target):
    """Steps 1-4 as the official get_mask does them, with OpenCV."""
    pixel = []
    for ref in references:
        diff = np.asarray(ImageChops.difference(ref, target).convert("L"))
        pixel.append(opencv_drop_small(opencv_close(diff >= 18)))
    return np.logical_and.reduce(pixel)


def opencv_pipeline(references, target, kind="log", factor=8):
    """The official steps 1-7 with OpenCV and F.max_pool2d: (pixel mask, latent mask or None, weights)."""
    mask = opencv_edit_mask(references, target)
    ratio = mask.sum() / mask.size
    if ratio == 0:
        return mask, None, torch.ones(1, mask.shape[0] // factor, mask.shape[1] // factor)
    if ratio < 0.001:
        raise EditTooSmall
    pooled = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None], kernel_size=factor, stride=factor)[0]
    latent = opencv_close(pooled.numpy() > 0)
    w = round(WEIGHTINGS[kind](latent.size / latent.sum()), 6)
    return mask, latent, torch.where(torch.from_numpy(latent), w, 1.0)[None]


def random_pair(rng: np.random.Generator, n_refs: int = 1):
    """A random target and references: rectangles and blobs with diffs around the threshold, specks, faint noise."""
    H, W = rng.integers(40, 300, size=2)
    base = rng.integers(0, 256, (H, W, 3)).astype(np.int16)
    yy, xx = np.mgrid[:H, :W]

    def edited(image):
        out = image + rng.integers(-4, 5, image.shape)  # faint noise, below the threshold
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(0, H), rng.integers(0, W)
            h, w = H ** rng.uniform(0.2, 1), W ** rng.uniform(0.2, 1)  # log-uniform: small and large edits
            if rng.random() < 0.5:
                region = (abs(yy - y) < h / 2) & (abs(xx - x) < w / 2)
            else:
                region = ((yy - y) / (h / 2)) ** 2 + ((xx - x) / (w / 2)) ** 2 < 1
            out = np.where(region[..., None], out + rng.integers(-60, 61, image.shape), out)  # holes where small
        specks = rng.random((H, W)) < rng.choice([0, 1e-3, 1e-2])
        out[specks] += 80
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))

    target = edited(base)
    refs = [edited(base) if i else Image.fromarray(base.astype(np.uint8)) for i in range(n_refs)]
    return refs, target


def test_parity_with_opencv_on_random_pairs():
    """60 pairs of random sizes (some not multiples of 8), every third with two references."""
    rng = np.random.default_rng(0)
    exact_pixel = exact_latent = compared = 0
    for i in range(60):
        refs, target = random_pair(rng, n_refs=1 + (i % 3 == 2))
        try:
            want_mask, want_latent, want_w = opencv_pipeline(refs, target)
        except EditTooSmall:
            with pytest.raises(EditTooSmall):
                loss_weights(refs, target)
            continue
        got_mask, got_w = edit_mask(refs, target), loss_weights(refs, target)
        assert got_w.shape == want_w.shape and got_w.dtype == torch.float32
        compared += 1
        exact_pixel += np.array_equal(got_mask, want_mask)
        if want_latent is None:  # nothing edited
            assert torch.equal(got_w, want_w)
            exact_latent += 1
            continue
        got_latent = masks._to_latent_grid(got_mask)
        if np.array_equal(got_latent, want_latent):
            exact_latent += 1
            assert torch.equal(got_w, want_w)
        else:
            assert (got_latent & want_latent).sum() / (got_latent | want_latent).sum() >= 0.99
    assert compared >= 50
    assert exact_pixel >= 0.98 * compared and exact_latent >= 0.98 * compared


@pytest.mark.parametrize("density", [0.02, 0.2, 0.5, 0.8])
def test_closing_and_components_match_opencv_on_noise(density):
    """Dense noise stresses borders, diagonal (8-connected) joins and the union-find."""
    rng = np.random.default_rng(1)
    m = rng.random((97, 131)) < density
    assert np.array_equal(masks._close(m), opencv_close(m))
    assert np.array_equal(masks._drop_small_components(m), opencv_drop_small(m))


def test_winding_component_is_one_component():
    """A snake of rows joined alternately at the right and left ends: one component that merges across many runs."""
    snake = np.zeros((64, 64), dtype=bool)
    snake[::4] = True
    for r in range(0, 60, 4):
        snake[r : r + 4, -1 if r % 8 == 0 else 0] = True
    snake[40, 20:] = False  # cut it: the two pieces have 67% and 33% of the area, both kept
    assert np.array_equal(masks._drop_small_components(snake), snake)
    snake[24, 20:] = False  # now 43%, 23% (dropped) and 34%
    kept = masks._drop_small_components(snake)
    assert np.array_equal(kept, opencv_drop_small(snake)) and kept[:24].any() and not kept[28:40].any()


def pair(H, W, regions, specks=(), delta=(90, 90, 90)):
    """Reference = flat gray; target = reference with `regions` (y0, y1, x0, x1) and single-pixel `specks` changed."""
    ref = np.full((H, W, 3), 100, dtype=np.uint8)
    tgt = ref.copy()
    for y0, y1, x0, x1 in regions:
        tgt[y0:y1, x0:x1] += np.array(delta, dtype=np.uint8)
    for y, x in specks:
        tgt[y, x] = 250
    return Image.fromarray(ref), Image.fromarray(tgt)


def test_specks_are_removed_and_holes_filled():
    ref, tgt = pair(128, 128, [(20, 80, 20, 80)], specks=[(5, 120), (120, 5), (110, 110)])
    holed = np.asarray(tgt).copy()
    holed[40:42, 40:42] = holed[60, 30] = 100  # unchanged pixels inside the edit
    mask = edit_mask([ref], Image.fromarray(holed))
    expected = np.zeros((128, 128), dtype=bool)
    expected[20:80, 20:80] = True
    assert np.array_equal(mask, expected)


def test_thirty_percent_rule_keeps_or_drops_regions():
    ref, tgt = pair(128, 128, [(0, 60, 0, 60), (80, 120, 80, 120)])  # areas 3600 and 1600: 31% of the foreground
    assert edit_mask([ref], tgt)[100, 100]
    ref, tgt = pair(128, 128, [(0, 60, 0, 60), (90, 120, 90, 120)])  # 900 is 20%: dropped
    mask = edit_mask([ref], tgt)
    assert mask[30, 30] and not mask[100:].any()


def test_several_references_intersect():
    ref, tgt = pair(64, 64, [(0, 32, 0, 64)])  # the target changes the top half
    _, ref2 = pair(64, 64, [(0, 32, 0, 32)])  # a second reference that already has the top-left quarter of the edit
    expected = np.zeros((64, 64), dtype=bool)
    expected[:32, 32:] = True
    assert np.array_equal(edit_mask([ref, ref2], tgt), expected)
    assert not edit_mask([ref, tgt], tgt).any()  # a reference equal to the target leaves nothing


@pytest.mark.parametrize(
    "delta, edited",
    [((59, 0, 0), True), ((58, 0, 0), False), ((3, 11, 89), False), ((40, 4, 28), False), ((41, 4, 28), True)],
)
def test_grayscale_is_pil_fixed_point(delta, edited):
    """PIL's "L" is (19595 R + 38470 G + 7471 B + 2**15) >> 16: red 59 is gray 18 although 299 * 59 // 1000 = 17,
    and (3, 11, 89) is 17 although (299 * 3 + 587 * 11 + 114 * 89) / 1000 = 17.5 would round to 18."""
    ref, tgt = pair(64, 64, [(0, 32, 0, 32)], delta=delta)
    assert edit_mask([ref], tgt)[:32, :32].all() == edited and edit_mask([ref], tgt)[:32, :32].any() == edited


def test_known_weight_and_shape():
    ref, tgt = pair(64, 64, [(0, 32, 0, 32)])  # a quarter of the latent grid: x = 4
    w = loss_weights([ref], tgt)
    assert w.shape == (1, 8, 8) and w.dtype == torch.float32
    assert torch.equal(w[0, :4, :4], torch.full((4, 4), 3.0)) and (w.sum() == 16 * 3 + 48)
    ref, tgt = pair(70, 61, [(0, 32, 0, 32)])  # sides not multiples of 8: floor, like max_pool2d
    assert loss_weights([ref], tgt).shape == (1, 8, 7)


def test_uniform_weights_for_identical_t2i_and_unweighted():
    ref, tgt = pair(64, 80, [(0, 32, 0, 32)])
    for w in [loss_weights([tgt], tgt), loss_weights([], tgt), loss_weights([ref], tgt, need_weight=False)]:
        assert torch.equal(w, torch.ones(1, 8, 10))


def test_tiny_edit_is_rejected():
    ref, tgt = pair(256, 256, [(100, 106, 100, 106)])  # 36 / 65536 = 0.00055 < 0.001
    with pytest.raises(EditTooSmall, match="draw another"):
        loss_weights([ref], tgt)
    assert issubclass(EditTooSmall, ValueError)  # what the official loader catches
    ref, tgt = pair(70, 70, [(64, 70, 0, 70)])  # 8.6% of the image, but only in rows that max_pool2d drops
    with pytest.raises(EditTooSmall, match="outside the latent grid"):
        loss_weights([ref], tgt)


def test_user_errors():
    ref, tgt = pair(64, 64, [(0, 32, 0, 32)])
    with pytest.raises(ValueError, match="resize the references"):
        loss_weights([ref.resize((64, 48))], tgt)
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weights([ref], tgt, kind="cubic")
    with pytest.raises(ValueError, match="wrap a single reference"):
        loss_weights(ref, tgt)


@pytest.mark.parametrize("kind", sorted(WEIGHTINGS))
def test_weightings_start_at_one_and_increase(kind):
    w = WEIGHTINGS[kind]
    assert w(1) == 1
    xs = [1, 1.5, 2, 4, 16, 100, 1000]
    assert all(w(a) < w(b) for a, b in zip(xs[:-1], xs[1:], strict=True))
    ref, tgt = pair(64, 64, [(0, 32, 0, 32)])
    assert loss_weights([ref], tgt, kind=kind).max() == pytest.approx(w(4), abs=1e-6)


def test_other_latent_grids_and_no_weighting():
    """factor = the autoencoder's downsampling (the toy world's pixel AE: 2): the official steps on that grid;
    kind "none" keeps the same samples (same rejections) with every weight 1."""
    rng = np.random.default_rng(5)
    for _ in range(10):
        refs, tgt = random_pair(rng)
        try:
            _, _, expected = opencv_pipeline(refs, tgt, factor=2)
        except EditTooSmall:
            with pytest.raises(EditTooSmall):
                loss_weights(refs, tgt, factor=2)
            with pytest.raises(EditTooSmall):
                loss_weights(refs, tgt, kind="none", factor=2)
            continue
        assert torch.equal(loss_weights(refs, tgt, factor=2), expected.float())
        assert torch.equal(loss_weights(refs, tgt, kind="none", factor=2), torch.ones_like(expected))
