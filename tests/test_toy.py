"""toy.py: the structured toy encoders and inits, the pixel autoencoder, the showcase batch, the recipe."""

import json
import math
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import flux
import toy
import toy_data
from encoders import tiny_vlm


def test_toy_siglip_keeps_patch_content_rope_phase_and_position_code():
    siglip = toy.toy_siglip()
    img = np.zeros((toy_data.SIZE, toy_data.SIZE, 3), np.uint8)
    img[4:8, 8:12] = (255, 0, 0)  # the patch at row 1, column 2 of the 8x8 grid
    tokens = siglip([Image.fromarray(img)])[0]  # (64, 140)
    assert tokens.shape == (64, 48 + 28 + 64)
    red = tokens[:, :48].std(-1)
    assert red.argmax() == 1 * 8 + 2 and red.max() > 10 * red[0]  # only that token sees the red pixels
    code = tokens[:, 76:]  # the position one-hot, after the LayerNorm: token i's largest entry at channel i
    assert torch.equal(code.argmax(-1), torch.arange(64)) and (code.max(-1).values > 2 * code.abs().mean(-1) + 1).all()
    again = toy.toy_siglip().model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in siglip.model.state_dict().items())  # deterministic, every tensor
    c = toy.toy_flux_config()
    rows = toy.rope_sincos(torch.arange(8), c.axes_dim[1], c.theta).float()
    w = 1 / c.theta ** (torch.arange(0, c.axes_dim[1], 2) / c.axes_dim[1])
    assert torch.allclose(rows[3, 0::2], torch.cos(3 * w), atol=1e-6)  # the RoPE frequencies of the row axis


def test_toy_vlm_cell_words_carry_the_rope_phase_of_their_cell():
    """"top" meets, in phase, the RoPE-rotated rows of the top cell; "left" the columns of the left cell; other words
    keep tiny_vlm's random embeddings."""
    c, vlm = toy.toy_flux_config(), toy.toy_vlm()
    emb, ids = vlm.model.get_input_embeddings().weight, vlm.tokenizer.convert_tokens_to_ids
    rows = toy.rope_sincos(torch.arange(8), c.axes_dim[1], c.theta).float()  # (8, 14): [cos, sin](r w_k) of row r
    best = [1, 3, 6]  # the token rows nearest the cell centres 0.9, 3.4 and 5.9
    for words, start in ((toy_data.ROWS, 0), (toy_data.COLS, c.axes_dim[1])):
        for word, r in zip(words, best, strict=True):
            e = emb[ids(word)]
            assert not e[:start].any() and not e[start + 14 :].any()
            assert (rows @ e[start : start + 14]).argmax() == r  # sum_k cos((r - p) w_k): largest at the cell's row
    other = tiny_vlm(0, hidden=64, layers=2, words=toy_data.WORDS, pixels=56 * 56).model.get_input_embeddings().weight
    assert torch.equal(emb[ids("red")], other[ids("red")]) and not torch.equal(emb[ids("top")], other[ids("top")])


def test_flux_config_splits_each_head_like_flux():
    c = toy.toy_flux_config()
    assert (c.num_heads, c.axes_dim) == (3, (4, 14, 14))  # three heads of 32: 1/8 index, 7/16 rows, 7/16 columns
    assert toy.toy_flux_config(hidden=64, heads=1).axes_dim == (8, 28, 28)  # FLUX.1's (16, 56, 56) of 128, halved
    flux.Flux(toy.toy_flux_config(hidden=128, heads=4))  # a valid split at any width
    with pytest.raises(ValueError, match="multiple of 32"):
        toy.toy_flux_config(heads=4)  # heads of 16 cannot be split into even RoPE widths


def test_dit_init_makes_every_block_the_identity_and_the_output_zero():
    """Stage 0 from scratch (adaLN-Zero): zero gates, so each block passes its streams through; the velocity is 0,
    and the output layer, which must move first, gets a gradient."""
    torch.manual_seed(0)
    f = flux.Flux(toy.toy_flux_config())
    toy.dit_init(f)
    d = f.config.hidden_size
    img, txt, vec = torch.randn(2, 64, d), torch.randn(2, 10, d), torch.randn(2, d)  # 64 image tokens, 10 words
    pe = flux.rope(torch.zeros(2, 74, 3), f.config.axes_dim, f.config.theta)
    out = f.double_blocks[0](img, txt, vec, pe)
    assert torch.equal(out[0], img) and torch.equal(out[1], txt)
    x = torch.cat((txt, img), 1)
    assert torch.equal(f.single_blocks[0](x, vec, pe), x)
    v = f(torch.randn(2, 64, 48), flux.image_ids(16, 16), torch.randn(2, 10, 128), flux.text_ids(10), torch.rand(2),
          torch.zeros(2, 16), torch.ones(2))
    assert torch.equal(v, torch.zeros_like(v))
    (v - 1).pow(2).sum().backward()
    gates = [f.double_blocks[0].img_mod.lin.weight, f.single_blocks[1].modulation.lin.weight]
    assert all(p.grad.abs().sum() > 0 for p in [f.final_layer.linear.weight, f.final_layer.linear.bias])
    assert all(p.grad is not None for p in gates)  # zero until the output layer moves, but connected


def test_read_init_reads_each_tokens_own_position_from_the_start_and_probes_run_side_by_side(toy_dataset):
    """toy.read_init: at init, head 1 of the first double block puts most of its attention on the SigLIP token at
    each image token's own position (what the recipe's gate probes); probes in threads (toy.py seeds) each get what a
    probe alone gets, although a probe swaps flux.attention while it runs."""
    cfg = SimpleNamespace(flux="", seed=0, stage=0, siglip="siglip")
    model, encoders = toy.toy_models(cfg, "cpu")
    refs = [r["refs"][0] for r in toy_data.load_records(toy_dataset, "test") if r["refs"]][:4]
    alone = dict(toy.attention_probe(model, encoders, refs, sigma=0.5))
    assert list(alone) == ["d0", "d1", "s0", "s1"] and alone["d0"][1, 0] > 0.5 > alone["d0"][0, 0]
    assert max(row[:, 0].max() for name, row in alone.items() if name != "d0") < 0.1  # no other head reads it
    with ThreadPoolExecutor(3) as pool:
        side_by_side = list(pool.map(lambda _: dict(toy.attention_probe(model, encoders, refs, 0.5)), range(3)))
    assert all(torch.equal(p[k], alone[k]) for p in side_by_side for k in alone)


def test_pixel_autoencoder_round_trip_token_grid_and_folder(tmp_path):
    x = torch.rand(2, 3, toy_data.SIZE, toy_data.SIZE) * 2 - 1
    ae = flux.PixelUnshuffle(2)
    z = ae.encode(x)
    assert z.shape == (2, 12, 16, 16) and torch.equal(ae.decode(z), x)
    assert flux.pack(z).shape == (2, 64, toy.toy_flux_config().in_channels)  # one token per SigLIP token
    flux.save_autoencoder(ae, str(tmp_path / "vae"))  # a weights folder names it; load_autoencoder builds it
    again = flux.load_autoencoder(str(tmp_path))
    assert isinstance(again, flux.PixelUnshuffle) and again.factor == 2


def test_a_batch_file_of_held_out_pairs_scores_its_outputs_and_draws_the_showcase(toy_dataset, tmp_path):
    """write_batch -> (sample.py --batch) -> evaluate_batch: the targets as outputs score 100%, the references 0%
    on the edits; the grid has a row of two pairs (reference | output | target each) per two rows of the file."""
    path = str(tmp_path / "batch.jsonl")
    toy.write_batch(toy_dataset, path, 2)
    rows = [json.loads(line) for line in open(path)]
    assert [r["task"] for r in rows] == [t for t in toy_data.TASKS for _ in range(2)]
    for out, pick in (("targets", lambda r: r["target"]), ("inputs", lambda r: (r["images"] or [r["target"]])[0])):
        for r in rows:
            os.makedirs(tmp_path / out / r["task"], exist_ok=True)
            Image.open(tmp_path / pick(r)).save(tmp_path / out / f"{r['name']}.png")
    grid = str(tmp_path / "grid.png")
    perfect = toy.evaluate_batch(path, str(tmp_path / "targets"), show=False, grid=grid)
    assert all(row["success"] == 1.0 for row in perfect.values())
    assert Image.open(grid).size == (6 * toy_data.SIZE * 4, len(rows) // 2 * toy_data.SIZE * 4)
    unchanged = toy.evaluate_batch(path, str(tmp_path / "inputs"), show=False)
    assert all(unchanged[t]["success"] == 0.0 for t in ("recolor", "remove", "add"))


def test_recipe_through_train_py_learns_and_samples(tmp_path):
    """CI's shortened toy training: the four train.py runs of the recipe at 1% of their steps; the stage-0 loss
    falls, every stage exports a weights folder that sample.py loads like the release, and the held-out evaluation
    runs on it."""
    root, run = str(tmp_path / "data"), str(tmp_path / "run")
    toy_data.make_dataset(root, n_train=120, n_test=12, seed=0)
    toy.train(root, run, flags="--no-compile", scale=0.01, threads=1, read=0)  # compiling: longer than training
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "s0", "metrics.jsonl"))]  # every 50 steps
    steps = json.load(open(os.path.join(run, "s0", "train_config.json")))["steps"]
    assert len(losses) == -(-steps // 50) and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    for stage in ("s0-copy", "s0", "s1", "s2"):
        assert os.path.isfile(os.path.join(run, stage, "ema", "sample.json"))
    rows = toy.evaluate_folder(os.path.join(run, "s2", "ema"), root, show=False)
    assert set(rows) == set(toy_data.TASKS) and all(r["n"] == 2 for r in rows.values())
    import sample

    out = str(tmp_path / "edit.png")  # the weights folder's own example, size, steps and guidance (sample.json)
    sample.main(["--weights", os.path.join(run, "s2", "ema"), "--edit", "--out", out])
    assert Image.open(out).size == (toy_data.SIZE, toy_data.SIZE)


def test_a_focused_run_trains_on_its_tasks_and_the_copies_only(toy_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "RECIPE", ())  # the data selection only, no training
    toy.train(toy_dataset, str(tmp_path), tasks=["recolor"])
    records, _ = data.read_data_txt(str(tmp_path / "mix.txt"))
    assert {r.instruction.split()[0] for r in records} == {"make", "copy"}


def test_recipe_flags_and_seeds_reach_every_stage(tmp_path, monkeypatch):
    """--flags go to every stage after the recipe's own (argparse keeps the last), --scale scales steps and
    cool-down, and `toy.py seeds` runs the recipe once per seed and reports mean and range."""
    runs = []

    def fake_run(cmd, check, env, **streams):
        argv = cmd[3:]
        runs.append(argv)
        os.makedirs(os.path.join(argv[argv.index("--out") + 1], "ema"), exist_ok=True)

    monkeypatch.setattr(toy.subprocess, "run", fake_run)
    monkeypatch.setattr(toy, "save_toy", lambda folder: None)
    monkeypatch.setattr(toy, "reads_its_reference", lambda folder, data: 1.0)  # the read formed: no more copies
    scores = iter([0.9, 0.7, 0.8])
    monkeypatch.setattr(toy, "evaluate_folder", lambda folder, data, tasks=None, show=False: {
        "edges": {"success": next(scores), "iou": 0.8}})
    table = toy.seeds(str(tmp_path / "data"), str(tmp_path / "runs"), 3, flags="--batch_size 64", scale=0.5, jobs=1)
    assert [a[a.index("--out") + 1].rsplit("/", 2)[1:] for a in runs[:4]] == [["seed0", s] for s in
                                                                             ("s0-copy", "s0", "s1", "s2")]
    assert all(a.count("--batch_size") == 2 and a[a.index("--seed") + 1] == str(i // 4) for i, a in enumerate(runs))
    steps = [int(a[a.index("--steps") + 1]) for a in runs[:4]]
    assert steps == [int(f.split("--steps ")[1].split()[0]) // 2 for _, f in toy.RECIPE]
    assert table["edges"]["success"] == [0.9, 0.7, 0.8]


def test_seeds_run_side_by_side_each_into_its_own_log(tmp_path, monkeypatch):
    """toy.py seeds: the seeds' recipes run at once (each stage waits for the other seeds' first stage here), each
    train.py run's output in OUT/seedN.log; a failed seed says where to look."""
    meet, out = threading.Barrier(3, timeout=30), tmp_path / "runs"

    def fake_run(cmd, check, env, stdout, stderr):
        folder = cmd[cmd.index("--out") + 1]
        if folder.endswith("s0-copy"):
            meet.wait()  # breaks (and fails the test) unless all three seeds are in their copy stage at once
        print(f"train.py {cmd[cmd.index('--seed') + 1]}", file=stdout, flush=True)
        os.makedirs(os.path.join(folder, "ema"), exist_ok=True)

    monkeypatch.setattr(toy.subprocess, "run", fake_run)
    monkeypatch.setattr(toy, "save_toy", lambda folder: None)
    monkeypatch.setattr(toy, "reads_its_reference", lambda folder, data: 1.0)
    monkeypatch.setattr(toy, "evaluate_folder", lambda folder, data, tasks=None, show=False: {
        "t2i": {"success": 1.0, "iou": math.nan}})
    toy.seeds(str(tmp_path / "data"), str(out), 3)
    for seed in range(3):
        log = (out / f"seed{seed}.log").read_text()
        assert log.count(f"train.py {seed}") == len(toy.RECIPE) and "s0-copy: train.py" in log

    def broken(cmd, check, env, stdout, stderr):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(toy.subprocess, "run", broken)
    with pytest.raises(subprocess.CalledProcessError):
        toy.seeds(str(tmp_path / "data"), str(tmp_path / "broken"), 2)


def test_the_copy_stage_goes_on_until_the_reference_read_forms(tmp_path, monkeypatch):
    """The gate of the recipe: copies continue (--resume, 1,000 steps at a time) while the probe's strongest
    own-position read is under toy.READ, then the mix starts."""
    runs, reads = [], iter([0.1, 0.3, 0.7])

    def fake_run(cmd, check, env, **streams):
        runs.append(cmd[3:])
        os.makedirs(os.path.join(cmd[cmd.index("--out") + 1], "ema"), exist_ok=True)

    monkeypatch.setattr(toy.subprocess, "run", fake_run)
    monkeypatch.setattr(toy, "save_toy", lambda folder: None)
    monkeypatch.setattr(toy, "reads_its_reference", lambda folder, data: next(reads))
    toy.train(str(tmp_path / "data"), str(tmp_path / "run"))
    copies = [a for a in runs if a[a.index("--out") + 1].endswith("s0-copy")]
    assert [int(a[a.index("--steps") + 1]) for a in copies] == [1500, 2500, 3500]
    assert all("--resume" in a for a in copies) and len(runs) == 3 + 3  # then s0, s1, s2
