"""Why a toy model's drawn shapes fail: for text to image and add (the two tasks that draw a shape from words alone),
each failed held-out pair is put in the first class it fits.

    python bench/toy_failures.py FOLDER [FOLDER ...] [--data data/toy]
    python bench/toy_failures.py --ceiling

colour: fewer than 30% as many pixels of the named colour (outside the reference's shapes) as the target shape has;
place: their centroid more than 4 px (|dy| + |dx|) from the target shape's; size: their count outside 0.6-1.6x the
target's; kind: the best-fitting template (circle, square or triangle at that centroid, radius 3.3-5) is not the
named kind; form: the right colour, place, size and kind, but the outline or the rest of the picture is off.
`--ceiling`: no model; what the text-to-image metric gives a model that draws the named shape exactly as the data
does (another draw of the cell's jitter and radius, which the words do not say), and one that draws it centred in the
cell at radius 4.1 (the data's mean) or 5 (larger than any target).
FOLDER: a toy export (toy.py train's <run>/<stage>/ema, or assets/toy). The pairs are sampled with other noise seeds
than `toy.py eval` uses (42 + their index among these two tasks), so "ok" can differ from its table by a few points.
"""

import argparse
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import toy  # noqa: E402
import toy_data as T  # noqa: E402


def failure(r: dict, out: np.ndarray) -> str:
    """The class of one pair's output (see the module docstring), "ok" if it succeeds."""
    ref = r["refs"][0] if r["refs"] else None
    if T.score(r["task"], ref, r["target"], out)["success"]:
        return "ok"
    target, got = T.classify(r["target"]), T.classify(out)
    base = T.classify(ref) if ref is not None else np.full_like(target, target[0, 0])
    shape = target != base  # the drawn shape's pixels
    drawn = (got == np.bincount(target[shape]).argmax()) & (base == target[0, 0])
    if drawn.sum() < 0.3 * shape.sum():
        return "colour"
    (cy, cx), (gy, gx) = np.argwhere(shape).mean(0), np.argwhere(drawn).mean(0)
    if abs(cy - gy) + abs(cx - gx) > 4:
        return "place"
    if not 0.6 < drawn.sum() / shape.sum() < 1.6:
        return "size"
    iou = lambda m: (m & drawn).sum() / (m | drawn).sum()
    fits = [(iou(T.shape_mask(T.Shape(k, "red", 0, 0, gy + 0.5, gx + 0.5, rad))), k)
            for k in T.SHAPES for rad in np.linspace(3.3, 5, 8)]
    return "kind" if max(fits)[1] not in r["text"].split() else "form"


def ceiling(n: int = 300, seed: int = 0) -> None:
    """The text-to-image success of exact drawings (see --ceiling above), over n targets of each kind."""
    rng, rows = np.random.default_rng(seed), Counter()
    for i in range(3 * n):
        kind, cell, bg = T.SHAPES[i % 3], int(rng.integers(9)), str(rng.choice(list(T.BACKGROUNDS)))
        (row, col), target = divmod(cell, 3), T.draw(bg, [T._random_shape(rng, kind, "red", cell)])
        drawings = {"another draw": T._random_shape(rng, kind, "red", cell)}
        for r in (4.1, 5):
            drawings[f"centred, radius {r}"] = T.Shape(kind, "red", row, col, T.CELL[row], T.CELL[col], r)
        for name, s in drawings.items():
            rows[name, kind] += T.score("t2i", None, target, T.draw(bg, [s]))["success"] / n
    print("| drawing | " + " | ".join(T.SHAPES) + " |\n" + "|---" * 4 + "|")
    for name in dict.fromkeys(name for name, _ in rows):
        print(f"| {name} | " + " | ".join(f"{rows[name, k]:.0%}" for k in T.SHAPES) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*")
    p.add_argument("--data", default="data/toy")
    p.add_argument("--ceiling", action="store_true", help="the metric on exact drawings, no model (see above)")
    args = p.parse_args()
    if not (args.folders or args.ceiling):
        p.error("give one or more weights folders, or --ceiling")
    if args.ceiling:
        ceiling()
    if args.folders:
        records = [r for r in T.load_records(args.data, "test") if r["task"] in ("t2i", "add")]
        print("| model | task | pairs | ok | colour | place | size | kind | form |\n" + "|---" * 9 + "|")
        for folder in args.folders:
            model, encoders = toy.load_toy(folder)
            outs = toy.outputs(model, encoders, records, progress=False)
            for task in ("t2i", "add"):
                c = Counter(failure(r, o) for r, o in zip(records, outs, strict=True) if r["task"] == task)
                print(f"| {folder} | {task} | {sum(c.values())} | " + " | ".join(
                    str(c[k]) for k in ("ok", "colour", "place", "size", "kind", "form")) + " |", flush=True)
