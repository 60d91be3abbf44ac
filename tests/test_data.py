"""data.py: the official annotation format, EXIF and colour handling, bad data skipped and counted, same-size
batches that are deterministic per epoch, disjoint across ranks and resumable mid-epoch, and the encoder cache."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data as D

GRAY, RED, BLUE = (128, 128, 128), (220, 40, 40), (40, 70, 220)


def scene(shapes, size=(64, 64), background=GRAY) -> Image.Image:
    """Flat shapes on a flat background: ("circle" | "square", colour, (x, y)) with radius 10."""
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    for kind, color, (x, y) in shapes:
        (draw.ellipse if kind == "circle" else draw.rectangle)((x - 10, y - 10, x + 10, y + 10), fill=color)
    return im


def record(images, instruction: str) -> dict:
    """An official JSON record: the images (the last one the target), a human turn and the gpt turn <gen_image>."""
    return {"image": images, "conversations": [{"from": "human", "value": instruction},
                                               {"from": "gpt", "value": "<gen_image>"}]}


def make_dataset(root) -> str:
    """A tiny dataset in the official format; returns data.txt. 15 records: 3 malformed, and of the 12 valid ones
    5 are bad when loaded (records 1, 3, 5, 7, 8: missing, truncated, corrupt, 8x8 image, an edit too small to
    learn); 7 are good: 4 edits (0, 2, 4, 6: the last a reconstruction) and 3 text-to-image (9, 10, 11)."""
    img = os.path.join(root, "images")
    os.makedirs(img, exist_ok=True)
    save = lambda im, name, **kw: im.save(os.path.join(img, name), **kw) or name
    circle, blue = scene([("circle", RED, (20, 30))]), scene([("circle", BLUE, (20, 30))])
    save(circle, "ref.png")
    good = [record([save(circle, "e0_ref.png"), save(blue, "e0_tgt.png")], "Make the circle blue.\n<image>"),
            record([save(scene([("square", RED, (40, 40))]), "e1_ref.png"), save(scene([]), "e1_tgt.png")],
                   "Remove the square <image>"),
            record(["ref.png", save(scene([("circle", RED, (20, 30)), ("square", BLUE, (50, 20))]), "e2_tgt.png")],
                   "Add a blue square at the right. <image>"),
            record(["ref.png", "ref.png"], "Simply reconstruct the original image with no enhancements. <image>")]
    with open(os.path.join(img, "e0_tgt.png"), "rb") as f:
        png = f.read()
    with open(os.path.join(img, "truncated.png"), "wb") as f:
        f.write(png[: len(png) // 2])
    with open(os.path.join(img, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    speck = circle.copy()
    speck.putpixel((60, 60), BLUE)  # 1 pixel of 4096 changed: under masks.py's 0.1%, rejected
    blue_it = "Make the circle blue. <image>"
    bad = [record(["missing.png", "e0_tgt.png"], blue_it), record(["ref.png", "truncated.png"], blue_it),
           record(["corrupt.png", "e0_tgt.png"], blue_it),
           record(["ref.png", save(scene([], size=(8, 8)), "tiny.png")], blue_it),
           record(["ref.png", save(speck, "speck.png")], blue_it)]
    edits = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], bad[4],
             record(["ref.png", "e0_tgt.png"], "Two markers <image> <image>"),  # malformed: 3 markers, 2 images
             {"image": ["e0_tgt.png"]},  # malformed: no conversations
             record(["ref.png", "e0_tgt.png"], "no marker")]  # malformed: 1 marker for 2 images
    palette = scene([("square", BLUE, (30, 30))]).convert("P")  # colour modes other than RGB are converted
    t2i = [record(save(scene([("circle", RED, (32, 32))], background=(255, 255, 255)), "t0.png"),
                  "A red circle on a white background."),  # "image" as a str, not a list
           record(save(palette, "t1.png"), "A blue square."),
           record(save(exif_rotated(), "t2.jpg", exif=exif_rotated().getexif(), quality=95), "A tall red square.")]
    for name, recs in (("edit.json", edits), ("t2i.json", t2i)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(recs, f)
    with open(os.path.join(root, "data.txt"), "w") as f:
        f.write("images,edit.json,true\nimages,t2i.json,false\n")
    return os.path.join(root, "data.txt")


def exif_rotated() -> Image.Image:
    """Stored 80 wide x 60 high, red on the left; EXIF orientation 6: shown 60 wide x 80 high, red on top."""
    im = Image.new("RGB", (80, 60), BLUE)
    ImageDraw.Draw(im).rectangle((0, 0, 39, 59), fill=RED)
    im.getexif()[0x0112] = 6
    return im


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_records_are_read_and_malformed_ones_counted(data_txt):
    records, bad = D.read_data_txt(data_txt)
    assert (len(records), bad) == (12, 3)
    assert records[0].instruction == "Make the circle blue.\n<image>" and records[0].need_weight
    assert records[-1].images == ["t2.jpg"] and not records[-1].need_weight  # a str image becomes a list


def test_data_txt_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data.txt"):
        D.read_data_txt(str(tmp_path / "nope.txt"))
    (tmp_path / "d.txt").write_text("images,edit.json\n")
    with pytest.raises(ValueError, match="image_root,json_path,need_weight"):
        D.read_data_txt(str(tmp_path / "d.txt"))
    (tmp_path / "d.txt").write_text("images,edit.json,true\n")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        D.read_data_txt(str(tmp_path / "d.txt"))


def test_samples_bad_ones_skipped_counted_and_replaced(data_txt, caplog):
    ds = D.EditData(data_txt, resolution=64)
    assert list(ds.buckets) == [(64, 64)] and ds.bad_records == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):
        samples = [ds[i] for i in range(len(ds))]
    # a bad sample is replaced by the next good one of its bucket, and counted
    assert [s["index"] for s in samples] == [0, 2, 2, 4, 4, 6, 6, 9, 9, 9, 10, 11]
    assert [s["skipped"] for s in samples] == [0, 1, 0, 1, 0, 1, 0, 2, 1, 0, 0, 0]
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 6  # one line per skip
    for needle in ("under 0.001", "missing.png", "truncated.png", "corrupt.png", "smaller than 16 px"):
        assert any(needle in r for r in reasons), needle
    s = samples[0]
    assert s["pixels"].shape == (3, 64, 64) and -1 <= s["pixels"].min() and s["pixels"].max() <= 1
    assert s["weights"].shape == (1, 8, 8) and s["weights"].max() > 1  # an edit: weighted region
    assert (samples[6]["weights"] == 1).all()  # reconstruction: nothing changed
    assert (samples[9]["weights"] == 1).all() and samples[9]["references"] == []  # text to image
    assert len(samples[0]["references"]) == 1 and samples[0]["references"][0].mode == "RGB"


def test_first_samples_are_the_first_good_ones(data_txt):
    """train.py's validation prompts: bad samples passed over; --val_samples 0 loads none (not all of them)."""
    ds = D.EditData(data_txt, resolution=64)
    assert [s["index"] for s in ds.first_samples(3)] == [0, 2, 4] and ds.first_samples(0) == []


def test_exif_orientation_and_buckets(data_txt):
    ds = D.EditData(data_txt, resolution=64, buckets=True)
    assert ds.sizes[11] == (128, 96)  # shown 60x80 (portrait 3:4): the 3:4 bucket at anchor 64², scale at least 1
    assert ds.sizes[0] == (64, 64)
    s = ds.load_images(11)
    assert s["pixels"].shape == (3, 128, 96)
    top, bottom = s["pixels"][:, 10, 48], s["pixels"][:, 118, 48]
    assert top[0] > 0.5 > top[2] and bottom[2] > 0.5 > bottom[0]  # red on top after the EXIF rotation
    palette = ds.load_images(10)["pixels"]
    assert palette.shape == (3, 64, 64)


def test_too_much_bad_data_stops_with_a_clear_message():
    D.check_bad(3, 15, 0.5, "records", min_seen=0)
    with pytest.raises(D.TooMuchBadData, match=r"3 of 15 records \(20.0%\).*--max_bad"):
        D.check_bad(3, 15, 0.05, "records", min_seen=0)
    D.check_bad(5, 12, 0.05)  # too few samples seen to judge yet
    with pytest.raises(D.TooMuchBadData):
        D.check_bad(10, 100, 0.05)


def test_batches_same_size_deterministic_disjoint_and_resumable(data_txt):
    ds = D.EditData(data_txt, resolution=64, buckets=True)
    ds.load = lambda idx: {"index": idx, "size": torch.tensor(ds.sizes[idx])}  # no image decoding here
    ranks = [D.Batches(ds, batch_size=2, rank=r, world=2, seed=3) for r in range(2)]
    e0 = [b.epoch_batches(0) for b in ranks]
    assert e0 == [b.epoch_batches(0) for b in [D.Batches(ds, 2, r, 2, seed=3) for r in range(2)]]  # deterministic
    assert e0 != [b.epoch_batches(1) for b in ranks]  # reshuffled per epoch
    flat = [i for per_rank in e0 for batch in per_rank for i in batch]
    assert len(flat) == len(set(flat)) == 8 and len(e0[0]) == len(e0[1])  # disjoint; the lone 3:4 sample waits
    for per_rank in e0:
        assert all(len({ds.sizes[i] for i in batch}) == 1 and len(batch) == 2 for batch in per_rank)

    def take(batches, n):
        it = iter(batches)
        return [next(it)["index"] for _ in range(n)]

    full = take(D.Batches(ds, 2, 1, 2, seed=3), 7)  # 2 batches per rank per epoch: crosses 3 epoch boundaries
    first = D.Batches(ds, 2, 1, 2, seed=3)
    head = take(first, 3)
    resumed = D.Batches(ds, 2, 1, 2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert first.state_dict() == {"epoch": 1, "batch": 1}
    assert head + take(resumed, 4) == full
    with pytest.raises(ValueError, match="lower --batch_size"):
        D.Batches(ds, batch_size=8, world=2)


class FakeEncoders:
    """Stands in for model.Encoders: 'features' from the instruction, 'latents' from every 8th pixel."""

    class ae:
        encode = staticmethod(lambda pixels: pixels[:, :, ::8, ::8])

    def features(self, instructions, references):
        return [{"vlm": torch.full((len(t), 2), float(len(r)))} for t, r in zip(instructions, references, strict=True)]


@pytest.mark.parametrize("batch_size", [1, 3])  # 3: chunks of several samples, bad ones among them
def test_cache_gives_the_same_samples_and_checks_its_fingerprint(data_txt, tmp_path, batch_size):
    ds = D.EditData(data_txt, resolution=64)
    D.build_cache(ds, FakeEncoders(), "cpu", str(tmp_path / "cache"), {"v": 1}, batch_size)
    assert json.loads((tmp_path / "cache" / "meta.json").read_text()) == {"v": 1}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 7  # the good samples
    cached = [ds[i] for i in range(len(ds))]
    fresh = D.EditData(data_txt, resolution=64)
    for c, i in zip(cached, range(len(ds)), strict=True):
        f = fresh[i]
        assert (c["index"], c["skipped"], c["instruction"]) == (f["index"], f["skipped"], f["instruction"])
        assert torch.equal(c["latents"], f["pixels"][:, ::8, ::8]) and torch.equal(c["weights"], f["weights"])
        assert c["features"]["vlm"].shape == (len(f["instruction"]), 2)
    batch = D.encode(D.collate(cached[:2]), None, "cpu")  # cached batches need no encoder
    assert batch["latents"].shape == (2, 3, 8, 8) and len(batch["features"]) == 2
    with pytest.raises(ValueError, match="was built for"):
        D.build_cache(ds, FakeEncoders(), "cpu", str(tmp_path / "cache"), {"v": 2})


def test_to_pixels_range():
    x = D.to_pixels(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert x.shape == (3, 1, 1) and x.flatten().tolist() == pytest.approx([-1, 1, 128 / 127.5 - 1], abs=1e-6)
