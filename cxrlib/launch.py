"""Train one fold under torchrun from a notebook or the pipeline, its output shown live and appended to
``<fold dir>/train.log``: ``launch(512, 0, "runs/mimic", index, folds, cache, epochs=50)``; keywords become
the trainer's flags (``batch_size=8`` -> ``--batch-size 8``) or torchrun's (:data:`TORCHRUN`)."""

from __future__ import annotations

import collections
import ctypes
import datetime
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from . import paths
from .train import get_args_parser

PathLike = str | os.PathLike
TORCHRUN = {"nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 29500, "max_restarts": 0,
            "rdzv_id": None}  # fmt: skip


class TrainingFailedError(RuntimeError):
    """torchrun (or the trainer) exited with an error; the message holds the log's tail."""


def override_flags(overrides: dict) -> list[str]:
    """Keyword overrides -> trainer flags (False / None: left out); ``ValueError`` for an unknown keyword."""
    takes_value = {o: a.nargs != 0 for a in get_args_parser()._actions for o in a.option_strings}
    argv: list[str] = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if flag not in takes_value:
            raise ValueError(f"launch(): unknown trainer option {key}= (no {flag} in python -m cxrlib.train)")
        if value is None or value is False:
            continue
        if takes_value[flag]:
            argv += [flag, *map(str, value if isinstance(value, list | tuple) else [value])]
        elif value is True:
            argv.append(flag)
        else:
            raise ValueError(f"launch(): {key}= is a switch; pass True or False, not {value!r}")
    return argv


def resolve_nproc(gpus: str | int, strict: bool = False) -> int:
    """Processes per node: ``"all"`` (every GPU; 1 on a CPU) or a number, ``strict``: above 1 needs a GPU."""
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
    if strict and nproc > 1 and not count:
        raise ValueError(f"gpus={gpus}: no CUDA GPU is visible; use 1 (or 'all') to train on the CPU")
    return nproc


def build_command(
    resolution: int, fold: int, out: PathLike, index: PathLike, folds: PathLike, cache: PathLike,
    nproc: int = 1, **options,
) -> list[str]:  # fmt: skip
    """The torchrun command that trains one fold into ``out`` (several nodes: a c10d rendezvous)."""
    run = {key: options.pop(key, default) for key, default in TORCHRUN.items()}
    command = [sys.executable, "-m", "torch.distributed.run"]
    if run["nnodes"] == 1:
        command.append("--standalone")  # picks a free port: several single-node runs can coexist
    else:
        job = run["rdzv_id"] or re.sub(r"[^A-Za-z0-9_-]+", "-", str(Path(out).resolve()).strip("/"))[-64:]
        endpoint = f"--rdzv-endpoint={run['master_addr']}:{run['master_port']}"
        command += [f"--nnodes={run['nnodes']}", f"--node-rank={run['node_rank']}", "--rdzv-backend=c10d",
                    endpoint, f"--rdzv-id={job}"]  # fmt: skip
    command += [f"--nproc-per-node={nproc}", f"--max-restarts={run['max_restarts']}", "-m", "cxrlib.train"]
    command += ["--index", str(index), "--folds", str(folds), "--cache", str(cache), "--resolution",
                str(int(resolution)), "--fold", str(int(fold)), "--out", str(out)]  # fmt: skip
    return command + override_flags(options)


def relay(output: io.TextIOBase, log, echo: bool, keep: int = 60) -> list[str]:
    """Show ``output`` as it comes (``"\\r"`` overwrites the line), log whole lines; returns the last ones."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    for piece in iter(output.readline, ""):
        line, update = piece.rstrip("\r\n"), piece.endswith("\r")
        if echo:
            sys.stdout.write(piece if update else line + "\n")
            sys.stdout.flush()
        if not update:  # progress-bar updates are not logged; the bar's final line is
            log.write(line + "\n")
            log.flush()
            tail.append(line)
    return list(tail)


def run_logged(command: list[str], env: dict[str, str], log_path: Path, echo: bool) -> tuple[int, str]:
    """Run ``command`` in its own process group (stopped on an interrupt); returns exit code and log tail."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(command)}\n")
        linux = sys.platform == "linux"  # the child gets SIGTERM when this process ends (PR_SET_PDEATHSIG)
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=(lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM)) if linux else None,
        )  # fmt: skip
        try:
            with io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline="") as output:
                tail = relay(output, log, echo)
            return process.wait(), "\n".join(tail)
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise


def launch(
    resolution: int, fold: int, run_dir: PathLike, index: PathLike, folds: PathLike, cache: PathLike,
    gpus: str | int = "all", echo: bool = True, env: dict | None = None, out: PathLike | None = None,
    **options,
) -> Path:  # fmt: skip
    """Train ``fold`` at ``resolution`` into ``out`` (default ``run_dir/res<R>/fold<k>``) and return it;
    :class:`TrainingFailedError` with the log's end when the run fails (node n > 0: ``train_node<n>.log``)."""
    out = Path(out) if out is not None else paths.fold_dir(run_dir, resolution, fold)
    command = build_command(resolution, fold, out, index, folds, cache, resolve_nproc(gpus), **options)
    out.mkdir(parents=True, exist_ok=True)
    node = options.get("node_rank", 0)
    log_path = out / (paths.TRAIN_LOG if node == 0 else f"train_node{node}.log")
    # waiting OpenMP threads sleep instead of spinning: CPU processes sharing cores do not slow each other
    child_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if options.get("nnodes", 1) > 1:
        # a fresh store per rendezvous round, so that restarted workers never see dead ones (docs/training.md)
        child_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    returncode, tail = run_logged(command, child_env, log_path, echo)
    if returncode != 0:
        raise TrainingFailedError(
            f"training of resolution {resolution}, fold {fold} failed (exit code {returncode}); "
            f"full log: {log_path}\n--- last lines ---\n{tail}"
        )
    return out
