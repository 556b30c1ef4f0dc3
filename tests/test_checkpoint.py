"""Checkpoints: verified on load, the previous good one used when the newest is damaged, never code run."""

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

from cxrlib.fileio import CheckpointError, load_verified, save_verified, sidecar_path
from cxrlib.models import load_trained_model
from cxrlib.run_folder import (
    RunFolder,
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCode:
    """Unpickling this would create ``marker``: what a planted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_malicious(path, marker):
    """A torch.save'd file whose unpickling would run a shell command, with a matching sidecar."""
    torch.save({"epoch": 9, "model": RunsCode(marker)}, path)
    data = path.read_bytes()
    import hashlib

    sidecar_path(path).write_text(
        json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    )


def state(epoch):
    return {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}, "history": [{"epoch": epoch}]}


def test_round_trip_and_only_newest_two_kept(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(state(epoch), tmp_path, epoch, keep=2)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [3, 2]
    assert not sidecar_path(checkpoint_path(tmp_path, 1)).exists()
    loaded, path = load_latest_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 3)
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_sidecar"])
def test_damaged_newest_checkpoint_falls_back_to_previous_good_one(tmp_path, damage):
    save_checkpoint(state(1), tmp_path, 1)
    newest = save_checkpoint(state(2), tmp_path, 2)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        sidecar_path(newest).unlink()
    with pytest.warns(UserWarning, match="checkpoint_epoch002.pt"):
        loaded, path = load_latest_checkpoint(tmp_path)
    assert loaded["epoch"] == 1 and path == checkpoint_path(tmp_path, 1)


def test_no_usable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    only = save_checkpoint(state(1), tmp_path, 1)
    only.write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="--no-resume"):
            load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "empty") is None


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path, 1)

    def crash(tmp, target):
        assert os.path.getsize(tmp) > 0  # the complete temporary file, not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(2), tmp_path, 2)
    monkeypatch.undo()
    assert not checkpoint_path(tmp_path, 2).exists()
    assert load_latest_checkpoint(tmp_path)[0]["epoch"] == 1
    (tmp_path / ".checkpoint_epoch002.pt.abc.tmp").write_bytes(b"left by a SIGKILL")
    RunFolder(tmp_path, True, {}).prepare(start_over=False)  # as a resumed training starts
    assert not list(tmp_path.glob(".*.tmp")) and checkpoint_path(tmp_path, 1).is_file()


def test_planted_code_running_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "code_ran"
    save_checkpoint(state(1), tmp_path, 1)
    planted = checkpoint_path(tmp_path, 2)
    plant_malicious(planted, marker)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_verified(planted)
    with pytest.warns(UserWarning, match="weights_only"):
        loaded, _ = load_latest_checkpoint(tmp_path)
    assert loaded["epoch"] == 1
    best = tmp_path / "best_model.pt"
    plant_malicious(best, marker)
    with pytest.raises(ValueError, match="weights_only"):
        load_trained_model(tmp_path)
    assert not marker.exists()
    # the same file loaded the unsafe way would have run the command: the test plants a real threat
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_verified({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_verified(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]
