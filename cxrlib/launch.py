"""Start the trainer under torchrun from a notebook or the pipeline, stream its output, return the run folder.

::

    from cxrlib.launch import launch
    fold_dir = launch(512, 0, "runs/mimic", "runs/mimic/index.csv", "runs/mimic/folds.csv", "cache/mimic",
                      gpus="all", epochs=50, weights="imagenet")

runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m cxrlib.train ...`` in a
subprocess (``N`` = every visible GPU, or one process on a CPU), prints its output line by line
as it comes (tqdm's carriage-return updates overwrite one line, as in a terminal), appends the
whole log to ``<fold dir>/train.log``, and raises :class:`TrainingFailedError` with the log's
tail when training fails. Keyword overrides become the trainer's flags: ``batch_size=8`` ->
``--batch-size 8``, ``deterministic=True`` -> ``--deterministic`` (False / None: left out).
Several nodes: call it on each node with ``nnodes``, ``node_rank`` and ``master_addr``.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import datetime
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from . import paths
from .paths import fold_dir as fold_dir_of


class TrainingFailedError(RuntimeError):
    """torchrun (or the trainer) exited with an error; the message holds the log's tail."""


def _trainer_flags() -> dict[str, bool]:
    """The trainer's long flags -> whether each takes a value."""
    from .train import get_args_parser

    flags = {}
    for action in get_args_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option] = action.nargs != 0
    return flags


def override_flags(overrides: dict) -> list[str]:
    """Keyword overrides -> trainer flags; ``ValueError`` for a keyword the trainer does not know."""
    known = _trainer_flags()
    argv: list[str] = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if flag not in known:
            raise ValueError(f"launch(): unknown trainer option {key}= (no {flag} in python -m cxrlib.train)")
        if value is None or value is False:
            continue
        if not known[flag]:
            if value is not True:
                raise ValueError(f"launch(): {key}= is a switch; pass True or False, not {value!r}")
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def resolve_nproc(gpus: str | int) -> int:
    """Processes per node: ``"all"`` = every visible GPU (1 on a CPU); an int is checked against the GPUs."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == "all":
        return max(1, count)
    try:
        nproc = int(gpus)
    except (TypeError, ValueError):
        raise ValueError(f"gpus={gpus!r}: use 'all' or a number of processes") from None
    if nproc < 1:
        raise ValueError(f"gpus={nproc}: at least one process is needed")
    if count and nproc > count:
        raise ValueError(f"gpus={nproc}: only {count} GPU(s) are visible on this node")
    return nproc


def check_gpus(gpus: str | int) -> int:
    """Processes per node for a study that asks for ``gpus``: :func:`resolve_nproc`, but more than one
    process on a machine without a CUDA GPU is refused too (``ValueError``), since a number of GPUs
    there is a mistake, not a request for CPU processes (:func:`launch` itself still allows those)."""
    nproc = resolve_nproc(gpus)
    if nproc > 1 and not torch.cuda.is_available():
        raise ValueError(
            f"gpus={gpus}: no CUDA GPU is visible on this machine; use 1 (or 'all') to train on the CPU"
        )
    return nproc


def build_command(
    resolution: int,
    fold: int,
    out: str | os.PathLike,
    index: str | os.PathLike,
    folds: str | os.PathLike,
    cache: str | os.PathLike,
    nproc: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    max_restarts: int = 0,
    rdzv_id: str | None = None,
    **overrides,
) -> list[str]:
    """The torchrun command line that trains one fold at one resolution into ``out``.

    One node: ``--standalone``. Several: the c10d rendezvous at ``master_addr:master_port`` (every
    node runs the same command with its own ``node_rank``), so that when a worker fails on one
    node, the agents of all nodes restart their workers together (``max_restarts``) and they
    resume from the newest checkpoint. ``rdzv_id`` names the job (default: one per run folder).
    """
    command = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        command.append("--standalone")  # picks a free port: several single-node runs can coexist
    else:
        job = rdzv_id or re.sub(r"[^A-Za-z0-9_-]+", "-", str(Path(out).resolve()).strip("/"))[-64:]
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={master_addr}:{master_port}",
            f"--rdzv-id={job}",
        ]
    command += [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "cxrlib.train"]
    command += [
        "--index", str(index), "--folds", str(folds), "--cache", str(cache),
        "--resolution", str(int(resolution)), "--fold", str(int(fold)), "--out", str(out),
    ]  # fmt: skip
    return command + override_flags(overrides)


_LINE_END = re.compile(r"\r\n|\n|\r")


class _Stream:
    """Splits a child's output into lines; echoes them live and keeps complete lines for the log."""

    def __init__(self, log_handle, echo: bool, tail_lines: int = 60):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.log, self.echo = log_handle, echo
        self.tail = collections.deque(maxlen=tail_lines)

    def feed(self, data: bytes) -> None:
        self.pending += self.decoder.decode(data)
        while match := _LINE_END.search(self.pending):
            if match.group() == "\r" and match.end() == len(self.pending):
                break  # may be the first half of "\r\n": wait for the next chunk
            self._emit(self.pending[: match.start()], match.group())
            self.pending = self.pending[match.end() :]

    def _emit(self, text: str, sep: str) -> None:
        if self.echo:
            sys.stdout.write(text + ("\r" if sep == "\r" else "\n"))
            sys.stdout.flush()
        if sep != "\r":  # progress-bar updates are not logged; the bar's final line is
            self.log.write(text + "\n")
            self.log.flush()
            self.tail.append(text)

    def close(self) -> None:
        self.pending += self.decoder.decode(b"", final=True)
        if self.pending:
            self._emit(self.pending, "\n")
            self.pending = ""


def _end_with_parent() -> None:
    """In the child, before torchrun starts (Linux): SIGTERM when the process that launched it ends,
    however it ends (a notebook kernel killed at a time limit), so no trainer is left running."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_logged(command: list[str], env: dict[str, str], log_path: Path, echo: bool) -> tuple[int, str]:
    """Run ``command`` in its own process group, streaming its output live (``echo``) and appending
    it to ``log_path``; returns the exit code and the log's last lines. An interrupt (e.g. in the
    notebook) stops the whole process group before it is raised again; on Linux the command also
    gets SIGTERM should this process end first (:func:`_end_with_parent`)."""
    with open(log_path, "a", encoding="utf-8") as log_handle:
        log_handle.write(
            f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(command)}\n"
        )
        stream = _Stream(log_handle, echo)
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None,
        )  # fmt: skip
        try:
            while chunk := os.read(process.stdout.fileno(), 65536):
                stream.feed(chunk)
            returncode = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            stream.close()
            process.stdout.close()
    return returncode, "\n".join(stream.tail)


def launch(
    resolution: int,
    fold: int,
    run_dir: str | os.PathLike,
    index: str | os.PathLike,
    folds: str | os.PathLike,
    cache: str | os.PathLike,
    gpus: str | int = "all",
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    max_restarts: int = 0,
    rdzv_id: str | None = None,
    echo: bool = True,
    env: dict[str, str] | None = None,
    out: str | os.PathLike | None = None,
    **overrides,
) -> Path:
    """Train ``fold`` at ``resolution`` into ``run_dir/res<R>/fold<k>`` with torchrun; return that folder.

    Args:
        run_dir: the preset's run folder (``runs/<preset>``); the fold folder is made inside it.
        gpus: ``"all"`` (every visible GPU, or one CPU process) or a number of processes per node
            (on a CPU any number, using gloo).
        nnodes, node_rank, master_addr, master_port, rdzv_id: for several machines (call on each
            node; c10d rendezvous at ``master_addr:master_port``). Node 0 logs to
            ``train.log``, node ``n`` to ``train_node<n>.log``.
        max_restarts: torchrun restarts the workers this often after a failure; they resume
            from the newest checkpoint.
        echo: print the output live (a notebook cell shows it as it comes).
        env: extra environment variables for the processes.
        out: the training's folder, when not ``run_dir/res<R>/fold<k>`` (e.g. a field-limited variant).
        overrides: trainer options, e.g. ``epochs=30, batch_size=16, deterministic=True``.

    Raises:
        ValueError: a wrong ``gpus`` or an unknown override, before anything starts.
        TrainingFailedError: the run failed; the message holds the end of ``train.log``.
    """
    nproc = resolve_nproc(gpus)
    out = Path(out) if out is not None else fold_dir_of(run_dir, resolution, fold)
    command = build_command(
        resolution, fold, out, index, folds, cache, nproc, nnodes, node_rank, master_addr, master_port,
        max_restarts, rdzv_id, **overrides,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / (paths.TRAIN_LOG if node_rank == 0 else f"train_node{node_rank}.log")
    # OMP_WAIT_POLICY=PASSIVE: waiting OpenMP threads sleep instead of spinning, so CPU processes
    # sharing cores (several ranks, or other jobs) do not slow each other down many times over.
    child_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if nnodes > 1:
        # Each rendezvous round gets a fresh store for the workers' process group. The agent's
        # shared store keeps the previous round's keys, so after a restart the workers of one
        # node could try the dead workers' addresses (connection refused, or a hang).
        child_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    returncode, tail = run_logged(command, child_env, log_path, echo)
    if returncode != 0:
        raise TrainingFailedError(
            f"training of resolution {resolution}, fold {fold} failed (exit code {returncode}); "
            f"full log: {log_path}\n--- last lines ---\n{tail}"
        )
    return out
