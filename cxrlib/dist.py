"""Distributed setup from torchrun's or SLURM's variables and no-op-when-alone collectives."""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .fileio import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on its node, device, backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(device: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group the environment describes, on this process's GPU or the CPU."""
    rank, world_size, local_rank = env_ranks()
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    slurm_task = "SLURM_PROCID" in os.environ and "RANK" not in os.environ
    torch_device = torch.device("cpu")
    if use_cuda:
        count = torch.cuda.device_count()
        index = 0 if slurm_task and count == 1 else local_rank
        if index >= count:
            raise ConfigError(
                f"process with local rank {local_rank} needs GPU {local_rank}, but only {count} "
                f"GPU(s) are visible: start at most {count} processes per node (--nproc_per_node)"
            )
        torch_device = torch.device("cuda", index)
        torch.cuda.set_device(torch_device)
    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if slurm_task:
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world_size))
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RuntimeError(
                    "launched by srun without torchrun: export MASTER_ADDR (the first node's host name) "
                    "and MASTER_PORT in the job script"
                )
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=timeout_minutes)
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
            dist.init_process_group(
                backend=backend,
                store=_store_for_this_attempt(store),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=torch_device if use_cuda else None,
            )
    return DistInfo(rank, world_size, local_rank, torch_device, backend)


def _store_for_this_attempt(store: dist.Store) -> dist.Store:
    """torchrun's shared agent store with a prefix per restart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env_ranks()[0] == 0:
        warnings.warn(
            f"{nodes} nodes with --max-restarts share torchrun's agent store: after a restart the "
            "nodes can wait for each other forever; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on "
            "every node",
            stacklevel=2,
        )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"cxrlib/attempt{attempt}", store)


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every process (no-op when alone)."""
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(values: list[int]) -> list[int]:
    """The element-wise minimum of ``values`` over all processes."""
    return [min(column) for column in zip(*all_gather_objects(list(values)), strict=True)]


def all_gather_objects(value: object) -> list:
    """Every process's ``value`` (picklable), in rank order."""
    if not is_dist():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
