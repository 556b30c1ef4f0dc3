"""Feasibility study: does the phantom show the paper's effect on a 2-core CPU in minutes?

Generates a phantom (:func:`cxrlib.phantom.make_phantom`), squashes every frontal image to each
resolution (:func:`cxrlib.cache.square_images`, the cache's own resize), holds out a subject-grouped
test set, trains torchvision's DenseNet121 from scratch (``weights=None``, fp32) at each resolution
for the SAME number of optimizer steps (equal wall time would starve the high resolutions), and
prints per-finding test AUC (U-Zeros labels, as the paper) per resolution, the average-probability
ensemble, the paper's stacked ensemble (softmax weights per finding fitted on a validation set), the
AUC's standard error (Hanley & McNeil) and timings. This is a study script with its own minimal loop
(Adam, masked BCE, flip/rotation augmentation on the batch); the project's trainer
is :mod:`cxrlib.train`.

Usage (run 2 of the study in docs/phantom.md; each seed in its own process)::

    python benchmarks/phantom_feasibility.py --out /tmp/feas --subjects 2500 --max-size 256 \\
        --prevalence balanced --resolutions 32 64 96 128 --batch-sizes 16 16 16 16 --steps 450 \\
        --eval-steps 225 --threads 1 --design '{"fine_instances": 2}' --seed 0
    (the same with --seed 1)

The phantom and the resized arrays are reused from ``--out`` when present (same settings).
Results are appended to ``--out/results.csv`` (seed, resolution, finding, auc, se, steps...).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from cxrlib.cache import square_images
from cxrlib.labels import FINDINGS, apply_policy, masked_bce_with_logits, targets_and_mask
from cxrlib.models import model_input
from cxrlib.phantom import COARSE_FINDINGS, FINE_FINDINGS, make_phantom
from cxrlib.train import MAX_ROTATION_DEGREES, rotate_flip_batch


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work folder (phantom, arrays, results.csv)")
    parser.add_argument("--subjects", type=int, default=2500)
    parser.add_argument("--phantom-seed", type=int, default=0, help="seed of the phantom (data)")
    parser.add_argument("--max-size", type=int, default=256, help="phantom long side in px")
    parser.add_argument("--prevalence", default="balanced", choices=["mimic", "balanced"])
    parser.add_argument("--design", default="{}", help="extra make_phantom design options as JSON")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--steps", type=int, default=450, help="optimizer steps at every resolution")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="*", default=None, help="one per resolution (default 16)"
    )
    parser.add_argument(
        "--lrs", type=float, nargs="*", default=None, help="one per resolution (default 1e-3)"
    )
    parser.add_argument("--test-images", type=int, default=1000, help="about this many test images")
    parser.add_argument("--val-images", type=int, default=500, help="validation images (stacked ensemble)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, batches, augmentation)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the phantom")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-augment", action="store_true", help="train without flip/rotation")
    parser.add_argument(
        "--eval-steps", type=int, nargs="*", default=[], help="also print test AUC at these steps"
    )
    parser.add_argument("--tag", default="", help="free text stored with the results")
    return parser


def load_data(args) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """The phantom's frontal images as uint8 arrays per resolution, and their labels (U-Zeros)."""
    root = (
        Path(args.out)
        / f"phantom_s{args.subjects}_m{args.max_size}_{args.prevalence}_seed{args.phantom_seed}"
    )
    design = json.loads(args.design)
    if design:
        root = root.with_name(root.name + "_" + "_".join(f"{k}{v}" for k, v in sorted(design.items())))
    if not (root / "phantom_truth.csv").is_file():
        start = time.time()
        make_phantom(
            root,
            args.subjects,
            args.phantom_seed,
            args.max_size,
            args.workers,
            prevalence=args.prevalence,
            **design,
        )
        print(f"phantom: {time.time() - start:.0f} s", flush=True)
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"dicom_id": str})
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    meta = meta[meta["ViewPosition"] != "LATERAL"].merge(
        labels, on=["subject_id", "study_id"], validate="many_to_one"
    )
    meta[list(FINDINGS)] = apply_policy(meta, "u-zeros").to_numpy()
    meta["path"] = [
        str(root / "files" / f"p{str(s)[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
        for s, t, d in zip(meta["subject_id"], meta["study_id"], meta["dicom_id"], strict=True)
    ]
    arrays = {}
    missing = [r for r in args.resolutions if not (root / f"arrays_{r}.npy").is_file()]
    if missing:
        stacks = {r: np.zeros((len(meta), r, r), np.uint8) for r in missing}
        for i, path in enumerate(tqdm(meta["path"], desc="resize", unit="img")):
            for r, image in square_images(path, missing)[0].items():
                stacks[r][i] = np.asarray(image)
        for r in missing:
            np.save(root / f"arrays_{r}.npy", stacks[r])
    for r in args.resolutions:
        arrays[r] = np.load(root / f"arrays_{r}.npy")
    return meta, arrays


def split_subjects(meta: pd.DataFrame, test_images: int, val_images: int) -> np.ndarray:
    """Role per image (test / val / train): whole subjects in a fixed shuffled order fill the test set
    up to ``test_images``, then the validation set up to ``val_images``; the rest is training."""
    subjects = meta["subject_id"].drop_duplicates().sample(frac=1.0, random_state=12345).to_numpy()
    counts = meta.groupby("subject_id").size()
    role, total = {}, 0
    for s in subjects:
        role[s] = "test" if total < test_images else ("val" if total < test_images + val_images else "train")
        total += counts[s]
    return meta["subject_id"].map(role).to_numpy()


def fit_stacked_weights(val_probs: np.ndarray, val_labels: np.ndarray, epochs: int = 100) -> np.ndarray:
    """The paper's stacked scale ensemble (eq. 2-3): per finding, softmax weights over the scales
    (uniform at start) that minimise the BCE of sum_r w_r p_r on validation; Adam lr 0.1, decay 0.97.

    ``val_probs``: [scales, images, findings]; returns weights [findings, scales]."""
    probs = torch.as_tensor(val_probs, dtype=torch.float64)
    labels = torch.as_tensor(val_labels, dtype=torch.float64)
    logits = torch.zeros(probs.shape[2], probs.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.97)
    for _ in range(epochs):
        mixed = torch.einsum("rnf,fr->nf", probs, torch.softmax(logits, dim=1)).clamp(1e-7, 1 - 1e-7)
        loss = torch.nn.functional.binary_cross_entropy(mixed, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return torch.softmax(logits, dim=1).detach().numpy()


def batch_transform(images, augment: bool = False, generator=None) -> torch.Tensor:
    """uint8 batch -> normalised model input, flipped and rotated (draws from ``generator``) to augment."""
    x = images.float().div_(255.0)
    if augment:
        angles = (torch.rand(len(x), generator=generator) * 2 - 1) * MAX_ROTATION_DEGREES
        x = rotate_flip_batch(x, angles, torch.rand(len(x), generator=generator) < 0.5)
    return model_input(x)


def train_one(
    images, targets, masks, steps, batch, lr, seed, augment, probe=None
) -> tuple[torch.nn.Module, float]:
    """Train from scratch for ``steps``; ``probe(model, step)`` is called at the steps it names."""
    torch.manual_seed(seed)
    model = torchvision.models.densenet121(weights=None, num_classes=len(FINDINGS))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    model.train()
    start, position = time.time(), 0
    losses = []
    for step in tqdm(range(steps), desc=f"train {images.shape[-1]}px", unit="step", leave=False):
        if position + batch > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        idx = order[position : position + batch]
        position += batch
        x = batch_transform(images[idx], augment, generator)
        loss = masked_bce_with_logits(model(x), targets[idx], masks[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if probe is not None and step + 1 in probe.steps:
            probe(model, step + 1)
            model.train()
        if (step + 1) % max(steps // 5, 1) == 0:
            print(f"  step {step + 1}: loss {np.mean(losses[-max(steps // 5, 1) :]):.4f}", flush=True)
    return model, time.time() - start


@torch.inference_mode()
def predict(model, images, batch=32) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(batch_transform(images[i : i + batch]))) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def auc_and_se(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """AUC and its Hanley-McNeil standard error (nan when a class is missing)."""
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    if n1 == 0 or n0 == 0:
        return float("nan"), float("nan")
    a = roc_auc_score(y, p)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    return float(a), float(se)


def main(argv=None) -> pd.DataFrame:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = args.batch_sizes or [16] * len(args.resolutions)
    lrs = args.lrs or [1e-3] * len(args.resolutions)
    meta, arrays = load_data(args)
    role = split_subjects(meta, args.test_images, args.val_images)
    test, val, train = role == "test", role == "val", role == "train"
    labels = meta[list(FINDINGS)].to_numpy(np.float32)
    targets, masks = targets_and_mask(labels)
    print(
        f"images: {len(meta)} frontal, train {int(train.sum())}, val {int(val.sum())}, "
        f"test {int(test.sum())}; test positives: "
        + ", ".join(f"{f[:12]} {int(labels[test, i].sum())}" for i, f in enumerate(FINDINGS))
    )
    rows, probabilities, val_probabilities = [], {}, {}
    for resolution, batch, lr in zip(args.resolutions, batches, lrs, strict=True):
        x = torch.from_numpy(np.ascontiguousarray(arrays[resolution])).unsqueeze(1)

        def probe(model, step, x=x):
            p = predict(model, x[test])
            print(
                f"  {x.shape[-1]} px step {step}: "
                + ", ".join(
                    f"{f[:10]} {auc_and_se(labels[test, i], p[:, i])[0]:.2f}" for i, f in enumerate(FINDINGS)
                ),
                flush=True,
            )

        probe.steps = set(args.eval_steps)
        model, train_s = train_one(
            x[train],
            targets[train],
            masks[train],
            args.steps,
            batch,
            lr,
            args.seed,
            not args.no_augment,
            probe,
        )
        start = time.time()
        probabilities[resolution] = predict(model, x[test])
        infer_s = time.time() - start
        val_probabilities[resolution] = predict(model, x[val])
        print(
            f"{resolution} px: batch {batch}, lr {lr}, {args.steps} steps, train {train_s:.0f} s "
            f"({args.steps * batch / train_s:.1f} img/s), test inference {infer_s:.0f} s",
            flush=True,
        )
        for i, finding in enumerate(FINDINGS):
            auc, se = auc_and_se(labels[test, i], probabilities[resolution][:, i])
            rows.append(
                {
                    "resolution": str(resolution),
                    "finding": finding,
                    "auc": auc,
                    "se": se,
                    "batch": batch,
                    "lr": lr,
                    "train_s": train_s,
                    "infer_s": infer_s,
                }
            )
        print(
            "  AUC " + ", ".join(f"{r['finding'][:14]} {r['auc']:.3f}" for r in rows[-len(FINDINGS) :]),
            flush=True,
        )
    scales = [str(r) for r in args.resolutions]
    average = np.mean([probabilities[r] for r in args.resolutions], axis=0)
    weights = fit_stacked_weights(np.stack([val_probabilities[r] for r in args.resolutions]), labels[val])
    stacked = np.einsum("rnf,fr->nf", np.stack([probabilities[r] for r in args.resolutions]), weights)
    for name, ensemble in (("average", average), ("stacked", stacked)):
        for i, finding in enumerate(FINDINGS):
            auc, se = auc_and_se(labels[test, i], ensemble[:, i])
            rows.append({"resolution": name, "finding": finding, "auc": auc, "se": se})
    print("stacked ensemble weights (" + "/".join(scales) + "):")
    for i, finding in enumerate(FINDINGS):
        print(f"  {finding:28s} " + " ".join(f"{w:.2f}" for w in weights[i]))
    np.savez_compressed(
        Path(args.out) / f"probabilities_{args.tag or 'run'}_seed{args.seed}.npz",
        test_labels=labels[test],
        val_labels=labels[val],
        weights=weights,
        resolutions=np.array(args.resolutions),
        **{f"test_{r}": probabilities[r] for r in args.resolutions},
        **{f"val_{r}": val_probabilities[r] for r in args.resolutions},
    )
    results = pd.DataFrame(rows).assign(
        seed=args.seed,
        steps=args.steps,
        subjects=args.subjects,
        max_size=args.max_size,
        prevalence=args.prevalence,
        design=args.design,
        train_images=int(train.sum()),
        test_images=int(test.sum()),
        tag=args.tag,
    )
    table = results.pivot(index="finding", columns="resolution", values="auc")
    table = table[scales + ["average", "stacked"]]
    order = list(COARSE_FINDINGS) + list(FINE_FINDINGS)
    table = table.loc[order + [f for f in FINDINGS if f not in order]]
    table.loc["Average"] = table.mean()
    print(table.round(3).to_string())
    print(f"AUC standard error (median over findings): {results['se'].median():.3f}")
    out = Path(args.out) / "results.csv"
    results.to_csv(out, mode="a", header=not out.is_file(), index=False)
    return results


if __name__ == "__main__":
    main()
