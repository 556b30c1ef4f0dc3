"""Distributed setup from the environment: torchrun's variables or SLURM's, nccl on GPUs, gloo on CPU.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
``srun`` without torchrun sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``; the
job script must then export ``MASTER_ADDR`` (the first node) and ``MASTER_PORT``. With none of
these, the process runs alone and no process group is created.

The rank helpers work with or without a process group, so the same training code runs in
one process and under torchrun. Nothing here changes global behaviour (no patched ``print``):
callers guard their logging and file writes with :func:`is_main_process`.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """More processes on a node than it has GPUs."""


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

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(device: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the environment and pick this process's device.

    ``device``: ``None`` for ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; or an
    explicit ``"cpu"``/``"cuda"``. A task started by srun without torchrun that sees one GPU
    (``--gpus-per-task=1``) uses that GPU whatever its local rank. The backend is nccl for CUDA
    and gloo for CPU. Raises :class:`DeviceError` when a process's local rank has no GPU of its own.
    """
    rank, world_size, local_rank = env_ranks()
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        count = torch.cuda.device_count()
        slurm_task = "SLURM_PROCID" in os.environ and "RANK" not in os.environ
        index = 0 if slurm_task and count == 1 else local_rank
        if index >= count:
            raise DeviceError(
                f"process with local rank {local_rank} needs GPU {local_rank}, but only {count} "
                f"GPU(s) are visible: start at most {count} processes per node (--nproc_per_node)"
            )
        torch_device = torch.device("cuda", index)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
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
    """The workers' store, with a prefix per restart when torchrun shares its agent's store.

    A shared store (torchrun's default) outlives worker restarts (``--max-restarts``): without a
    prefix per attempt, restarted workers would read the dead workers' addresses and never
    connect. The restart count only agrees between the workers of one node, though: on several
    nodes a node whose workers were restarted because another node failed counts no restart. So
    several nodes need a fresh store per rendezvous round instead,
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (which :func:`cxrlib.launch.launch` sets), and then no
    prefix is needed.
    """
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


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op when alone)."""
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (unchanged when alone)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(values: list[int]) -> list[int]:
    """The element-wise minimum of ``values`` over all processes (``values`` when alone)."""
    if not is_dist():
        return list(values)
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s value on every process (unchanged when alone)."""
    if is_dist():
        dist.broadcast(tensor, src=src)
    return tensor


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel on this process's device (keep ``model`` for saving)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm's running statistics, DDP's own rule)."""
    for buffer in model.buffers():
        broadcast_(buffer.data, src=0)


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (first dimensions may differ), in rank order."""
    if not is_dist():
        return [tensor]
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)]


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_dist():
        dist.destroy_process_group()
