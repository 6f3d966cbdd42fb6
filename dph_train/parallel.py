"""Multi-process training under torchrun: process group, wrapping, gathers, checkpoints, teardown.

    torchrun --nproc_per_node=N -m dph_train train --train.parallel=ddp|fsdp2 ...

Everything the trainer needs from torch.distributed goes through one `Parallel` object, so trainer.py stays a
readable loop. With parallel="none" (the default, one process) every method is a no-op or the identity.

How a step is split (trainer.py calls these):
- rollouts: each rank generates whole GRPO groups (`shard`), so advantages only ever use one rank's rewards;
- the loss normalizers (the step's D_exp / D_pef token counts) are summed over ranks (`all_sum`), so every rank's
  micro-batch loss is divided by the one-big-batch count;
- DDP and FSDP2 average gradients over ranks: the loss is multiplied by `loss_scale` (= world size), so the
  optimizer sees the sum over ranks of (local loss / global normalizer) = the one-process gradient;
- every rank runs the same number of forward passes (`all_max`; short ranks run an empty micro-batch), because
  FSDP2's all-gathers and DDP's all-reduces are collectives that every rank must join.

`plain` is an ordinary (unwrapped, unsharded) model with the current weights: the model itself for none / ddp, a
full copy for fsdp2 (refreshed after each optimizer step by `refresh_plain`). Rollouts, the no-grad log pi_old pass,
the HF folder export and eval use it, so none of them runs a collective; only the loss forward/backward goes through
the wrapped module.

Checkpoints: the optimizer state goes through torch.distributed.checkpoint (DCP, keyed by parameter names, sharded
by rank under fsdp2), so a checkpoint written by N processes resumes on M (also M = 1 with parallel=none); the
weights are the HF folder that rank 0 writes (full state dict).
"""
from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError

MODES = ("none", "ddp", "fsdp2")


def env_world_size() -> int | None:
    """WORLD_SIZE set by torchrun (None when not launched by it)."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w else None


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_launch(mode: str, command: str) -> None:
    """A user error (ConfigError, one line, exit 2) when train.parallel does not match how the job was launched."""
    world = env_world_size()
    if mode != "none" and world is None:
        raise ConfigError(f"train.parallel={mode} needs a torchrun launch (no WORLD_SIZE in the environment): "
                          f"torchrun --nproc_per_node=N -m dph_train {command} --train.parallel={mode} ...")
    if mode == "none" and world is not None and world > 1:
        raise ConfigError(f"train.parallel=none under torchrun with WORLD_SIZE={world} would run {world} copies of "
                          "one job into one run_dir: pass --train.parallel=ddp or --train.parallel=fsdp2")


class Parallel:
    """The process group and the policy's wrapper. Parallel() = one process, nothing distributed."""

    def __init__(self, mode: str = "none", device: torch.device | None = None):
        self.mode = mode
        self.enabled = mode != "none"
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.enabled else 0
        self.is_main = self.rank == 0
        self.device = device
        self.plain = None  # see the module docstring
        self.policy = None  # the unwrapped root module (what state dicts are taken of)
        self.wrapped = None  # what the loss forward/backward calls

    # ------------------------------------------------------------------ setup / teardown
    @classmethod
    def setup(cls, mode: str, device: str = "auto", timeout_min: float = 30) -> "Parallel":
        """Join the process group torchrun described (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the env):
        nccl with one GPU per process on CUDA, gloo on the CPU. A rank that waits longer than timeout_min for the
        others raises instead of hanging forever."""
        if mode == "none":
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device in ("auto", "cuda") and torch.cuda.is_available():
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            backend = "nccl"
        elif device == "cuda":
            raise RuntimeError("device=cuda but CUDA is not available")
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
        return cls(mode, dev)

    def close(self) -> None:
        """Clean exit: a barrier first (without it gloo sometimes aborts at exit), then destroy the group."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # ------------------------------------------------------------------ splitting and gathering
    def shard(self, items: list) -> list:
        """This rank's share: items rank, rank + world, ... (every item on exactly one rank)."""
        return list(items)[self.rank::self.world]

    def _tensor(self, values, dtype):
        dev = self.device if (self.enabled and dist.get_backend() == "nccl") else torch.device("cpu")
        return torch.tensor(values, dtype=dtype, device=dev)

    def all_sum(self, values: list) -> list:
        """Elementwise sum over ranks of a list of numbers (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = self._tensor([float(v) for v in values], torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_max(self, n: int) -> int:
        if not self.enabled:
            return int(n)
        t = self._tensor([int(n)], torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ the policy
    def plain_copy(self, model):
        """The plain model that rollouts / scoring / export use (call before building the rollout engine)."""
        if self.plain is None:
            self.plain = _inference_copy(model) if self.mode == "fsdp2" else model
        return self.plain

    def wrap(self, policy: torch.nn.Module, model) -> torch.nn.Module:
        """policy: the root module whose forward runs backbone + loss (trainer.PolicyLoss); model: the HF model in
        it. ddp: DistributedDataParallel; fsdp2: fully_shard on every decoder layer, then on the root (inside the
        root's forward lm_head's weight is a whole tensor, which the fused kernel needs)."""
        self.plain_copy(model)
        self.policy = policy
        if self.mode == "none":
            self.wrapped = policy
        elif self.mode == "ddp":
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # No buffer broadcast per forward: the buffers (rotary frequencies) are constants, and it would be one
            # more collective that every rank must join (torch 2.13 renamed the argument).
            new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            self.wrapped = DDP(policy, **{"forward_sync_buffers" if new else "broadcast_buffers": False})
        elif self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            from .models import backbone

            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in getattr(backbone(model), "layers", []):
                fully_shard(layer, mesh=mesh)
            fully_shard(policy, mesh=mesh)
            self.wrapped = policy
        else:
            raise ValueError(f"parallel mode {self.mode!r}: expected one of {MODES}")
        return self.wrapped

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks; scaling each rank's loss by the world size turns that mean
        into the sum the global normalizers ask for."""
        return float(self.world)

    def grad_sync(self, last: bool):
        """Context for one micro-batch's backward: DDP accumulates locally (no_sync) and all-reduces on the last."""
        if self.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """The global gradient norm (before clipping); DTensor grads (fsdp2) are reduced over ranks by torch."""
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def refresh_plain(self) -> None:
        """fsdp2: copy the sharded weights into the full copy (an all-gather; every rank joins)."""
        if self.mode != "fsdp2":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.policy.model, options=StateDictOptions(full_state_dict=True))
        self.plain.load_state_dict(sd)

    @torch.no_grad()
    def push_plain(self) -> None:
        """fsdp2: load the full copy's weights into the shards (after a checkpoint was read into `plain`)."""
        if self.mode != "fsdp2":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.policy.model, self.plain.state_dict(),
                             options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------------------------ optimizer checkpoints (DCP)
    def save_optimizer(self, opt, path: str) -> None:
        """Every rank writes its part of the optimizer state into folder path (DCP)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        with _one_process_dcp(self.enabled):
            dcp.save({"optim": get_optimizer_state_dict(self.policy, opt)}, checkpoint_id=path,
                     no_dist=not self.enabled)

    def load_optimizer(self, opt, path: str) -> None:
        """Read a DCP optimizer state written by any number of processes into this run's layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        osd = get_optimizer_state_dict(self.policy, opt)  # a template with this run's shapes / shards
        state = {"optim": osd}
        with _one_process_dcp(self.enabled):
            dcp.load(state, checkpoint_id=path, no_dist=not self.enabled)
        set_optimizer_state_dict(self.policy, opt, state["optim"])


@contextlib.contextmanager
def _one_process_dcp(enabled: bool):
    """DCP in one process warns on every call that it assumes one process: that is what no_dist=True says."""
    import warnings

    with warnings.catch_warnings():
        if not enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _inference_copy(model):
    """A full plain copy of the HF model for rollouts and scoring (no gradient checkpointing: it never trains)."""
    gc = getattr(model, "is_gradient_checkpointing", False)
    if gc:
        model.gradient_checkpointing_disable()
    try:
        out = copy.deepcopy(model)
    finally:
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()
