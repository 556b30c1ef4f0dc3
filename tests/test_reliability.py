"""Nothing lost, nothing silent: the fault and bad-input cases the module tests leave open.

A checkpoint with one flipped weight bit; a full disk while writing the cache, a checkpoint,
the index, the folds or a table; a damaged index and unreadable images met while indexing; a
finding with one class in a test fold; wrong parameters given to ``python -m cxrlib.pipeline``;
an infinite loss; a planted leaked subject met by every reader of ``folds.csv``; two pipelines
on one run folder (two processes). docs/reliability.md lists every scenario with its test.
"""

import errno
import io
import json
import os
import re
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_data import make_tiny_dataset
from torch import nn

import cxrlib.train as train
from cxrlib import cache, dist, metrics, models, paths, pipeline, study
from cxrlib.cache import build_cache, cached_image_path, check_cache, read_manifest
from cxrlib.datasets import index_from_csv, index_from_mimic
from cxrlib.fileio import load_verified, save_verified, sidecar_path, write_csv_atomic, write_text_atomic
from cxrlib.index import read_index, write_index
from cxrlib.labels import FINDINGS, targets_and_mask
from cxrlib.pipeline import run_lock
from cxrlib.presets import resolve
from cxrlib.run_folder import checkpoint_path, load_latest_checkpoint, save_checkpoint
from cxrlib.splits import LeakageError, make_folds, read_folds, write_folds

# ----------------------------------------------------------------------------- a disk that fills up


class FullDisk:
    """Every file opened for writing through ``os.fdopen`` (all atomic writes, checkpoints and
    cache images) shares ``free`` bytes; the write that does not fit writes what fits and fails
    with ENOSPC, as on a full disk, and so does every write after it. ``free = None``: space again."""

    def __init__(self, monkeypatch, free: int | None):
        self.free = free
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            handle = real_fdopen(fd, mode, *args, **kwargs)
            return _FillingFile(handle, self) if set(mode) & set("wax+") else handle

        monkeypatch.setattr(os, "fdopen", fdopen)


class _FillingFile:
    def __init__(self, inner, disk: FullDisk):
        self.inner, self.disk = inner, disk

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if self.disk.free is not None and size > self.disk.free:
            self.inner.write(data[: self.disk.free])
            self.disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.disk.free is not None:
            self.disk.free -= size
        return self.inner.write(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def no_temporaries(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------- 1. a damaged checkpoint, same size


def checkpoint_state(epoch):
    return {"epoch": epoch, "model": {"w": torch.full((64,), float(epoch))}, "history": [{"epoch": epoch}]}


def flip_a_weight_bit(path):
    """Flip one bit inside the first tensor's bytes of a torch.save zip file (size unchanged)."""
    data = bytearray(path.read_bytes())
    record = next(
        i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist() if i.filename.endswith("/data/0")
    )
    # the record's local header holds its name and extra-field lengths at bytes 26-29; data follows
    name_length, extra_length = struct.unpack(
        "<HH", data[record.header_offset + 26 : record.header_offset + 30]
    )
    data[record.header_offset + 30 + name_length + extra_length + 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_weights_is_caught_by_the_checksum_and_the_previous_checkpoint_used(tmp_path):
    save_checkpoint(checkpoint_state(1), tmp_path, 1)
    newest = save_checkpoint(checkpoint_state(2), tmp_path, 2)
    flip_a_weight_bit(newest)
    silently_wrong = torch.load(newest, weights_only=True)["model"]["w"]  # torch.load alone accepts it ...
    assert not torch.equal(silently_wrong, torch.full((64,), 2.0))  # ... with a changed weight
    with pytest.warns(UserWarning, match="checkpoint_epoch002.pt: SHA-256 differs"):
        state, path = load_latest_checkpoint(tmp_path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(64))


# ------------------------------------------------------------------------ 3. disk full: checkpoints


@pytest.mark.parametrize("fails_in", ["checkpoint", "sidecar"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_checkpoint_and_best_model(
    tmp_path, monkeypatch, fails_in
):
    first = save_checkpoint(checkpoint_state(1), tmp_path, 1, keep=1)
    best = save_verified({"w": torch.ones(3)}, tmp_path / paths.BEST_MODEL, {"epoch": 1})
    best_bytes = best.read_bytes()
    buffer = io.BytesIO()
    torch.save(checkpoint_state(2), buffer)
    size = len(buffer.getvalue())
    disk = FullDisk(monkeypatch, free=size // 2 if fails_in == "checkpoint" else size + 20)
    newest = checkpoint_path(tmp_path, 2)
    with pytest.raises(OSError) as caught:
        save_checkpoint(checkpoint_state(2), tmp_path, 2, keep=1)
    # a clear error: ENOSPC and the file that could not be written
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(newest if fails_in == "checkpoint" else sidecar_path(newest))
    with pytest.raises(OSError, match=f"No space left on device: '{re.escape(str(best))}'"):
        save_verified({"w": torch.zeros(3)}, best, {"epoch": 2})
    disk.free = None

    assert no_temporaries(tmp_path)
    assert best.read_bytes() == best_bytes and torch.equal(load_verified(best)["w"], torch.ones(3))
    # keep=1 would delete epoch 1 once epoch 2 is complete: it never was, so epoch 1 is still there
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        state, path = load_latest_checkpoint(tmp_path)
    assert path == first and state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(64))
    # a checkpoint file without its sidecar is named and passed over, never loaded
    assert any("checkpoint_epoch002.pt" in str(w.message) for w in caught_warnings) == (fails_in == "sidecar")


def test_disk_full_during_training_fails_in_one_line_keeps_the_last_checkpoint_and_resumes(
    tmp_path, monkeypatch, capsys
):
    data = make_tiny_dataset(tmp_path / "data", resolutions=(32,), subjects=8, folds=2)
    out = tmp_path / "run"
    argv = [
        "--index", str(data.index), "--folds", str(data.folds), "--cache", str(data.cache),
        "--resolution", "32", "--fold", "0", "--out", str(out), "--weights", "none",
        "--batch-size", "4", "--effective-batch", "4", "--max-train-images", "4", "--workers", "0",
    ]  # fmt: skip
    assert train.main([*argv, "--epochs", "1"]) == 0
    first = checkpoint_path(out, 1).read_bytes()
    capsys.readouterr()
    disk = FullDisk(monkeypatch, free=0)
    assert train.main([*argv, "--epochs", "2"]) == 1  # epoch 2 trains; writing its results fails
    error = capsys.readouterr().err.split("\r")[-1]  # after the progress bar, which clears its line
    assert error.startswith("error: [Errno 28] No space left on device: ") and error.count("\n") == 1
    assert str(out) in error and "run the same command again to resume" in error
    assert no_temporaries(out) and checkpoint_path(out, 1).read_bytes() == first
    assert not checkpoint_path(out, 2).exists() and not (out / "done.json").exists()
    disk.free = None
    assert train.main([*argv, "--epochs", "2"]) == 0
    assert json.loads((out / "done.json").read_text())["epochs_run"] == 2


# -------------------------------------------------------------------------- 3. disk full: the cache


@pytest.fixture(scope="module")
def mimic_index(fake_mimic):
    return index_from_mimic(fake_mimic.root)


def test_disk_full_while_caching_keeps_what_was_cached_and_the_rerun_skips_it(
    mimic_index, tmp_path, monkeypatch
):
    folder = tmp_path / "cache"
    build_cache(mimic_index, folder, [16], workers=1, progress=False)
    monkeypatch.setattr(cache, "MANIFEST_SAVE_SECONDS", -1.0)  # save the manifest after every image
    manifest_bytes = (folder / cache.MANIFEST_NAME).stat().st_size
    disk = FullDisk(monkeypatch, free=4 * manifest_bytes)  # room for a few images and manifests
    with pytest.raises(OSError) as caught:
        build_cache(mimic_index, folder, [16, 32], workers=1, progress=False)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.startswith(str(folder))
    disk.free = None

    assert no_temporaries(folder)
    manifest = read_manifest(folder)  # the manifest is a complete earlier version, not a torn one
    assert check_cache(mimic_index, folder, 16) == []  # everything cached before is intact
    done = manifest.loc[manifest["resolution"] == 32, "dicom_id"].tolist()
    assert 0 < len(done) < len(mimic_index)  # the disk filled up part way
    assert check_cache(mimic_index[mimic_index["dicom_id"].isin(done)], folder, 32) == []
    stamps = {d: cached_image_path(folder, 32, d).stat().st_mtime_ns for d in done}

    report = build_cache(mimic_index, folder, [16, 32], workers=1, progress=False)
    assert report.skipped == len(mimic_index) + len(done)
    assert report.written == len(mimic_index) - len(done)
    assert check_cache(mimic_index, folder, 32) == []
    assert {d: cached_image_path(folder, 32, d).stat().st_mtime_ns for d in done} == stamps  # not redone


def test_disk_full_cache_command_fails_in_one_line_and_says_how_to_continue(
    mimic_index, tmp_path, monkeypatch, capsys
):
    index_csv = write_index(mimic_index, tmp_path / "index.csv")
    FullDisk(monkeypatch, free=0)
    argv = ["--index", str(index_csv), "--out", str(tmp_path / "c"), "--resolutions", "16"]
    assert cache.main([*argv, "--workers", "1", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: [Errno 28] No space left on device: ") and error.count("\n") == 1
    assert str(tmp_path / "c") in error and "run the same command again" in error


# --------------------------------------------------------------- 3. disk full: index, folds, tables


def write_and_read(kind, image_index):
    """(write(value, path), read(path), first value, second value) for each file a later step reads."""
    if kind == "index":
        return write_index, read_index, image_index, image_index.iloc[:5]
    index = pd.DataFrame(
        {"dicom_id": [f"d{i}" for i in range(12)], "subject_id": [f"s{i}" for i in range(12)]}
    )
    if kind == "folds":
        return write_folds, read_folds, make_folds(index, k=3, seed=0), make_folds(index, k=3, seed=1)
    if kind == "table":
        table = pd.DataFrame({"finding": list(FINDINGS), "auc": np.linspace(0.5, 0.9, 14)})
        return write_csv_atomic, pd.read_csv, table, table.assign(auc=0.7)
    if kind == "provenance":
        return write_text_atomic, lambda p: json.loads(p.read_text()), '{"steps": 1}', '{"steps": 2}'
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["index", "folds", "table", "provenance"])
def test_disk_full_while_writing_index_folds_or_a_table_keeps_the_previous_file(
    mimic_index, tmp_path, monkeypatch, kind
):
    write, read, first, second = write_and_read(kind, mimic_index)
    path = tmp_path / ("provenance.json" if kind == "provenance" else f"{kind}.csv")
    write(first, path)
    before = path.read_bytes()
    disk = FullDisk(monkeypatch, free=5)  # the new version starts to be written, then the disk is full
    with pytest.raises(OSError, match=f"No space left on device: '{re.escape(str(path))}'"):
        write(second, path)
    disk.free = None
    assert path.read_bytes() == before and no_temporaries(tmp_path)
    read(path)  # still a complete, valid file for the next step


# --------------------------------------------------------------- 4, 5. bad files met while indexing


@pytest.mark.parametrize("bad", ["zero-byte", "not-an-image"])
def test_an_unreadable_image_listed_in_a_csv_is_named_with_line_and_path(tmp_path, bad):
    Image.new("L", (40, 48), 90).save(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"" if bad == "zero-byte" else b"<html>not found</html>")
    table = pd.DataFrame(
        {"path": ["good.jpg", "bad.jpg"], "patient_id": ["p1", "p2"], "finding": ["NORMAL", "PNEUMONIA"]}
    )
    table.to_csv(tmp_path / "labels.csv", index=False)
    expected = rf"labels.csv: line 3: cannot read image {re.escape(str(tmp_path / 'bad.jpg'))}"
    with pytest.raises(ValueError, match=expected):
        index_from_csv(tmp_path / "labels.csv", label_map="kermany")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop_column", r"index.csv: missing column\(s\) \['view'\]"),
        ("duplicate_id", r"index.csv: duplicate dicom_id '.+' \(CSV lines \[2, 20\]\)"),
        ("label_2", r"index.csv: column 'Fracture', CSV line 5: value 2\.0 is not 1, 0 or blank"),
    ],
    ids=["drop_column", "duplicate_id", "label_2"],
)
def test_a_damaged_index_csv_is_refused_naming_file_column_and_line(mimic_index, tmp_path, damage, message):
    frame = mimic_index.copy()
    if damage == "drop_column":
        frame = frame.drop(columns=["view"])  # a dropped finding column is a smaller label set
    elif damage == "duplicate_id":
        frame = pd.concat([frame, frame.iloc[[0]]], ignore_index=True)
    else:
        frame["Fracture"] = frame["Fracture"].astype(object)
        frame.loc[3, "Fracture"] = "2.0"
    frame.to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(ValueError, match=message):
        read_index(tmp_path / "index.csv")


# ------------------------------------------------------------ 5. a finding with one class in a fold


def test_a_finding_with_one_class_in_a_fold_gives_a_documented_nan_and_a_warning():
    ids = [f"d{i}" for i in range(8)]
    labels = np.tile([0.0, 1.0], (14, 4)).T  # both classes for every finding ...
    labels[:, FINDINGS.index("Fracture")] = 0.0  # ... but Fracture: only negatives in this test fold
    labels[:, FINDINGS.index("Edema")] = np.nan  # and Edema: no known label
    index = pd.DataFrame(labels, columns=list(FINDINGS)).assign(dicom_id=ids, subject_id=ids)
    scores = pd.DataFrame(np.random.default_rng(0).normal(size=(8, 14)), index=ids, columns=list(FINDINGS))
    with pytest.warns(
        UserWarning, match=r"AUC is NaN for 2 of 14 .*only negative labels: 1 \(e\.g\. Fracture"
    ):
        table = metrics.auc_table({(32, 0): scores}, index)
    rows = table.set_index("finding")
    assert (
        np.isnan(rows.at["Fracture", "auc"]) and rows.at["Fracture", "reason"] == metrics.REASON_ONE_CLASS_NEG
    )
    assert np.isnan(rows.at["Edema", "auc"]) and rows.at["Edema", "reason"] == metrics.REASON_NO_LABELS
    table3 = metrics.table3(table).set_index("finding")
    assert table3.at["Fracture", "32"] == "n/a"
    assert table3.at["Average", "32_mean"] == pytest.approx(rows["auc"].dropna().mean())  # NaN left out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning when every AUC is defined
        metrics.auc_table({(32, 0): scores}, index.assign(Fracture=labels[:, 0], Edema=labels[:, 0]))


# ----------------------------------------------------------- 6. wrong parameters, real entry points


@pytest.fixture
def no_step_runs(monkeypatch):
    """The pipeline must refuse before its first step: a step that starts fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline started a step")

    monkeypatch.setattr(pipeline, "execute_step", refuse)


def test_an_unknown_preset_fails_the_command_in_one_line_before_any_work(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cxrlib.pipeline", "--preset", "nope", "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr.startswith("error: unknown preset 'nope'; choose one of [")
        and result.stderr.count("\n") == 1
    )
    assert not run.exists()


MORE_GPUS = str(max(4, torch.cuda.device_count() + 1))


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--preset", "nope"], r"unknown preset 'nope'", id="unknown-preset"),
        pytest.param(
            ["--preset", "smoke", "--resolutions", "48"],
            r"resolution 48 must be a multiple of 32",
            id="resolution-48",
        ),
        pytest.param(
            ["--preset", "smoke", "--resolutions", "16"],
            r"resolution 16 must be a multiple of 32 and at least 32",
            id="resolution-16",
        ),
        pytest.param(
            ["--preset", "smoke", "--folds", "7"], r"fold 7 does not exist with folds.k = 3", id="fold-7-of-3"
        ),
        pytest.param(
            ["--preset", "smoke", "--gpus", MORE_GPUS],
            rf"gpus={MORE_GPUS}: (only \d+ GPU|no CUDA GPU is visible)",
            id="more-gpus-than-present",
        ),
        pytest.param(
            ["--preset", "mimic"], r"data source 'mimic' needs a data root", id="mimic-no-data-root"
        ),
        pytest.param(
            ["--preset", "mimic", "--data-root", "EMPTY"],
            r"neither mimic-cxr-2.0.0-metadata.csv.gz nor",
            id="mimic-data-root-without-csvs",
        ),
        pytest.param(
            ["--preset", "mimic", "--data-root", "ABSENT"],
            r"data root not found: .*ABSENT",
            id="mimic-data-root-absent",
        ),
        pytest.param(
            ["--preset", "kermany", "--data-root", "EMPTY"],
            r"EMPTY has no train/ or test/ folder; download ChestXRay2017.zip .* and unpack it",
            id="kermany-data-root-without-images",
        ),
    ],
)
def test_wrong_pipeline_parameters_fail_in_one_line_before_any_work(
    tmp_path, capsys, no_step_runs, argv, message
):
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("EMPTY", "ABSENT") else a for a in argv]
    run, figures = tmp_path / "run", tmp_path / "figures"
    assert pipeline.main([*argv, "--run-dir", str(run), "--figures-dir", str(figures)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert re.search(message, error), error
    assert not run.exists() and not figures.exists()


# ------------------------------------------------------------------------------ 7. an infinite loss


class InfiniteOnCall(nn.Module):
    """Training forward call ``call`` (from 1) returns +inf logits; keeps the weights it saw then."""

    def __init__(self, call):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 14)
        )
        self.call, self.count, self.weights_then = call, 0, None

    def forward(self, x):
        out = self.net(x)
        self.count += 1
        if self.count == self.call:
            self.weights_then = {k: v.detach().clone() for k, v in self.state_dict().items()}
            out = out + float("inf")  # with all-negative targets the loss is +inf (not NaN)
        return out


class NegativeImages(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.images = torch.randint(
            0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        self.targets, self.masks = targets_and_mask(torch.zeros(n, 14))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i], self.masks[i]


def epoch_with_an_infinite_loss(skip_nonfinite: bool):
    dataset, model = NegativeImages(), InfiniteOnCall(call=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = train.BatchPlan(4, 1, 1, 4)  # 8 images: two optimizer steps of one micro-batch each
    runtime = train.Runtime(
        dist.DistInfo(0, 1, 0, torch.device("cpu"), None), None, False, plan, skip_nonfinite, False
    )
    loader = models.make_loader(
        dataset, 4, train.StepBlockSampler(dataset, 1, 0, 4, 1, seed=0), 0, torch.device("cpu"), 0
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    augmentation = train.epoch_augmentation(len(dataset), 0, 1)
    return model, lambda: train.train_one_epoch(model, loader, optimizer, scaler, runtime, 3, augmentation)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_an_infinite_loss_is_named_by_epoch_and_batch_and_never_applied(skip_nonfinite):
    model, run_epoch = epoch_with_an_infinite_loss(skip_nonfinite)
    if skip_nonfinite:
        result = run_epoch()
        assert result["skipped_steps"] == 1 and np.isfinite(result["train_loss"])
    else:
        with pytest.raises(
            train.NonFiniteLossError, match=r"non-finite training loss \(NaN or inf\) in epoch 3, batch 2"
        ):
            run_epoch()
    after = model.state_dict()
    assert all(torch.equal(after[k], model.weights_then[k]) for k in after)  # the bad step changed nothing


# ------------------------------------------------------------- 9. leakage re-verified on every load


@pytest.fixture
def leaked(tmp_path):
    """A tiny dataset whose folds.csv puts one subject's two images in train and val of fold 0."""
    data = make_tiny_dataset(tmp_path / "data", resolutions=(32,), subjects=8, folds=2)
    folds = pd.read_csv(data.folds, dtype=str, keep_default_na=False)
    subject = folds.loc[folds["role_0"] == "train", "subject_id"].iloc[0]
    folds.loc[folds.index[folds["subject_id"] == subject][1], "role_0"] = "val"
    folds.to_csv(data.folds, index=False)  # planted by hand, not through write_folds
    return data, subject


def test_a_planted_leaked_subject_is_refused_by_the_trainer_before_training(leaked, tmp_path, capsys):
    data, subject = leaked
    out = tmp_path / "run"
    argv = [
        "--index", str(data.index), "--folds", str(data.folds), "--cache", str(data.cache),
        "--resolution", "32", "--fold", "0", "--out", str(out), "--epochs", "1", "--weights", "none",
        "--batch-size", "4", "--effective-batch", "4", "--max-train-images", "4",  # short, if it ran at all
    ]  # fmt: skip
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and f"subject {subject} is in roles" in error
    assert not out.exists()  # refused before anything was trained or written


def test_a_planted_leaked_subject_is_refused_by_every_other_reader_of_the_folds(leaked):
    data, subject = leaked
    with pytest.raises(LeakageError, match=subject):
        study.load_data(resolve("smoke", run_dir=str(data.root)))  # what every notebook reads
    with pytest.raises(LeakageError, match=subject):
        metrics.load_predictions(data.root, [32], [0])  # before any prediction is scored


# ----------------------------------------------------------------- 10. two pipelines, two processes

HOLD_LOCK = """
import sys
from cxrlib.pipeline import run_lock
from cxrlib.presets import resolve
from cxrlib.run_folder import checkpoint_path, load_latest_checkpoint, save_checkpoint
with run_lock(resolve("smoke", run_dir=sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes stdin
"""


def test_a_second_pipeline_process_is_refused_while_the_first_holds_the_run_folder(
    tmp_path, capsys, no_step_runs
):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = run / pipeline.LOCK
        record = lock.read_text()
        assert record.startswith(f"pid {holder.pid} on ")
        assert (
            pipeline.main(["--preset", "smoke", "--run-dir", str(run), "--figures-dir", str(tmp_path / "f")])
            == 1
        )
        error = capsys.readouterr().err
        assert error.startswith(f"error: another pipeline is running on {run} (pid {holder.pid} on ")
        assert lock.read_text() == record  # the refused run did not touch the holder's record ...
        assert sorted(p.name for p in run.iterdir()) == [pipeline.LOCK]  # ... nor wrote anything
        assert holder.poll() is None  # and the first one runs on
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    assert holder.returncode == 0
    with run_lock(resolve("smoke", run_dir=str(run))):  # free again once the first has finished
        pass
