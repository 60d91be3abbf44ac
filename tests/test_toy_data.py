"""toy_data.py: the data set in the official format, exact ground truth, the held-out split, the metric on known
outputs."""

import os

import numpy as np
from PIL import Image

import data
import toy_data


def test_dataset_is_in_the_official_format(toy_dataset):
    """data.py reads the toy's data.txt files as any other: edits weighted, one <image> per reference, 32x32 PNGs."""
    for split, n in (("train", 36), ("test", 12)):
        records, bad = data.read_data_txt(os.path.join(toy_dataset, f"{split}.txt"))
        assert bad == 0
        copies = [r for r in records if r.instruction.startswith("copy")]
        assert len(records) - len(copies) == n and (split == "train") == bool(copies)
        for r in records:
            assert r.need_weight == any(r.instruction.startswith(w) for w in ("make", "remove", "add"))
            assert r.instruction.count("<image>") == len(r.images) - 1
            for p in r.images:
                img = Image.open(os.path.join(r.root, p))
                assert img.format == "PNG" and img.size == (toy_data.SIZE, toy_data.SIZE)
    copies, _ = data.read_data_txt(os.path.join(toy_dataset, "copy.txt"))  # the curriculum's first phase
    assert len(copies) == 30 and all(r.images[0] == r.images[1] for r in copies)  # 5 of 6 tasks have a reference
    assert {r.instruction for r in copies} == {"copy the image\n<image>"}
    mix = [os.path.basename(line.split(",")[1]) for line in open(os.path.join(toy_dataset, "mix.txt")).read().split()]
    assert sorted(mix) == sorted(f"train_{t}.json" for t in (*toy_data.TASKS, toy_data.COPY)
                                 for _ in range(toy_data.MIX.get(t, 1)))  # the recipe's mix: the lagging tasks twice


def test_ground_truth_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = toy_data.make_sample(rng, "recolor")
        ref, tgt = s["refs"][0], s["target"]
        _, _, old, kind, _, _, row, col, color = s["text"].split()  # "make the red circle at the top left blue"
        changed = (ref != tgt).any(-1)
        assert (tgt[changed] == toy_data.COLORS[color]).all() and changed.any()  # only the named shape, all of it
        assert (ref[changed] == toy_data.COLORS[old]).all()
        ys, xs = np.nonzero(changed)  # the named cell is the shape's
        assert abs(ys.mean() + 0.5 - toy_data.CELL[toy_data.ROWS.index(row)]) < 2.5
        assert abs(xs.mean() + 0.5 - toy_data.CELL[toy_data.COLS.index(col)]) < 2.5
        s = toy_data.make_sample(rng, "remove")
        changed = (s["refs"][0] != s["target"]).any(-1)
        assert (s["target"][changed] == s["target"][0, 0]).all()  # the removed shape becomes background
        assert len(np.unique(s["target"].reshape(-1, 3), axis=0)) == 2  # one shape of the two is left
        s = toy_data.make_sample(rng, "segment")
        assert set(np.unique(s["target"])) <= {0, 255} and (s["target"] == 255).any()
        changed = (s["refs"][0] != s["refs"][0][0, 0]).any(-1)
        assert not (s["target"][~changed] == 255).any()  # the mask lies inside the shapes


def test_edge_map_of_a_square():
    s = toy_data.Shape("square", "red", 1, 1, 15.5, 15.5, 4.0)
    e = toy_data.edge_map(toy_data.draw("black", [s])).mean(-1) > 0
    m = toy_data.shape_mask(s)
    assert e.sum() == 4 * (m.any(0).sum() - 1) and (e <= m).all()  # the inner boundary ring of the square


def test_dataset_is_deterministic_and_held_out_pairs_are_not_trained_on(toy_dataset, tmp_path):
    toy_data.make_dataset(str(tmp_path), n_train=36, n_test=12, seed=3)
    for split in ("train", "test"):
        a, b = toy_data.load_records(toy_dataset, split), toy_data.load_records(str(tmp_path), split)
        assert [r["text"] for r in a] == [r["text"] for r in b]
        assert all((x["target"] == y["target"]).all() for x, y in zip(a, b, strict=True))
    key = lambda r: (r["text"], r["target"].tobytes(), *(x.tobytes() for x in r["refs"]))
    held_out = {key(r) for r in toy_data.load_records(toy_dataset, "test")}
    assert not held_out & {key(r) for r in toy_data.load_records(toy_dataset, "train")}


def test_metrics_on_known_outputs():
    rng = np.random.default_rng(2)  # among the 3 pairs per task: two-shape recolors and a two-shape segment
    records = [toy_data.make_sample(rng, t) for t in toy_data.TASKS for _ in range(3)]
    perfect = toy_data.evaluate(records, [r["target"] for r in records], show=False)
    for task, row in perfect.items():
        assert row["success"] == 1.0 and row["psnr"] == float("inf"), task
    assert perfect["segment"]["iou"] == 1.0 and perfect["recolor"]["keep"] == 1.0
    assert perfect["remove"]["other"] == perfect["add"]["other"] == 1.0  # both always keep a shape
    same = toy_data.evaluate(records, [r["refs"][0] if r["refs"] else r["target"] for r in records], show=False)
    for task in ("recolor", "remove", "add"):
        assert same[task]["success"] == 0.0 and same[task]["keep"] == 1.0 and same[task]["other"] == 1.0
        assert same[task]["psnr"] == same[task]["base_psnr"] < 40
    blank = [np.zeros_like(r["target"]) for r in records]
    assert toy_data.evaluate(records, blank, show=False)["segment"]["iou"] == 0.0
    # acting on every shape: removal that clears the scene keeps no other shape; segmenting every shape marks both
    cleared = [np.broadcast_to(r["refs"][0][0, 0], r["target"].shape) if r["refs"] else r["target"] for r in records]
    assert toy_data.evaluate(records, cleared, show=False)["remove"]["other"] == 0.0
    everything = [np.where((r["refs"][0] != r["refs"][0][0, 0]).any(-1, keepdims=True), 255, 0).astype(np.uint8)
                  .repeat(3, -1) if r["task"] == "segment" else r["target"] for r in records]
    row = toy_data.evaluate(records, everything, show=False)["segment"]
    assert row["other"] == 0.0 and row["iou"] < 1.0


def test_psnr_and_palette_classification():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert abs(toy_data.psnr(a, b) - 10 * np.log10(255**2 / (255**2 / 48))) < 1e-9
    noisy = np.clip(np.array(toy_data.COLORS["blue"]) + 30, 0, 255).astype(np.uint8)[None, None]
    assert toy_data.classify(noisy)[0, 0] == list(toy_data.COLORS).index("blue")
