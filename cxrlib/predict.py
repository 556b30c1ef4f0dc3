"""Logits of a trained model for any images at any resolution (val/test predictions, train x test matrix).

:func:`predict_logits` scores a :class:`cxrlib.cache.CXRDataset` (uint8 images; the ImageNet
normalisation runs on the device in batches) and returns one row per image: ``dicom_id``, then
one logit column per finding of the dataset's label set (``dataset.findings``: the index's finding
columns; CheXpert's 14 by default), in the dataset's order.
:func:`load_trained_model` rebuilds the network from a run folder's ``best_model.pt`` (checked
against its sidecar) or from any weights file, always with ``weights_only=True``.

Command line (scores a fold's role, or every image of the index, with a model trained at any
resolution; this gives the train-resolution x test-resolution matrix)::

    python -m cxrlib.predict --model runs/mimic/res512/fold0 --index index.csv --cache CACHE \\
        --resolution 1024 --folds folds.csv --fold 0 --role test --out preds_512_on_1024.csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import paths
from .cache import CXRDataset, collate_skip_none
from .fileio import CheckpointError, load_verified, write_csv_atomic
from .index import read_index
from .labels import FINDINGS
from .loaders import IndexedDataset
from .models import build_model, extract_state_dict, load_state_dict_file, load_weights_into
from .runtime import amp_dtype, autocast, model_input, resolve_device

INFERENCE_BATCH_PIXELS = 64 * 512 * 512


def inference_batch(resolution: int) -> int:
    """Images per batch when scoring at ``resolution`` outside training: 64 up to 512 px, then the
    same number of pixels (16 at 1024 px, 4 at 2048 px), so the memory does not grow with the size."""
    return max(1, min(64, INFERENCE_BATCH_PIXELS // int(resolution) ** 2))


@torch.no_grad()
def predict_arrays(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    num_workers: int = 0,
    channels_last: bool | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, logits) for the items of ``dataset`` that could be read, in dataset order.

    ``amp`` is the autocast dtype (``None`` for float32); ``channels_last`` defaults to
    True on CUDA. ``model`` is put in eval mode on ``device``.
    """
    device = torch.device(device)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skip_none,
    )
    positions, logits = [], []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
        if batch is None:
            continue
        index, images = batch[0], batch[1]
        with autocast(device, amp):
            out = model(model_input(images.to(device, non_blocking=True), channels_last))
        positions.append(index.numpy())
        logits.append(out.float().cpu().numpy())
    if not positions:
        width = len(getattr(dataset, "findings", FINDINGS))
        return np.zeros(0, dtype=np.int64), np.zeros((0, width), dtype=np.float32)
    return np.concatenate(positions), np.concatenate(logits)


def logits_frame(
    dicom_ids: list[str], positions: np.ndarray, logits: np.ndarray, findings: list[str] | None = None
) -> pd.DataFrame:
    """The predictions table: ``dicom_id`` then one column per finding (``findings``, default
    CheXpert's 14), rows in position order.

    Images that were skipped (absent from ``positions``) are left out with a warning naming them.
    A model whose outputs do not match the label set is a ``ValueError`` saying both counts.
    """
    findings = list(FINDINGS if findings is None else findings)
    if logits.ndim != 2 or logits.shape[1] != len(findings):
        raise ValueError(
            f"the model has {logits.shape[-1]} outputs but the label set has {len(findings)} findings "
            f"({findings[:3]}...): it was trained on another label set"
        )
    order = np.argsort(positions, kind="stable")
    positions, logits = positions[order], logits[order]
    frame = pd.DataFrame(logits.astype(np.float64), columns=findings)
    frame.insert(0, "dicom_id", [dicom_ids[i] for i in positions])
    missing = sorted(set(range(len(dicom_ids))) - set(positions.tolist()))
    if missing:
        names = [dicom_ids[i] for i in missing[:5]]
        warnings.warn(
            f"{len(missing)} image(s) could not be read and have no prediction (first: {names})", stacklevel=2
        )
    return frame


def predict_logits(
    model: nn.Module,
    dataset: CXRDataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Logits for every image of ``dataset``: ``dicom_id`` then one column per finding of its label
    set (``dataset.findings``), dataset order."""
    positions, logits = predict_arrays(
        model, dataset, batch_size, device, amp, num_workers, progress=progress
    )
    return logits_frame(list(dataset.dicom_ids), positions, logits, getattr(dataset, "findings", None))


def trained_tiles(folder: Path) -> int:
    """The ``--tiles`` a run folder's model was trained with (its ``done.json``; 1 without one)."""
    done = folder / paths.DONE
    if not done.is_file():
        return 1
    return int(json.loads(done.read_text()).get("args", {}).get("tiles", 1))


def load_trained_model(
    source: str | os.PathLike, map_location: str | torch.device = "cpu", memory_efficient: bool = False
) -> nn.Module:
    """DenseNet121 with trained weights, in eval mode.

    ``source``: a run folder (its ``best_model.pt``, verified against the sidecar), a file
    written with a sidecar (``best_model.pt``, a checkpoint), or a plain weights file. Every
    path loads with ``weights_only=True``; a file that would run code raises ``ValueError``.
    """
    source = Path(source)
    path = source / paths.BEST_MODEL if source.is_dir() else source
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path} (train it first, or give a weights file)")
    if Path(f"{path}.json").is_file():
        try:
            state = extract_state_dict(load_verified(path, map_location), source=str(path))
        except CheckpointError as error:
            raise ValueError(str(error)) from error
    else:
        state = load_state_dict_file(path, map_location)
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else len(FINDINGS)
    global_context = any(key.startswith("features.globalcontext.") for key in state)
    model = build_model(
        "none", num_classes, memory_efficient, tiles=trained_tiles(path.parent), global_context=global_context
    )
    load_weights_into(model, state, source=str(path))
    return model.eval()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, type=Path, help="run folder (best_model.pt) or weights file"
    )
    parser.add_argument("--index", required=True, type=Path, help="index.csv")
    parser.add_argument("--cache", required=True, type=Path, help="image cache folder")
    parser.add_argument("--resolution", required=True, type=int, help="test resolution in pixels")
    parser.add_argument("--folds", type=Path, default=None, help="folds.csv (with --fold and --role)")
    parser.add_argument("--fold", type=int, default=None, help="fold number (default: every image)")
    parser.add_argument(
        "--role", default="test", choices=("train", "val", "test"), help="role (default test)"
    )
    parser.add_argument("--out", required=True, type=Path, help="predictions CSV to write")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast")
    parser.add_argument("--cache-format", default="png", choices=("png", "jpg"), help="cache file format")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from .splits import fold_ids, read_folds

    try:
        index = read_index(args.index)
        if args.fold is not None:
            if args.folds is None:
                raise ValueError("--fold needs --folds")
            ids = set(fold_ids(read_folds(args.folds, index), args.fold, args.role))
            index = index[index["dicom_id"].isin(ids)].reset_index(drop=True)
        device = resolve_device(args.device)
        model = load_trained_model(args.model, map_location="cpu")
        dataset = CXRDataset(index, args.resolution, args.cache, cache_format=args.cache_format)
        frame = predict_logits(
            model, dataset, args.batch_size, device, amp_dtype(device, args.amp), args.workers, progress=True
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_csv_atomic(frame, args.out)
    print(f"wrote {args.out}: {len(frame)} images at {args.resolution} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
