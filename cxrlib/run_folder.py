"""A training's folder (``--out``): lock, resume, checkpoints and results (docs/training.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import __version__, fileio, paths
from . import dist as cxrdist
from .cache import CXRDataset
from .models import logits_frame, predict_arrays

OPTIONAL_KEYS = {"max_train_images": None, "tiles": 1, "global_context": False}  # value before the key
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch(\d+)\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``<run_dir>/checkpoint_epoch<NNN>.pt``."""
    return Path(run_dir) / f"checkpoint_epoch{int(epoch):03d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint file in ``run_dir``, newest first."""
    matches = ((CHECKPOINT_PATTERN.match(p.name), p) for p in Path(run_dir).glob("checkpoint_epoch*.pt"))
    return sorted(((int(m[1]), p) for m, p in matches if m), reverse=True)


def _remove(path: Path) -> None:
    fileio.sidecar_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def save_checkpoint(state: dict, run_dir: str | os.PathLike, epoch: int, keep: int = 2) -> Path:
    """Write ``state`` as epoch ``epoch``'s checkpoint, then keep only the newest ``keep``."""
    path = fileio.save_verified(state, checkpoint_path(run_dir, epoch), {"epoch": int(epoch)})
    for old_epoch, old in list_checkpoints(run_dir)[keep:]:
        if old_epoch < epoch:
            _remove(old)
    return path


def load_latest_checkpoint(run_dir: str | os.PathLike) -> tuple[dict, Path] | None:
    """The newest checkpoint that verifies and its path, or None (none verifies: CheckpointError)."""
    problems = []
    for _, path in list_checkpoints(run_dir):
        try:
            state = fileio.load_verified(path)
        except fileio.CheckpointError as error:
            problems.append(str(error))
            warnings.warn(f"ignoring checkpoint: {error}; trying the previous one", stacklevel=2)
            continue
        if not isinstance(state, dict) or "epoch" not in state:
            problems.append(f"{path}: not a training checkpoint")
            continue
        return state, path
    if problems:
        raise fileio.CheckpointError(
            f"no usable checkpoint in {run_dir}: " + "; ".join(problems) + ". Remove the damaged files or "
            "start over with --no-resume"
        )
    return None


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python ``random`` states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    numpy = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos)}
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy | {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only where the same GPUs are present)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def log(message: str) -> None:
    """Print on the main process only."""
    if not cxrdist.is_dist() or torch.distributed.get_rank() == 0:
        print(f"[cxrlib.train] {message}", flush=True)


@contextlib.contextmanager
def run_folder_lock(out: Path, is_main: bool):
    """Rank 0 holds ``out``'s lock for the run; a second run is a ``FolderBusyError``."""
    if not is_main:
        yield
        return
    try:
        with fileio.exclusive_lock(out / paths.LOCK):
            yield
    except fileio.FolderBusyError as holder:
        raise fileio.FolderBusyError(
            f"another training run is writing {out} ({holder}); wait for it to finish or stop it, "
            f"or give this one another --out"
        ) from None


def run_fingerprint(args: argparse.Namespace, effective_batch: int) -> dict:
    """The arguments a resumed run must share with the checkpoint it continues."""
    return {
        "resolution": args.resolution, "fold": args.fold,
        "index_sha256": fileio.sha256_file(args.index), "folds_sha256": fileio.sha256_file(args.folds),
        "seed": args.seed, "effective_batch": effective_batch, "weights": str(args.weights),
        "max_train_images": args.max_train_images, "global_context": args.global_context,
    }  # fmt: skip


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    """A one-line ``ConfigError`` when ``saved`` (a checkpoint's, done.json's) is another run's."""
    there, now = OPTIONAL_KEYS | saved, OPTIONAL_KEYS | current
    differ = [k for k in now if there.get(k) != now[k]]
    if differ:
        details = ", ".join(f"{k}: {there.get(k)!r} there, {now[k]!r} now" for k in differ)
        raise fileio.ConfigError(
            f"{where} belongs to a run with other settings ({details}); use another --out, "
            "or --no-resume to start this run over"
        )


def jsonable_args(args: argparse.Namespace) -> dict:
    """The command's arguments as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


class RunFolder:
    """The files of one training in ``out``; rank 0 (``is_main``) writes them."""

    def __init__(self, out: Path, is_main: bool, fingerprint: dict):
        self.out, self.is_main, self.fingerprint = Path(out), is_main, fingerprint
        self.done_file = self.out / paths.DONE

    def prepare(self, start_over: bool) -> None:
        """Create the folder; with ``start_over`` (``--no-resume``) delete the earlier run's files."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if start_over:
                for _, path in list_checkpoints(self.out):
                    _remove(path)
                for name in (*paths.FOLD_RESULTS, paths.BEST_MODEL, f"{paths.BEST_MODEL}.json"):
                    (self.out / name).unlink(missing_ok=True)
            for tmp in self.out.glob(".*.tmp"):  # left by a write that was killed
                tmp.unlink(missing_ok=True)
        cxrdist.barrier()

    def finished(self, epochs: int) -> dict | None:
        """``done.json`` of a complete run with these settings, else None."""
        if not self.done_file.is_file():
            return None
        done = json.loads(self.done_file.read_text())
        check_fingerprint(done.get("fingerprint", {}), self.fingerprint, self.done_file)
        if done.get("stopped_early") or done.get("epochs_run", 0) >= epochs:
            log(f"{self.out} is already complete ({done.get('reason')}); nothing to do (--no-resume to redo)")
            return done
        log(f"{self.done_file}: continuing to {epochs} epochs")
        cxrdist.barrier()
        if self.is_main:
            self.done_file.unlink()
        return None

    def resume(self, model, optimizer, scheduler, scaler, stopper, info) -> tuple[int, list[dict]]:
        """Load the newest good checkpoint (chosen by rank 0) into every object; (epoch, history)."""
        found = load_latest_checkpoint(self.out) if info.is_main else None
        epoch = cxrdist.all_gather_objects(found[0]["epoch"] if found else 0)[0]
        if epoch == 0:
            return 0, []
        path = checkpoint_path(self.out, epoch)
        state = found[0] if found else fileio.load_verified(path)
        check_fingerprint(state.get("fingerprint", {}), self.fingerprint, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():  # empty when saved without fp16
            scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        restore_rng_state(state["rng"])
        cxrdist.barrier()
        if self.is_main:
            for newer_epoch, newer in list_checkpoints(self.out):
                if newer_epoch > epoch:  # failed verification above: remove so it never shadows a good one
                    _remove(newer)
            best_epoch, best = state["early_stopping"]["best_epoch"], self.out / paths.BEST_MODEL
            side = fileio.sidecar_path(best)
            recorded = json.loads(side.read_text()).get("epoch") if side.is_file() else None
            if recorded != best_epoch and best_epoch == epoch:  # a kill came between the two writes
                fileio.save_verified(model.state_dict(), best, {"epoch": best_epoch})
            elif recorded != best_epoch:
                warnings.warn(
                    f"{best} is from epoch {recorded}, the checkpoint's best is {best_epoch}", stacklevel=2
                )
            fileio.write_csv_atomic(pd.DataFrame(state["history"]), self.out / paths.HISTORY)
        log(f"resumed from {path.name} (epoch {epoch}, best epoch {stopper.best_epoch})")
        return epoch, list(state["history"])

    def save_epoch(self, objects, history: list[dict], args, plan, improved: bool) -> None:
        """After an epoch: checkpoint, best model, ``history.csv``, then a barrier."""
        if self.is_main:
            (model, optimizer, scheduler, scaler, stopper), epoch = objects, history[-1]["epoch"]
            state = {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "early_stopping": stopper.state_dict(), "history": history, "rng": capture_rng_state(),
                "args": jsonable_args(args), "fingerprint": self.fingerprint,
                "batch_plan": dataclasses.asdict(plan), "version": __version__,
                "torch_version": str(torch.__version__),
            }  # fmt: skip
            save_checkpoint(state, self.out, epoch, args.keep_checkpoints)
            if improved:
                metadata = {"epoch": epoch, "val_loss": history[-1]["val_loss"]}
                fileio.save_verified(model.state_dict(), self.out / paths.BEST_MODEL, metadata)
            fileio.write_csv_atomic(pd.DataFrame(history), self.out / paths.HISTORY)
        cxrdist.barrier()

    def load_best(self, model: nn.Module, device: torch.device) -> None:
        """The best epoch's weights (verified against their sidecar) into ``model``."""
        cxrdist.barrier()
        model.load_state_dict(fileio.load_verified(self.out / paths.BEST_MODEL, map_location=device))

    def write_predictions(self, model: nn.Module, frame: pd.DataFrame, split: str, args, rt) -> None:
        """The model's logits for ``frame``'s images: each process scores its share, rank 0 writes."""
        options = {"cache_format": args.cache_format, "skip_bad_images": args.skip_bad_images}
        dataset = CXRDataset(frame, args.resolution, args.cache, **options)
        share = list(range(rt.info.rank, len(dataset), rt.info.world_size))
        batch = 2 * rt.plan.per_gpu_batch
        found, logits = predict_arrays(
            model, dataset, batch, rt.device, rt.amp, rt.workers, rt.channels_last, share
        )
        shares = cxrdist.all_gather_objects((found, logits))
        if self.is_main:
            positions, logits = (np.concatenate([share[i] for share in shares]) for i in (0, 1))
            table = logits_frame(frame["dicom_id"].tolist(), positions, logits, dataset.findings)
            fileio.write_csv_atomic(table, self.out / paths.PREDICTIONS[split])

    def write_done(self, summary: dict) -> None:
        """``done.json``, written last: the training is complete."""
        if self.is_main:
            fileio.write_text_atomic(json.dumps(summary, indent=1), self.done_file)
        cxrdist.barrier()


def set_aside_stale_run(folder: Path, index_path: Path, folds_path: Path) -> Path | None:
    """Rename a finished training from another index or fold file; the new name or None."""
    done = folder / paths.DONE
    if not done.is_file():
        return None
    saved = json.loads(done.read_text()).get("fingerprint", {})
    current = {"index_sha256": fileio.sha256_file(index_path), "folds_sha256": fileio.sha256_file(folds_path)}
    if all(saved.get(key) == value for key, value in current.items()):
        return None
    stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(stale)
    warnings.warn(f"{folder} was trained on another index or fold file; moved it to {stale}", stacklevel=2)
    return stale


def read_histories(run: Path, resolutions, folds) -> dict[tuple[int, int], pd.DataFrame]:
    """``history.csv`` of every (resolution, fold) of ``run`` that has one (missing runs are skipped)."""
    found = {(int(r), int(f)): paths.fold_dir(run, r, f) / paths.HISTORY for r in resolutions for f in folds}
    return {key: pd.read_csv(path) for key, path in found.items() if path.is_file()}
