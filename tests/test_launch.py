"""torchrun from Python: flags, live log streaming, failures with the log's tail, DDP on 2 CPU processes
equal to 1 process, and a killed worker restarted by torchrun that resumes and finishes."""

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from faults import fault_env
from tiny_data import make_tiny_dataset

from cxrlib import launch as launcher
from cxrlib import paths
from cxrlib.fileio import load_verified
from cxrlib.index import read_index
from cxrlib.labels import FINDINGS
from cxrlib.splits import fold_ids, read_folds

SETTINGS = {
    "epochs": 2,
    "weights": "none",
    "batch_size": 4,
    "effective_batch": 8,
    "lr": 1e-3,
    "max_train_images": 16,
    "deterministic": True,
    "workers": 1,  # a persistent DataLoader worker per process, as on GPUs
}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what torchrun gives each of several processes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def start(data, run_dir, gpus, **extra):
    return launcher.launch(
        32, 0, run_dir, data.index, data.folds, data.cache, gpus=gpus, echo=False, **{**SETTINGS, **extra}
    )


@pytest.fixture(scope="module")
def two_process_run(tiny, tmp_path_factory):
    return start(tiny, tmp_path_factory.mktemp("ddp"), gpus=2, env=ONE_THREAD)


def test_overrides_become_trainer_flags():
    flags = launcher.override_flags(
        {"batch_size": 8, "deterministic": True, "no_resume": False, "lr": 1e-4, "max_train_images": None}
    )
    assert flags == ["--batch-size", "8", "--deterministic", "--lr", "0.0001"]
    with pytest.raises(ValueError, match="unknown trainer option batchsize="):
        launcher.override_flags({"batchsize": 8})
    with pytest.raises(ValueError, match="is a switch"):
        launcher.override_flags({"deterministic": "yes"})
    command = launcher.build_command(256, 1, "out", "i.csv", "f.csv", "c", nproc=8, nnodes=2, node_rank=1)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--node-rank=1" in command and "--nproc-per-node=8" in command
    assert "--rdzv-backend=c10d" in command and "--rdzv-endpoint=127.0.0.1:29500" in command
    assert command[command.index("--resolution") + 1] == "256"


def test_process_count_is_checked_against_the_gpus(monkeypatch):
    if not torch.cuda.is_available():
        assert launcher.resolve_nproc("all") == 1
        assert launcher.resolve_nproc(2) == 2  # gloo processes on the CPU
    with pytest.raises(ValueError, match="at least one"):
        launcher.resolve_nproc(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launcher.resolve_nproc("all") == 1
    with pytest.raises(ValueError, match="gpus=2: only 1 GPU"):
        launcher.resolve_nproc(2)


def test_relay_shows_progress_updates_and_logs_only_whole_lines(capsys):
    read, write = os.pipe()
    chunks = [
        b"start\nepoch 1:  10%\r",
        b"epoch 1:  50%\r",
        b"epoch 1: 100%\r",
        b"\ndone",
        b"\r",
        b"\n",
        b"tail",
    ]

    def child():  # the chunks as a child's output arrives: one at a time
        for chunk in chunks:
            os.write(write, chunk)
            time.sleep(0.05)
        os.close(write)

    writer = threading.Thread(target=child)
    writer.start()
    log = io.StringIO()
    with io.TextIOWrapper(os.fdopen(read, "rb"), encoding="utf-8", newline="") as output:
        tail = launcher.relay(output, log, echo=True)
    writer.join()
    # a bar's updates are echoed (each overwrites the last) but only its final state is logged;
    # "\r\n" split over two chunks is one line end
    assert log.getvalue() == "start\nepoch 1: 100%\ndone\ntail\n"
    assert "epoch 1:  10%\repoch 1:  50%\r" in capsys.readouterr().out
    assert tail == ["start", "epoch 1: 100%", "done", "tail"]


def running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_launched_command_ends_when_the_process_that_launched_it_is_killed(tmp_path):
    # A notebook kernel killed at a time limit must not leave its torchrun (and trainer) running.
    pid_file = tmp_path / "child.pid"
    child = f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file} && exec sleep 120"
    arguments = (
        f"['bash', '-c', {child!r}], {{'PATH': {os.environ['PATH']!r}}}, Path({str(tmp_path / 'log')!r})"
    )
    code = f"from pathlib import Path\nfrom cxrlib.launch import run_logged\nrun_logged({arguments}, False)"
    env = {**os.environ, "PYTHONPATH": str(paths.PROJECT_ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    started = time.monotonic()
    while not pid_file.is_file() and time.monotonic() - started < 120:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    try:
        parent.kill()  # SIGKILL: no handler of the launcher runs
        parent.wait()
        for _ in range(100):
            if not running(child):
                break
            time.sleep(0.1)
        assert not running(child)
    finally:
        if running(child):
            os.kill(child, 9)


@pytest.mark.slow
def test_failure_raises_with_the_log_tail(tiny, tmp_path):
    with pytest.raises(launcher.TrainingFailedError, match=r"(?s)exit code.*--fold 9: .* has folds 0 .. 3"):
        launcher.launch(
            32, 9, tmp_path, tiny.index, tiny.folds, tiny.cache, gpus=1, echo=False, env=ONE_THREAD
        )
    assert "--fold 9" in (tmp_path / "res32" / "fold9" / "train.log").read_text()


def learnable(path):
    state = load_verified(path)["model"]
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_two_processes_write_the_contract_and_match_one_process(tiny, two_process_run, tmp_path):
    out = two_process_run
    assert out.name == "fold0" and out.parent.name == "res32"
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "lr", "seconds", "img_per_s"]
    assert history["epoch"].tolist() == [1, 2]
    done = json.loads((out / "done.json").read_text())
    assert done["complete"] and done["world_size"] == 2 and done["batch_plan"]["effective_batch"] == 8
    index, folds = read_index(tiny.index), read_folds(tiny.folds)
    for role in ("val", "test"):
        predictions = pd.read_csv(out / f"{role}_predictions.csv", dtype={"dicom_id": str})
        assert list(predictions.columns) == ["dicom_id", *FINDINGS]
        expected = [d for d in index["dicom_id"] if d in set(fold_ids(folds, 0, role))]
        assert predictions["dicom_id"].tolist() == expected  # index order, every image once
        assert predictions[list(FINDINGS)].notna().all().all()
    assert "2 process(es) on cpu (gloo)" in (out / "train.log").read_text()

    # One process with the same per-process batch and twice the accumulation sees the same
    # micro-batches in the same optimizer steps (StepBlockSampler), so BatchNorm normalises the
    # same groups and the gradients are equal: training losses and weights agree to float
    # precision. BatchNorm's running statistics differ (under DDP they are rank 0's, updated by
    # its micro-batches only), so the validation loss, computed with them, agrees only closely.
    single = start(tiny, tmp_path, gpus=1, env=ONE_THREAD)
    one = pd.read_csv(single / "history.csv")
    assert json.loads((single / "done.json").read_text())["batch_plan"]["accumulation_steps"] == 2
    assert one["train_loss"].to_numpy() == pytest.approx(history["train_loss"].to_numpy(), rel=1e-6)
    assert one["val_loss"].to_numpy() == pytest.approx(history["val_loss"].to_numpy(), abs=0.05)
    ours, theirs = learnable(out / "checkpoint_epoch002.pt"), learnable(single / "checkpoint_epoch002.pt")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


@pytest.mark.slow
def test_killed_worker_is_restarted_by_torchrun_and_resumes(tiny, two_process_run, tmp_path):
    marker = tmp_path / "fault_fired"
    env = {**ONE_THREAD, **fault_env("train-batch:epoch=2:batch=1:rank=1", marker)}
    out = start(tiny, tmp_path, gpus=2, max_restarts=1, env=env)
    assert marker.exists()  # rank 1 really was killed in epoch 2
    log = (out / "train.log").read_text()
    assert "resumed from checkpoint_epoch001.pt" in log
    keep = ["epoch", "train_loss", "val_loss", "lr"]
    reference = pd.read_csv(two_process_run / "history.csv")[keep]
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv")[keep], reference)
    ours, theirs = (
        learnable(out / "checkpoint_epoch002.pt"),
        learnable(two_process_run / "checkpoint_epoch002.pt"),
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(data, run_dir, env_of_node=lambda node: ONE_THREAD, **extra):
    """Two torchrun "nodes" on this machine, one process each, c10d rendezvous on 127.0.0.1."""
    from concurrent.futures import ThreadPoolExecutor

    port, job = free_port(), f"two-nodes-{free_port()}"

    def node(rank):
        return start(
            data, run_dir, gpus=1, nnodes=2, node_rank=rank, master_addr="127.0.0.1", master_port=port,
            rdzv_id=job, env=env_of_node(rank), **extra,
        )  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(node, (0, 1)))
    assert outs[0] == outs[1]
    return outs[0]


@pytest.mark.slow
def test_two_nodes_restart_together_after_a_kill_and_end_like_one_node_with_two_processes(
    tiny, two_process_run, tmp_path
):
    """Two torchrun nodes (one process each); node rank 1's worker is killed in epoch 2. Both nodes
    restart their workers, which resume from epoch 1's checkpoint, and the run ends exactly as the
    uninterrupted single-node run with two processes: same history, same weights."""
    marker = tmp_path / "fault_fired"
    fault = fault_env("train-batch:epoch=2:batch=1:rank=1", marker)
    out = two_nodes(tiny, tmp_path, env_of_node=lambda node: {**ONE_THREAD, **fault}, max_restarts=1)
    assert marker.exists()  # a worker really was killed in epoch 2
    done = json.loads((out / "done.json").read_text())
    assert done["complete"] and done["world_size"] == 2
    logs = {name: (out / name).read_text() for name in ("train.log", "train_node1.log")}
    assert all("--nnodes=2" in log and "--rdzv-backend=c10d" in log for log in logs.values())
    assert "resumed from checkpoint_epoch001.pt" in "".join(logs.values())
    # one node's worker was killed, the other node's worker was stopped for the common restart
    killed = [name for name, log in logs.items() if "exitcode: -9" in log]
    stopped = [name for name, log in logs.items() if "closing signal SIGTERM" in log]
    assert len(killed) == 1 and len(stopped) == 1 and killed != stopped
    keep = ["epoch", "train_loss", "val_loss", "lr"]
    reference = pd.read_csv(two_process_run / "history.csv")[keep]
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv")[keep], reference)
    ours, theirs = (
        learnable(out / "checkpoint_epoch002.pt"),
        learnable(two_process_run / "checkpoint_epoch002.pt"),
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
