"""The toy world's data: scenes of flat shapes, six tasks with exact ground truth, the data set in the official
format, and the per-pixel metric against that truth. NumPy only; toy.py trains and evaluates models on it."""

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 32  # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
          "cyan": (40, 200, 210), "magenta": (210, 50, 200), "orange": (245, 140, 30), "purple": (120, 50, 170)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL = (5.5, 15.5, 25.5)  # centres of the 3x3 placement cells; shapes never overlap (radius < 5)
TASKS = ("t2i", "recolor", "remove", "add", "segment", "edges")
COPY, COPY_EVERY = "copy", 5  # curriculum only (train.txt keeps one copy pair per 5 references; copy.txt has all)
MIX = {"t2i": 2, "add": 2, "edges": 2}  # mix.txt: each task's pairs this many times (1 if not named)
# every word of the instructions and of the chat template: the toy VLM's vocabulary
WORDS = sorted({*COLORS, *BACKGROUNDS, *SHAPES, *ROWS, *COLS, "a", "at", "the", "on", "make", "remove", "add",
                "segment", "detect", "edges", "background", "copy", "image", "user", "assistant"})

# ----------------------------------------------------------------------------------------------------------------
# Scenes and tasks, with exact ground truth


@dataclass
class Shape:
    kind: str
    color: str
    row: int  # cell
    col: int
    cy: float
    cx: float
    r: float


def shape_mask(s: Shape) -> np.ndarray:
    """(SIZE, SIZE) bool, sampled at pixel centres."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dy, dx = y - s.cy, x - s.cx
    if s.kind == "circle":
        return dy**2 + dx**2 <= s.r**2
    if s.kind == "square":
        return (np.abs(dy) <= 0.85 * s.r) & (np.abs(dx) <= 0.85 * s.r)
    return (dy <= 0.7 * s.r) & (dy >= -s.r) & (np.abs(dx) <= (dy + s.r) * 0.6)  # triangle, apex up


def draw(background: str, shapes: list[Shape]) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[background]
    for s in shapes:
        img[shape_mask(s)] = COLORS[s.color]
    return img


def edge_map(img: np.ndarray) -> np.ndarray:
    """White where a pixel differs from one of its 4 neighbours and is not background (inner boundary), else black."""
    p = np.pad(img.astype(int), ((1, 1), (1, 1), (0, 0)), mode="edge")
    diff = np.zeros(img.shape[:2], bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff |= (p[dy : dy + SIZE, dx : dx + SIZE] != img).any(-1)
    fg = (img != img[0, 0]).any(-1)  # the corner is always background
    return np.where((diff & fg)[..., None], 255, 0).astype(np.uint8).repeat(3, -1)


def _random_shape(rng: np.random.Generator, kind: str, color: str, cell: int) -> Shape:
    row, col = divmod(cell, 3)
    return Shape(kind, color, row, col, CELL[row] + rng.uniform(-1, 1), CELL[col] + rng.uniform(-1, 1),
                 rng.uniform(3.5, 4.75))


def _scene(rng: np.random.Generator, n: int) -> tuple[str, list[Shape]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    kinds = rng.choice(SHAPES, n, replace=False)
    colors = rng.choice(list(COLORS), n, replace=False)
    cells = rng.choice(9, n, replace=False)
    shapes = [_random_shape(rng, str(k), str(c), int(i)) for k, c, i in zip(kinds, colors, cells, strict=True)]
    return background, shapes


def make_sample(rng: np.random.Generator, task: str) -> dict:
    """One pair: instruction, reference images (0 or 1), target, and the number of shapes in the reference."""
    if task == "t2i":
        bg, (s,) = _scene(rng, 1)
        text = f"a {s.color} {s.kind} at the {ROWS[s.row]} {COLS[s.col]} on {bg}"
        return {"task": task, "text": text, "refs": [], "target": draw(bg, [s]), "shapes": 0}
    n = 2 if task == "remove" else int(rng.integers(1, 3))  # removal always leaves one shape behind
    bg, shapes = _scene(rng, n)
    ref, k = draw(bg, shapes), int(rng.integers(n))
    s = shapes[k]
    named = f"the {s.color} {s.kind} at the {ROWS[s.row]} {COLS[s.col]}"  # the cell too (docs/toy.md)
    if task == "recolor":
        new = str(rng.choice([c for c in COLORS if c != s.color]))
        text, target = f"make {named} {new}", draw(bg, shapes[:k] + [Shape(**{**vars(s), "color": new})]
                                                   + shapes[k + 1 :])
    elif task == "remove":
        text, target = f"remove {named}", draw(bg, shapes[:k] + shapes[k + 1 :])
    elif task == "add":
        shapes = shapes[:1]
        ref = draw(bg, shapes)
        kind = str(rng.choice([x for x in SHAPES if x != shapes[0].kind]))
        cell = int(rng.choice([c for c in range(9) if c != 3 * shapes[0].row + shapes[0].col]))
        new = _random_shape(rng, kind, str(rng.choice(list(COLORS))), cell)
        text = f"add a {new.color} {new.kind} at the {ROWS[new.row]} {COLS[new.col]}"
        target, n = draw(bg, shapes + [new]), 1
    elif task == "segment":
        text, target = f"segment {named}", np.where(shape_mask(s)[..., None], 255, 0).astype(np.uint8)
        target = target.repeat(3, -1)
    elif task == "edges":
        text, target = "detect the edges", edge_map(ref)
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return {"task": task, "text": text, "refs": [ref], "target": target, "shapes": n}


def make_dataset(root: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """root/images/{train,test}/*.png, a JSON per split and task, root/{train,test}.txt in the official data.txt
    format (edits weighted, paper §3.5), no test pair in training; copy.txt: all the curriculum's copy pairs."""
    held_out = set()
    for split, n, rng in (("test", n_test, np.random.default_rng([seed, 1])),
                          ("train", n_train, np.random.default_rng([seed, 0]))):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        records, i = {t: [] for t in TASKS}, 0
        while i < n:
            task = TASKS[i % len(TASKS)]
            s = make_sample(rng, task)
            key = hashlib.sha1(s["text"].encode() + b"".join(r.tobytes() for r in s["refs"] + [s["target"]])).digest()
            if split == "train" and key in held_out:
                continue  # a held-out pair: draw again
            if split == "test":
                held_out.add(key)
            names = [f"{split}/{i:06d}_ref{j}.png" for j in range(len(s["refs"]))] + [f"{split}/{i:06d}.png"]
            for name, img in zip(names, s["refs"] + [s["target"]], strict=True):
                Image.fromarray(img).save(os.path.join(root, "images", name))
            human = s["text"] + "".join("\n<image>" for _ in s["refs"])
            records[task].append({"image": names, "task": task, "shapes": s["shapes"], "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": "<gen_image>"}]})
            i += 1
        if split == "train":  # the curriculum's copies: target = reference, the pairs' own files (nothing written)
            copies = [{"image": [r["image"][0]] * 2, "task": COPY, "shapes": r["shapes"], "conversations": [
                {"from": "human", "value": "copy the image\n<image>"}, {"from": "gpt", "value": "<gen_image>"}]}
                for recs in records.values() for r in recs if len(r["image"]) == 2]
            records[COPY] = copies[::COPY_EVERY]
            path = os.path.abspath(os.path.join(root, "train_copy_all.json"))
            with open(path, "w") as f:
                json.dump(copies, f)
            with open(os.path.join(root, "copy.txt"), "w") as f:
                f.write(f"{os.path.abspath(os.path.join(root, 'images'))},{path},false\n")
        lines = []
        for task, recs in records.items():
            path = os.path.abspath(os.path.join(root, f"{split}_{task}.json"))
            with open(path, "w") as f:
                json.dump(recs, f)
            lines.append(f"{os.path.abspath(os.path.join(root, 'images'))},{path},"
                         f"{str(task in ('recolor', 'remove', 'add')).lower()}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        if split == "train":  # the recipe's mix: text to image, add and edges, the slowest to learn, twice as often
            with open(os.path.join(root, "mix.txt"), "w") as f:
                task_of = lambda line: os.path.basename(line.split(",")[1])[len("train_") : -len(".json")]
                f.write("\n".join(line for line in lines for _ in range(MIX.get(task_of(line), 1))) + "\n")


def load_records(root: str, split: str) -> list[dict]:
    """A split's records, images loaded: task, text (the human turn, <image> markers kept), refs, target, shapes."""
    out = []
    for line in open(os.path.join(root, f"{split}.txt")).read().split():
        image_root, path, _ = line.split(",")
        for r in json.load(open(path)):
            imgs = [np.asarray(Image.open(os.path.join(image_root, p)).convert("RGB")) for p in r["image"]]
            out.append({"task": r["task"], "shapes": r["shapes"], "refs": imgs[:-1], "target": imgs[-1],
                        "text": r["conversations"][0]["value"]})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: exact ground truth, judged per pixel by the nearest colour of the toy palette

PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)  # (11, 3)


def classify(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour."""
    return ((img[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1).argmin(-1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def score(task: str, ref: np.ndarray | None, target: np.ndarray, out: np.ndarray) -> dict:
    """Per-pair metrics, defined in docs/toy.md ("Reading the numbers"). Segment/edges: IoU of the white pixels
    (every channel > 127: a yellow or cyan shape left as it was is not white)."""
    m = {"psnr": psnr(out, target)}
    if task in ("segment", "edges"):
        a, b = (out > 127).all(-1), (target > 127).all(-1)
        m["iou"] = (a & b).sum() / max((a | b).sum(), 1)
        m["success"] = float(m["iou"] >= 0.7)
        if task == "segment" and (other := (classify(ref) != classify(ref)[0, 0]) & ~b).any():  # shapes not named
            m["other"] = 1 - a[other].mean()
        return m
    right = classify(out) == classify(target)
    if ref is None:  # text-to-image: the shape and the background
        fg = classify(target) != classify(target)[0, 0]
        m["success"] = float(right[fg].mean() >= 0.75 and right.mean() >= 0.9)
        return m
    changed = classify(ref) != classify(target)
    kept = ~changed
    others = kept & (classify(ref) != classify(ref)[0, 0])  # shapes that must stay as they were
    m["keep"] = right[kept].mean()
    if others.any():
        m["other"] = right[others].mean()
    m["success"] = float((right[changed].mean() if changed.any() else 1.0) >= 0.75 and right.mean() >= 0.9
                         and m.get("other", 1.0) >= 0.75)
    return m


def evaluate(records: list[dict], outputs: list[np.ndarray], show: bool = True) -> dict:
    """Per task: success rate, PSNR, kept fractions (all, other shapes), IoU, for the outputs and for "output = input".
    Removal is judged on two-shape scenes only (a one-shape removal is just "paint the background")."""
    rows = {}
    for task in TASKS:
        pairs = [(r, o) for r, o in zip(records, outputs, strict=True)
                 if r["task"] == task and (task != "remove" or r["shapes"] == 2)]
        if not pairs:
            continue
        mean = lambda ms, k: float(np.mean([m[k] for m in ms if k in m])) if any(k in m for m in ms) else math.nan
        ms = [score(task, r["refs"][0] if r["refs"] else None, r["target"], o) for r, o in pairs]
        bs = [score(task, r["refs"][0], r["target"], r["refs"][0]) for r, _ in pairs] if pairs[0][0]["refs"] else []
        rows[task] = {"n": len(pairs), **{k: mean(ms, k) for k in ("success", "psnr", "keep", "other", "iou")},
                      **{f"base_{k}": mean(bs, k) for k in ("success", "psnr", "keep", "other", "iou")}}
    if show:
        print(f"{'task':8} {'n':>4} {'success':>8} {'(input)':>8} {'PSNR':>6} {'(input)':>8} {'keep':>5} {'other':>5} "
              f"{'IoU':>5}")
        for t, r in rows.items():
            print(f"{t:8} {r['n']:4d} {r['success']:8.0%} {r['base_success']:8.0%} {r['psnr']:6.1f} "
                  f"{r['base_psnr']:8.1f} {r['keep']:5.2f} {r['other']:5.2f} {r['iou']:5.2f}")
    return rows
