"""train.py under torchrun (2 ranks, gloo, tiny random models) on tests/test_data.py's small dataset with bad data:
stage 1, then stage 2 from it (exactly the stage's parameters change, the loss falls); a run killed while writing a
checkpoint and resumed, from the encoder cache, equals the uninterrupted uncached run bit for bit; plain
`python train.py` is a world of one; too much bad data stops a run with a clear message. Four torchrun launches and
one plain one: about 80 s on 2 cores."""

import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import data as D
import model as M
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# batch 1 per rank: 12 batches an epoch (6 per rank), so 8 steps cross an epoch; validation at the last step only
COMMON = ["--model", "tiny", "--resolution", "64", "--batch_size", "1", "--steps", "8", "--log_every", "1",
          "--ckpt_every", "3", "--val_every", "100", "--val_samples", "2", "--val_steps", "2", "--max_bad", "0.5",
          "--workers", "0"]


def torchrun(*args) -> str:
    """torchrun --nproc_per_node=2 train.py *args; fails the test with the end of its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, new_dataset):
    """Stage 1 for 8 steps, checkpoints every 3 steps, only the last kept."""
    root = tmp_path_factory.mktemp("train")
    data_txt = new_dataset(root / "data")
    torchrun(*COMMON, "--stage", "1", "--data", data_txt, "--out", str(root / "s1"), "--keep", "1")
    return root, data_txt


def metrics(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(folder) -> dict[str, torch.Tensor]:
    """A release export (what sample.py loads) back as UniWorld parameters."""
    return M.load_uniworld(str(folder), with_vlm=False)[0].state_dict()


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@functools.cache
def tiny_setup(stage: int, data_txt: str, buckets: bool):
    """A tiny model of the stage and every good sample of the data, encoded, one batch per bucket."""
    model, encoders = T.tiny_models(T.TrainConfig(stage=stage, model="tiny"), torch.device("cpu"))
    data, batches = D.EditData(data_txt, 64, buckets), []
    for members in data.buckets.values():
        samples = []
        for i in members:
            try:
                samples.append({**data.load_images(i), "skipped": 0})
            except D.BadSample:
                pass
        batch = encoders.encode(D.collate(samples), "cpu")
        batches.append({**batch, "pooled": torch.zeros(len(samples), 16)})
    return model, batches


def fixed_loss(stage: int, state: dict, data_txt: str, buckets: bool = False) -> float:
    """The loss on every good sample with fixed noise and sigmas (8 draws): the same batches before and after."""
    model, batches = tiny_setup(stage, data_txt, buckets)
    model.load_state_dict(state)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            for seed in range(8):
                total += model.loss(batch, torch.Generator().manual_seed(seed)).item() * len(batch["features"])
                count += len(batch["features"])
    return total / count


def initial(stage: int) -> dict:
    return T.tiny_models(T.TrainConfig(stage=stage, model="tiny"), torch.device("cpu"))[0].state_dict()


@pytest.mark.slow
def test_stage1_trains_the_projector_only_and_reports(runs):
    root, data_txt = runs
    run = root / "s1"
    log = metrics(run)
    assert [m["step"] for m in log] == list(range(1, 9)) and [m["epoch"] for m in log] == [0] * 6 + [1] * 2
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["lr"] == 1e-3 for m in log)
    assert all(m["samples_per_s"] > 0 and m["steps_per_s"] > 0 for m in log)
    assert log[-1]["bad_records"] == 3 and log[-1]["skipped"] > 0  # malformed records and bad files, counted
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000008"]  # --keep 1
    assert os.path.isfile(run / "val" / "step-00000008.png")
    before, raw, ema = initial(1), weights(run / "raw"), weights(run / "ema")
    projector = {k for k in before if k.startswith("denoise_projector.")}
    assert changed(before, raw) == projector == changed(before, ema)
    assert changed(raw, ema) == projector  # the EMA lags the raw weights
    assert fixed_loss(1, raw, data_txt) < fixed_loss(1, before, data_txt) - 1e-3


PAUSED = """import sys, time
sys.path.insert(0, {root!r})
import train
save = train.dcp.save

def paused(state, checkpoint_id):  # the tensors written, not yet the RNG states, the checksums or the rename
    save(state, checkpoint_id=checkpoint_id)
    if checkpoint_id.endswith("step-00000006"):
        print("checkpoint step 6: paused while writing", flush=True)
        time.sleep(600)

train.dcp.save = paused
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_mid_checkpoint_then_resumed_from_the_cache_equals_the_uninterrupted_run(runs):
    """Run B is run A (tests above) with --cache: it builds the cache, trains from it, and is SIGKILLed while
    writing the step-6 checkpoint. --resume must ignore the torn write, continue from step 3 and end bit for bit
    where A ended: weights, EMA, loss sequence (so data order, RNG states, optimizer and noise generator resume)."""
    root, data_txt = runs
    args = [*COMMON, "--stage", "1", "--data", data_txt, "--out", str(root / "b"), "--cache", str(root / "cache"),
            "--keep", "2"]
    script = root / "paused_train.py"  # train.py whose checkpoint write stops half-way at step 6
    script.write_text(PAUSED.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    paused = any("checkpoint step 6: paused while writing" in line for line in proc.stdout)  # stops at the pause?
    tasks = f"/proc/{proc.pid}/task"  # the ranks run in sessions of their own: kill them by pid, not only the group
    ranks = [int(pid) for tid in os.listdir(tasks) for pid in open(f"{tasks}/{tid}/children").read().split()]
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-write
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    watchdog.cancel()
    assert paused
    assert sorted(os.listdir(root / "b" / "checkpoints")) == [".tmp-step-00000006", "step-00000003"]
    assert os.path.isfile(root / "cache" / "meta.json")

    out = torchrun(*args, "--resume")
    assert "resumed from step 3" in out
    assert sorted(os.listdir(root / "b" / "checkpoints")) == ["step-00000006", "step-00000008"]
    a, b = metrics(root / "s1"), metrics(root / "b")
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-6, rel=0)
    assert [m["skipped"] for m in a] == [m["skipped"] for m in b]
    for kind in ("raw", "ema"):
        wa, wb = weights(root / "s1" / kind), weights(root / "b" / kind)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.slow
def test_stage2_from_stage1_trains_exactly_its_parameters(runs):
    root, data_txt = runs
    torchrun(*COMMON, "--stage", "2", "--init", str(root / "s1"), "--data", data_txt, "--out", str(root / "s2"),
             "--buckets", "--lr", "1e-3", "--warmup", "0", "--steps", "6")
    log = metrics(root / "s2")
    assert len(log) == 6 and all(math.isfinite(m["loss"]) for m in log)
    assert json.loads((root / "s2" / "train_config.json").read_text())["grad_ckpt"]  # stage 2: checkpointed blocks
    before = initial(2)
    before.update({k: v for k, v in weights(root / "s1" / "ema").items() if k.startswith("denoise_projector.")})
    raw = weights(root / "s2" / "raw")
    assert changed(before, raw) == {k for k in before if re.match(M.STAGES[2], k)}
    assert any(k.startswith("siglip_projector.") for k in changed(before, raw))
    assert fixed_loss(2, raw, data_txt, buckets=True) < fixed_loss(2, before, data_txt, buckets=True) - 1e-2


@pytest.mark.slow
def test_plain_python_is_a_world_of_one(runs, tmp_path):
    root, data_txt = runs
    cmd = [sys.executable, "train.py", *COMMON, "--data", data_txt, "--out", str(tmp_path / "run"), "--steps", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2] and "on 1 ranks" in out.stderr
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step-00000002"]
    assert os.path.isfile(tmp_path / "run" / "ema" / "model.safetensors.index.json")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert (state["world"], state["fsdp"]) == (1, False)  # one process in fp32: the plain module, not FSDP2


def test_a_plain_run_does_not_resume_an_fsdp_checkpoint(runs, tmp_path, monkeypatch, capsys):
    """The 2-rank FSDP2 checkpoint of the first run, resumed by one fp32 process: a clear error, nothing loaded."""
    root, data_txt = runs
    shutil.copytree(root / "s1" / "checkpoints", tmp_path / "run" / "checkpoints")
    world_of_one(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        T.main([*COMMON, "--stage", "1", "--data", data_txt, "--out", str(tmp_path / "run"), "--resume"])
    assert exit.value.code == 2
    assert "written by an FSDP2 run; resume it under torchrun or in bf16" in capsys.readouterr().err


def test_too_much_bad_data_stops_the_run(tmp_path, monkeypatch, capsys, new_dataset):
    data_txt = new_dataset(tmp_path / "data")  # 3 of 15 records malformed: 20%, over the default 5%
    world_of_one(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        T.main(["--model", "tiny", "--data", data_txt, "--out", str(tmp_path / "run")])
    assert exit.value.code == 2
    assert re.search(r"3 of 15 records \(20.0%\) were bad, over the limit of 5.0%", capsys.readouterr().err)
    assert not torch.distributed.is_initialized()


def world_of_one(monkeypatch) -> None:
    """torchrun's environment for one process on a free port, so that train.main runs in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))


def test_bf16_mixed_precision_stage2_with_validation(tmp_path, monkeypatch, data_txt):
    """The GPU recipe's FSDP2 bf16 policy, on the CPU: training, validation under the EMA, export (gloo, 1 rank)."""
    world_of_one(monkeypatch)
    out = tmp_path / "run"
    T.main([*COMMON, "--stage", "2", "--precision", "bf16", "--data", data_txt, "--out", str(out), "--steps", "2",
            "--val_every", "2"])
    assert all(math.isfinite(m["loss"]) for m in metrics(out)) and len(metrics(out)) == 2
    assert os.path.isfile(out / "val" / "step-00000002.png")


def test_qk_norm_lr_multiplies_the_learning_rate_of_the_qk_norm_scales(tmp_path, monkeypatch, data_txt):
    """--qk_norm_lr 0 freezes the q/k RMSNorm scales (its own optimizer group) while the rest of stage 2 learns."""
    world_of_one(monkeypatch)
    out = tmp_path / "run"
    T.main([*COMMON, "--stage", "2", "--data", data_txt, "--out", str(out), "--steps", "2", "--qk_norm_lr", "0",
            "--lr", "1e-3"])
    moved = changed(initial(2), weights(out / "raw"))
    qk = {n for n in initial(2) if n.endswith(("query_norm.scale", "key_norm.scale"))}
    assert qk and not moved & qk
    assert moved == {n for n in initial(2) if re.match(M.STAGES[2], n)} - qk


def test_config_stage_defaults_and_overrides():
    c1 = T.parse_args(["--data", "d.txt", "--out", "o"])
    assert (c1.stage, c1.lr, c1.warmup, c1.grad_ckpt, c1.beta2, c1.grad_clip) == (1, 1e-3, 0, False, 0.99, 1.0)
    c2 = T.parse_args(["--stage", "2", "--data", "d.txt", "--out", "o", "--warmup", "10", "--resume"])
    assert (c2.lr, c2.warmup, c2.grad_ckpt, c2.resume) == (5e-6, 10, True, True)
    assert T.parse_args(["--stage", "2", "--data", "d", "--out", "o", "--no-grad_ckpt"]).grad_ckpt is False
    assert [T.lr_at(s, c2) for s in (1, 5, 10, 20)] == pytest.approx([5e-7, 2.5e-6, 5e-6, 5e-6])
    c3 = T.parse_args(["--stage", "0", "--data", "d", "--out", "o", "--lr", "1e-3", "--steps", "100", "--decay", "40"])
    assert [T.lr_at(s, c3) for s in (1, 60, 61, 81, 100)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 2.5e-5])
    for bad in (["--out", "o"], ["--data", "d", "--out", "o", "--stage", "3"], ["--data", "d", "--out", "o",
                                                                                 "--model", "huge"]):
        with pytest.raises(SystemExit):
            T.parse_args(bad)


# ----------------------------------------------------------------------------------------------------------------
# nothing lost, nothing silent: damaged checkpoints, run folders, torn metrics, Ctrl-C


def small_run(out, data_txt, monkeypatch, *extra) -> None:
    """Stage 1 in this process (a world of one: the plain module), a checkpoint every 2 steps, all kept."""
    world_of_one(monkeypatch)
    T.main([*COMMON, "--data", data_txt, "--out", str(out), "--steps", "4", "--ckpt_every", "2", "--keep", "5",
            "--val_samples", "0", *extra])


def test_a_damaged_checkpoint_is_passed_over_and_said(tmp_path, monkeypatch, capsys, caplog, data_txt):
    caplog.set_level(logging.INFO, logger="train")
    run = tmp_path / "run"
    small_run(run, data_txt, monkeypatch)
    newest = run / "checkpoints" / "step-00000004"
    victim = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte on disk
    victim.write_bytes(bytes(data))
    caplog.clear()
    small_run(run, data_txt, monkeypatch, "--resume", "--steps", "6")
    assert "step-00000004 is damaged" in caplog.text and "resumed from step 2" in caplog.text
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 redone from step 2
    for ckpt in (run / "checkpoints").glob("step-*"):  # every checkpoint damaged: a clear stop, not a wrong resume
        (ckpt / "state.json").write_text("{garbage")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        small_run(run, data_txt, monkeypatch, "--resume", "--steps", "8")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("train.py: error: --resume: no intact checkpoint under")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_run_folder_is_never_overwritten_and_a_torn_metrics_line_is_dropped(tmp_path, monkeypatch, capsys, caplog,
                                                                                data_txt):
    run = tmp_path / "run"
    small_run(run, data_txt, monkeypatch)
    history = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:  # the same command again, without --resume
        small_run(run, data_txt, monkeypatch)
    assert exit.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == history  # 4 lines of history, untouched
    (run / "metrics.jsonl").write_text(history + '{"step": 5, "lo')  # a kill mid-write of a log line
    caplog.clear()
    small_run(run, data_txt, monkeypatch, "--resume", "--steps", "5")
    assert "dropped a torn line" in caplog.text and [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]
    small_run(run, data_txt, monkeypatch, "--overwrite", "--steps", "2")
    assert [m["step"] for m in metrics(run)] == [1, 2] and os.listdir(run / "checkpoints") == ["step-00000002"]


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_that_says_where_to_continue(tmp_path, data_txt):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *COMMON, "--data", data_txt, "--out", str(out), "--steps", "100000"]
    # SIGINT as from a terminal, also when the tests run in the background (`cmd &` ignores it, and children inherit)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "checkpoints").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # until the step-3 checkpoint exists
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(r"train.py: interrupted at step \d+; the last checkpoint is step-\d{8}; continue with "
                        r"--resume", last), last


def test_torn_weights_stop_the_run_in_one_line(runs, tmp_path, monkeypatch, capsys):
    """--init from a run whose exported weights were cut short: one line that names the file, no training."""
    root, data_txt = runs
    shutil.copytree(root / "s1", tmp_path / "s1", ignore=shutil.ignore_patterns("checkpoints"))
    shard = next((tmp_path / "s1" / "ema").glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4096])
    world_of_one(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        T.main([*COMMON, "--stage", "2", "--init", str(tmp_path / "s1"), "--data", data_txt, "--out",
                str(tmp_path / "s2")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit.value.code == 2 and "is not a readable safetensors file" in err and shard.name in err
    assert not (tmp_path / "s2" / "metrics.jsonl").exists()
