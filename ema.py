"""ZeRO-3-style sharded fp32 EMA of the trainable parameters, written on plain torch.distributed (paper §3.3).

The paper keeps an fp32 EMA of the whole ~20B-parameter model (VLM + FLUX + projectors) by wrapping a second copy in
DeepSpeed ZeRO-3, so that each of the N ranks stores and updates only 1/N of it (official:
univa/utils/create_ema.py). We do the same without DeepSpeed, and for the trainable parameters only: frozen ones
never change, so an export takes them from the model. Each rank keeps one fp32 shard per trainable parameter:

    replicated parameter (plain, DDP or ZeRO-2 training, the paper's setting), numel n = 10, N = 3 ranks:
        flat(W)  [ 0 1 2 3 | 4 5 6 7 | 8 9 ]      partition size ps = ceil(n / N) = 4 (official)
                   rank 0    rank 1    rank 2     rank r keeps flat(W)[r*ps : r*ps + ps], the last one ragged
    FSDP2 parameter (a DTensor whose dim 0 is split in chunks of ceil(rows / N)), W of shape (5, 3):
        rows     [ 0 1 | 2 3 | 4 ]                rank r keeps W.to_local(), the rows it already owns

    update   ema_r <- ema_r + (1 - decay) * (p_r - ema_r) on each rank's own slice p_r: no communication
    export   all-gather one parameter at a time, rank 0 moves it to the CPU: one extra parameter on the device

Both kinds of shard are described as DTensors (the replicated one as Shard(0) of the flattened parameter, which
splits exactly like the official partition), so gathering, DCP checkpoints and resharding come from DTensor.
Without a process group this is a plain fp32 EMA.
"""

import re
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

# Added to parameter names by activation checkpointing and torch.compile; not part of the model's real FQNs.
_WRAPPERS = re.compile(r"_checkpoint_wrapped_module\.|_orig_mod\.")


def decay_at(step: int, decay: float = 0.999) -> float:
    """Decay for the `step`-th update (1-based): 0 first, then min(decay, (1+s)/(10+s)) with s = step-1 (official)."""
    s = step - 1  # official: diffusers EMAModel.get_decay with update_after_step=0, use_ema_warmup=False
    return 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))


def _named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by FQN, FSDP2 modules resharded first so that theirs are the sharded DTensors."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # a forward without backward leaves the FSDP2 root unsharded (plain full params)
    return {_WRAPPERS.sub("", name): p for name, p in model.named_parameters()}


class ShardedEMA:
    """fp32 EMA of the trainable parameters; each rank holds and updates only its own shard (see module docstring).
    Pass the model itself (FSDP2-sharded or not; not a DDP wrapper) to the constructor, update and swap_into."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}; the paper uses 0.999")
        self.decay, self.step = decay, 0
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        params = {n: p for n, p in _named_params(model).items() if p.requires_grad}
        if not params:
            raise ValueError("the model has no trainable parameters; set requires_grad before building the EMA")
        device_type = next(iter(params.values())).device.type
        mesh = init_device_mesh(device_type, (self.world,)) if self.distributed else None
        self.shapes = {n: p.shape for n, p in params.items()}
        # name -> (mesh, placements, global shape, stride) of the shard as a DTensor
        self.layouts = {
            n: (p.device_mesh, p.placements, p.shape, p.stride()) if isinstance(p, DTensor)
            else (mesh, (Shard(0),), (p.numel(),), (1,))
            for n, p in params.items()
        }
        with torch.no_grad():
            self.shards = {n: self._local(p).to(torch.float32, copy=True) for n, p in params.items()}  # even if bf16

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's part of `p`: its FSDP2 shard, or its slice of the flattened replica."""
        if isinstance(p, DTensor):
            return p.to_local()
        ps = -(-p.numel() // self.world)  # official partition_size = ceil(numel / world)
        return p.detach().reshape(-1)[self.rank * ps : self.rank * ps + ps]  # truncated at the end, empty past it

    def _gather(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of parameter `name` on every rank from each rank's `local` part (one all-gather)."""
        full = self._dtensor(name, local).full_tensor() if self.distributed else local  # DTensor pads for gloo
        return full.reshape(self.shapes[name])

    def _dtensor(self, name: str, local: torch.Tensor) -> DTensor:
        """`local` as this rank's shard of a DTensor with the global shape of parameter `name` (flat if replicated)."""
        mesh, placements, shape, stride = self.layouts[name]
        return DTensor.from_local(local, mesh, placements, shape=shape, stride=stride)

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters by name, checked to contain every parameter this EMA tracks."""
        params = _named_params(model)
        if missing := [n for n in self.shards if n not in params]:
            raise ValueError(f"model lacks EMA parameters {missing[:5]}; pass the model the EMA was built from")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step on this rank's shards (call after each optimizer step); no communication."""
        params = self._params(model)
        targets = []
        for name, shard in self.shards.items():
            local = self._local(params[name])
            if local.shape != shard.shape:
                raise ValueError(f"{name}: local part {tuple(local.shape)} != EMA shard {tuple(shard.shape)}; "
                                 "shard the model the same way as when the EMA was built")
            targets.append(local.float())
        self.step += 1
        torch._foreach_lerp_(list(self.shards.values()), targets, 1.0 - decay_at(self.step, self.decay))

    def state_dict(self) -> dict:
        """{'step', 'shards'}: this rank's fp32 shards as DTensors (plain tensors without a process group)."""
        # Why DTensors: each one carries its global shape and this rank's offset, so torch.distributed.checkpoint
        # writes every slice once, in parallel, and on load reads just the slices each rank of the new world size
        # needs (resharding). No rank ever holds more than its own shards. The values share the shards' storage,
        # so dcp.load(ema.state_dict(), ...) fills the EMA in place; load_state_dict then only checks and copies.
        shards = {n: self._dtensor(n, s) if self.distributed else s for n, s in self.shards.items()}
        return {"step": self.step, "shards": shards}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict() of the same layout; to change the number of ranks, load it through DCP (reshards)."""
        shards = state_dict.get("shards", {})
        if "step" not in state_dict or set(shards) != set(self.shards):
            raise ValueError(f"not an EMA state_dict of this model: expected keys 'step' and 'shards' with "
                             f"{len(self.shards)} parameters; missing {sorted(set(self.shards) - set(shards))[:5]}, "
                             f"unexpected {sorted(set(shards) - set(self.shards))[:5]}")
        local = {n: v.to_local() if isinstance(v, DTensor) else v for n, v in shards.items()}
        for name, v in local.items():
            if v.shape != self.shards[name].shape:
                raise ValueError(f"{name}: shard {tuple(v.shape)}, expected {tuple(self.shards[name].shape)}. Saved on "
                                 "another number of ranks? Load through torch.distributed.checkpoint, which reshards: "
                                 "sd = ema.state_dict(); dcp.load(sd, checkpoint_id=path); ema.load_state_dict(sd)")
        with torch.no_grad():
            for name, v in local.items():
                self.shards[name].copy_(v)
        self.step = int(state_dict["step"])

    @torch.no_grad()
    def full_state_dict(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """EMA weights on rank 0 (CPU, gathered one parameter at a time), {} elsewhere; frozen ones from `model`."""
        params = self._params(model) if model is not None else {}
        out = {}
        for name in params or self.shards:  # the same order on every rank, as the all-gathers require
            if name in self.shards:
                full = self._gather(name, self.shards[name])
            else:
                p = params[name]
                full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if self.rank == 0:
                out[name] = full.to("cpu", copy=True)
        return out

    @contextmanager
    def swap_into(self, model: nn.Module):
        """Context manager: the model holds the EMA weights inside the block (validation sampling), then its own."""
        with torch.no_grad():
            params = self._params(model)
            backup = {n: self._local(params[n]).clone() for n in self.shards}  # 1/N of the weights, not a copy
            self._write(params, self.shards)
        try:
            yield model
        finally:
            with torch.no_grad():
                self._write(self._params(model), backup)  # _params reshards the root that a forward left unsharded

    def _write(self, params: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
        """Set each tracked parameter from per-rank parts: FSDP2 shards in place, replicas all-gathered one by one."""
        for name, part in parts.items():
            p = params[name]
            if isinstance(p, DTensor):
                p.to_local().copy_(part)
            else:
                p.copy_(self._gather(name, part))
