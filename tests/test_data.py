"""data.py: the official annotation format, EXIF and colour handling, bad data skipped and counted, same-size
batches that are deterministic per epoch, disjoint across ranks and resumable mid-epoch, and the encoder cache."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import data as D


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
    assert list(ds.buckets) == [(64, 64, 1), (64, 64, 0)] and ds.bad_records == 3  # edits, text to image
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):
        samples = [ds[i] for i in range(len(ds))]
    # a bad sample is replaced by the next good one of its bucket (same size, same number of references), counted
    assert [s["index"] for s in samples] == [0, 2, 2, 4, 4, 6, 6, 0, 0, 9, 10, 11]
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


def test_unreadable_json_files_and_odd_records_are_skipped_and_counted(tmp_path, caplog):
    """A JSON file cut in half, one that is not UTF-8, and a record whose "image" is a number: each skipped with a
    warning that names it, counted; the good file still read."""
    good = {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Make it red <image>"},
                                                           {"from": "gpt", "value": "<gen_image>"}]}
    (tmp_path / "good.json").write_text(json.dumps([good, {**good, "image": 5}]))
    (tmp_path / "cut.json").write_text(json.dumps([good] * 3)[:150])
    (tmp_path / "latin1.json").write_bytes(json.dumps([{**good, "note": "caf\u00e9"}], ensure_ascii=False)
                                           .encode("latin-1"))
    (tmp_path / "data.txt").write_text("\n".join(f"images,{n}.json,true" for n in ("good", "cut", "latin1")) + "\n")
    with caplog.at_level(logging.WARNING, logger="data"):
        records, bad = D.read_data_txt(str(tmp_path / "data.txt"))
    assert (len(records), bad) == (1, 3)
    assert "record 1 of" in caplog.text and "'image' must be a path" in caplog.text
    assert "cut.json" in caplog.text and "latin1.json" in caplog.text


def test_an_image_qwen_cannot_take_is_a_bad_sample(tmp_path):
    Image.new("RGB", (4020, 16)).save(tmp_path / "banner.png")  # aspect ratio 251: Qwen2.5-VL refuses it
    with pytest.raises(D.BadSample, match="banner.png.*aspect ratios up to 200"):
        D.open_image(str(tmp_path / "banner.png"))


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
    """Stands in for model.Encoders.encode: 'features' from the instruction, 'latents' from every 8th pixel."""

    def encode(self, batch, device):
        features = [{"vlm": torch.full((len(t), 2), float(len(r)))}
                    for t, r in zip(batch["instruction"], batch["references"], strict=True)]
        return {**batch, "features": features, "latents": batch["pixels"][:, :, ::8, ::8]}


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
    batch = D.collate(cached[:2])  # a cached batch is what the encoders would give: no encoder runs
    assert batch["latents"].shape == (2, 3, 8, 8) and len(batch["features"]) == 2
    with pytest.raises(ValueError, match="was built for"):
        D.build_cache(ds, FakeEncoders(), "cpu", str(tmp_path / "cache"), {"v": 2})


def test_two_runs_can_build_one_cache_at_once(data_txt, tmp_path, monkeypatch):
    """Seeds of one setting share a cache (toy.py); a second writer between the first's write and rename is fine."""
    ds, folder, replace = D.EditData(data_txt, resolution=64), tmp_path / "cache", D.os.replace
    sample = D.EditData(data_txt, resolution=64)[0]
    cached = {**{k: sample[k] for k in ("index", "instruction", "weights")}, "features": {"vlm": torch.ones(2, 2)},
              "latents": sample["pixels"][:, ::8, ::8]}
    path, others = D.cache_path(str(folder), 0), []

    def another_writer_first(src, dst):
        if not others:
            others.append(dst)
            D.write_cached(dst, cached)  # the other run writes and renames the same sample in between
        replace(src, dst)

    monkeypatch.setattr(D.os, "replace", another_writer_first)
    D.os.makedirs(D.os.path.dirname(path))
    D.write_cached(path, cached)
    monkeypatch.setattr(D.os, "replace", replace)
    assert others == [path] and D.read_cached(path)["instruction"] == sample["instruction"]
    assert not list(folder.rglob("*.tmp"))
    D.build_cache(ds, FakeEncoders(), "cpu", str(folder), {"v": 1})  # and the rest of the cache builds around it
    assert len(list(folder.rglob("*.safetensors"))) == 7


def test_any_11ratio_sizes():
    # docs/official.md §8.2, at the 1024² anchor, for landscape inputs (h x w)
    for (h, w), expected in {(768, 1024): (864, 1152), (1000, 1000): (1024, 1024), (600, 900): (832, 1248),
                             (720, 1280): (864, 1536), (800, 1000): (896, 1120)}.items():
        assert D.dynamic_resize(h, w) == expected
        assert D.dynamic_resize(w, h) == expected[::-1]  # portrait: the transpose
    assert D.dynamic_resize(480, 640, area=512 * 512) == (480, 640)  # 4:3 block 96x128, scale round(4.6) = 5
    assert D.dynamic_resize(9, 16, area=16) == (288, 512)  # below one 32-px block: one block, not 0
    for area in (256**2, 777**2, 1024**2, 1536**2):
        for h, w in ((3000, 2000), (512, 513), (100, 170), (17, 5)):
            assert all(s % 32 == 0 and s > 0 for s in D.dynamic_resize(h, w, area))


def test_to_pixels_range():
    x = D.to_pixels(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert x.shape == (3, 1, 1) and x.flatten().tolist() == pytest.approx([-1, 1, 128 / 127.5 - 1], abs=1e-6)
