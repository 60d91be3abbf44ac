"""Tests for ema.py: the sharded EMA against a plain single-process fp32 EMA written the official way."""

import copy
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ema import ShardedEMA, decay_at

DECAY = 0.3  # low, so that K updates pass both the (1+s)/(10+s) warm-up and the cap
K = 6  # updates per run; checkpoints are saved and resumed after K // 2


class Net(nn.Module):
    """Odd shapes so that FSDP2 and the flat partition split unevenly, plus frozen parameters."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)  # weight (5, 3): FSDP2 rows 3+2 on 2 ranks, flat slices 8+7
        self.frozen = nn.Linear(5, 7).requires_grad_(False)
        self.hidden = nn.Linear(7, 4)
        self.out = nn.Linear(4, 1)  # weight (1, 4): every rank but one holds an empty shard
        self.out.bias.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.out(self.hidden(self.frozen(self.inp(x)).relu()).relu()) * self.scale


def official_decay(optimization_step, decay=DECAY):
    """diffusers EMAModel.get_decay with update_after_step=0 and no warm-up, as the official trainer uses it."""
    step = max(0, optimization_step - 1)
    return 0.0 if step <= 0 else min(decay, (1 + step) / (10 + step))


def fake_optimizer_step(model, k):
    """An elementwise stand-in for optimizer step k: gives the same values on full replicas and on FSDP2 shards."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                t = p.to_local() if isinstance(p, DTensor) else p
                t.mul_(0.9).add_(torch.sin(3 * t + k))


def run_and_check(layout, ckpt_dir, save_to=None, load_from=None):
    """K updates of a ShardedEMA next to a plain EMA; checks export, memory, swap_into and DCP save/resume."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    if layout == "fsdp":
        for block in (model.hidden, model.out):
            fully_shard(block)
        fully_shard(model)  # the root group holds inp, frozen and scale; a forward leaves it unsharded
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    ema, resumed = ShardedEMA(model, decay=DECAY), None
    ref_ema = {n: p.detach().clone() for n, p in trainable.items()}
    for k in range(K):
        if k == K // 2 and save_to:
            dcp.save(ema.state_dict(), checkpoint_id=os.path.join(ckpt_dir, f"{save_to}_{layout}"))
        if k == K // 2 and load_from:
            resumed = ShardedEMA(model, decay=DECAY)
            sd = resumed.state_dict()
            dcp.load(sd, checkpoint_id=os.path.join(ckpt_dir, f"{load_from}_{layout}"))
            resumed.load_state_dict(sd)
            assert resumed.step == K // 2
        fake_optimizer_step(model, k)
        fake_optimizer_step(ref, k)
        ema.update(model)
        if resumed:
            resumed.update(model)
        d = official_decay(k + 1)
        for n, p in trainable.items():  # official: s -= (1 - d) * (s - p)
            ref_ema[n].sub_((1 - d) * (ref_ema[n] - p.detach()))

    # Export: rank 0 gets every parameter under the unwrapped model's names, the others {}.
    full = ema.full_state_dict(model)
    if rank == 0:
        assert list(full) == [n for n, _ in ref.named_parameters()]
        for n, p in ref.named_parameters():
            torch.testing.assert_close(full[n], ref_ema[n] if n in trainable else p, atol=1e-6, rtol=0)
    else:
        assert full == {}
    if resumed:
        assert resumed.step == ema.step == K
        for n, v in resumed.full_state_dict().items():  # continues as if never interrupted
            torch.testing.assert_close(v, ref_ema[n], atol=1e-6, rtol=0)

    # Memory: fp32 shards of the trainable parameters only, together exactly P, per rank ceil(P/N) plus padding.
    assert set(ema.shards) == set(trainable) and all(s.dtype == torch.float32 for s in ema.shards.values())
    P = sum(p.numel() for p in trainable.values())
    local_bytes = sum(s.numel() * s.element_size() for s in ema.shards.values())
    total = torch.tensor(local_bytes)
    if dist.is_initialized():
        dist.all_reduce(total)
    assert total.item() == 4 * P
    # padding: the flat partition rounds each param up by < 1 element, FSDP2 by < 1 row
    pad = sum(p.numel() // p.shape[0] if layout == "fsdp" else 1 for p in trainable.values())
    assert local_bytes <= 4 * (math.ceil(P / world) + pad)

    # swap_into: EMA weights inside, the model's own after (this also catches an FSDP2 root left unsharded).
    ref_with_ema = copy.deepcopy(ref)
    ref_with_ema.load_state_dict(ref_ema, strict=False)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_before = model(x)
        with ema.swap_into(model):
            y_ema = model(x)
        y_after = model(x)
        torch.testing.assert_close(y_before, ref(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(y_ema, ref_with_ema(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(y_after, ref(x), atol=1e-6, rtol=0)


def _worker(rank, world, store_file, ckpt_dir, save_to, load_from):
    torch.set_num_threads(1)
    # A FileStore rendezvous (as in PyTorch's own multi-process tests) rather than a port: nothing to collide with
    # when other test runs share the machine. A failing rank makes the others fail within the timeout.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for layout in ("replicated", "fsdp"):
            run_and_check(layout, ckpt_dir, save_to, load_from)
        dist.barrier()  # no rank tears down gloo while a peer still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # passed: skip interpreter teardown, where gloo's threads sometimes abort ("terminate called ...")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the last check is meant to be single-process
def test_sharded_ema_matches_plain_ema_and_resumes_on_other_world_sizes(tmp_path):
    # Each run checks both layouts and resumes from an earlier run's mid-way checkpoint: 1 -> 2, 2 -> 3, 2 -> 1.
    runs = [(1, "w1", None), (2, "w2", "w1"), (3, None, "w2"), (1, None, "w2")]
    for i, (world, save_to, load_from) in enumerate(runs):
        mp.spawn(_worker, args=(world, str(tmp_path / f"store{i}"), str(tmp_path), save_to, load_from), nprocs=world)
    # ... and into a single process with no process group at all (plain tensors instead of DTensors)
    run_and_check("replicated", str(tmp_path), load_from="w2")


def test_decay_schedule():
    assert decay_at(1) == 0.0  # the first update copies the weights
    assert decay_at(2) == pytest.approx(2 / 11)  # s = step - 1 = 1
    assert decay_at(100) == pytest.approx(100 / 109)
    assert decay_at(8990) < 0.999 and decay_at(9000) == 0.999  # "reaches 0.999 after about 9k steps"
    assert [decay_at(k, 0.3) for k in range(1, 8)] == [official_decay(k) for k in range(1, 8)]


def test_plain_ema_of_a_bf16_model_is_fp32():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(torch.bfloat16)
    model.register_parameter("gain", nn.Parameter(torch.tensor(2.0, dtype=torch.bfloat16)))  # 0-dim
    model[1].requires_grad_(False)
    ema = ShardedEMA(model, decay=DECAY)
    ref = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
    for k in range(K):
        fake_optimizer_step(model, k)
        ema.update(model)
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n] = ref[n].lerp(p.detach().float(), 1 - official_decay(k + 1))
    full = ema.full_state_dict()
    assert list(full) == [n for n, p in model.named_parameters() if p.requires_grad] and full["gain"].shape == ()
    for n in ref:
        assert full[n].dtype == torch.float32
        torch.testing.assert_close(full[n], ref[n], atol=1e-6, rtol=0)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with ema.swap_into(model):
        torch.testing.assert_close(model.gain.float(), ref["gain"].bfloat16().float())
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_user_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(model, decay=1.5)
    with pytest.raises(ValueError, match="no trainable"):
        ShardedEMA(nn.Linear(2, 2).requires_grad_(False))
    ema = ShardedEMA(model)
    with pytest.raises(ValueError, match="lacks EMA parameters"):
        ema.update(nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match="local part"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="not an EMA state_dict"):
        ema.load_state_dict({"step": 1, "shards": {"weight": torch.zeros(4)}})
    with pytest.raises(ValueError, match="number of ranks"):
        ema.load_state_dict({"step": 1, "shards": {"weight": torch.zeros(2), "bias": torch.zeros(2)}})
