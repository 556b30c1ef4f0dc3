"""Stacked scale ensemble (the paper's eq. 2-3) and the plain average-probability ensemble.

For finding ``f`` and scale (resolution) ``s``, with each scale's logit ``l_fs(x)``::

    w_fs  = softmax_s(v_fs)                          (eq. 2; v initialised to 0: uniform weights)
    p_f   = sum_s w_fs sigmoid(l_fs)                  (eq. 3)

computed in log space so that logits of +-100 neither overflow nor round ``p`` to 0 or 1::

    log p_f       = logsumexp_s(log w_fs + logsigmoid(l_fs))
    log(1 - p_f)  = logsumexp_s(log w_fs + logsigmoid(-l_fs))     (1 - sum w s(l) = sum w s(-l))

The ensemble's logit ``log p - log(1 - p)`` is what its prediction frames hold, so
:mod:`cxrlib.metrics` scores ensembles like single resolutions (AUC depends only on order).

Fitting (per fold, on that fold's validation logits; applied to its test logits):
the loss is the binary cross-entropy ``-(y log p + (1 - y) log(1 - p))`` averaged over each
finding's known labels (NaN labels ignored) and summed over findings, so every finding's
weights are fitted as a problem of their own, as the paper says. The optimiser is **Adam**
with full-batch epochs (one step per epoch on all validation images), learning rate 0.1
multiplied by ``lr_decay`` (0.96) after each epoch (exponential decay; 0.1 -> 0.0017 over
100 epochs), 100 epochs. Convergence is reported, not assumed: the largest change of any
weight over the last 10 epochs and the largest gradient component of the loss with respect
to ``v`` at the end, and how far each finding's loss is from its optimum: the loss is
convex in the weights, so a constrained solver (SLSQP on the simplex,
:func:`optimal_weights`) finds the reference optimum. ``converged`` is True when the
weight change over the last 10 epochs and the largest loss gap (nats per image) are both
below ``tol`` (1e-3).

The plain ensemble averages the scales' probabilities (uniform weights, nothing fitted).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import logsumexp

from .fileio import write_csv_atomic
from .labels import finding_order
from .paths import tables_dir

STACKED, AVERAGE = "ensemble", "average"


def log_ensemble_probabilities(
    logits: torch.Tensor, log_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log(1 - p))`` of ``p = sum_s w_s sigmoid(l_s)``, stably.

    ``logits``: ``[N, F, S]``; ``log_weights``: ``[F, S]`` (log of weights summing to 1 over S).
    """
    return _pool(log_weights, F.logsigmoid(logits), F.logsigmoid(-logits))


def _pool(
    log_weights: torch.Tensor, log_sig_pos: torch.Tensor, log_sig_neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log(1 - p))`` from precomputed ``logsigmoid(l)`` and ``logsigmoid(-l)``."""
    return (
        torch.logsumexp(log_weights + log_sig_pos, dim=-1),
        torch.logsumexp(log_weights + log_sig_neg, dim=-1),
    )


@contextlib.contextmanager
def _single_thread():
    """Run tiny tensor operations on one thread: a thread pool costs more than it saves here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class StackedScaleEnsemble(nn.Module):
    """Eq. 2-3: one parameter ``v`` of shape ``[findings, scales]``, weights ``softmax(v)`` over scales."""

    def __init__(self, n_findings: int, n_scales: int):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(n_findings, n_scales))

    def log_weights(self) -> torch.Tensor:
        return F.log_softmax(self.v, dim=1)

    @property
    def weights(self) -> torch.Tensor:
        """``[findings, scales]``, each row summing to 1."""
        return torch.softmax(self.v, dim=1)

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p, log(1 - p))``, each ``[N, findings]``, from scale logits ``[N, findings, scales]``."""
        return log_ensemble_probabilities(logits, self.log_weights())


def ensemble_loss(
    log_p: torch.Tensor, log_q: torch.Tensor, labels: torch.Tensor, per_finding: bool = False
) -> torch.Tensor:
    """BCE per finding averaged over its known labels (NaN ignored), summed over findings.

    ``per_finding=True`` returns the ``[F]`` per-finding means instead of their sum.
    """
    known = ~torch.isnan(labels)
    targets = torch.nan_to_num(labels, nan=0.0)
    losses = torch.where(known, -(targets * log_p + (1.0 - targets) * log_q), 0.0)
    per = losses.sum(dim=0) / known.sum(dim=0).clamp_min(1)
    return per if per_finding else per.sum()


@dataclass
class EnsembleFit:
    """A fitted stacked ensemble and how its optimisation ended."""

    weights: np.ndarray  # [findings, scales]
    v: np.ndarray
    history: pd.DataFrame  # epoch, loss, lr, grad_max, weight_change_max
    converged: bool
    final_loss: float
    final_grad_max: float  # largest |d loss / d v| after the last epoch
    loss_gap: float  # largest over findings of loss - reference optimal loss (nats per image)
    weight_change_last: float  # largest |w change| over the last `window` epochs
    reference_weights: np.ndarray  # [findings, scales], the optimum found by SLSQP
    reference_distance: float  # largest |weight - reference weight| (flat optima allow some)
    n_images: int


def fit_stacked_ensemble(
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    epochs: int = 100,
    lr: float = 0.1,
    lr_decay: float = 0.96,
    tol: float = 1e-3,
    window: int = 10,
) -> EnsembleFit:
    """Fit eq. 2-3 on validation ``logits`` ``[N, F, S]`` and ``labels`` ``[N, F]`` (1 / 0 / NaN).

    Adam, full-batch, ``lr`` decayed by ``lr_decay`` per epoch (see the module docstring).
    """
    logits = torch.tensor(np.asarray(logits, dtype=float))  # a float64 copy
    labels = torch.tensor(np.asarray(labels, dtype=float))
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, findings, scales] and labels [N, findings]; got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    with _single_thread():
        return _fit(logits, labels, epochs, lr, lr_decay, tol, window)


def _fit(logits, labels, epochs, lr, lr_decay, tol, window) -> EnsembleFit:
    model = StackedScaleEnsemble(logits.shape[1], logits.shape[2]).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    log_sig_pos, log_sig_neg = F.logsigmoid(logits), F.logsigmoid(-logits)  # fixed inputs: once
    rows, weights_seen = [], [model.weights.detach().clone()]
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        loss = ensemble_loss(*_pool(model.log_weights(), log_sig_pos, log_sig_neg), labels)
        loss.backward()
        current_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        weights_seen.append(model.weights.detach().clone())
        rows.append(
            {
                "epoch": epoch,
                "loss": loss.item(),
                "lr": current_lr,
                "grad_max": float(model.v.grad.abs().max()),
                "weight_change_max": float((weights_seen[-1] - weights_seen[-2]).abs().max()),
            }
        )
    model.zero_grad()
    log_p, log_q = _pool(model.log_weights(), log_sig_pos, log_sig_neg)
    fitted_losses = ensemble_loss(log_p, log_q, labels, per_finding=True)
    final_loss = fitted_losses.sum()
    final_loss.backward()
    final_grad = float(model.v.grad.abs().max())
    fitted_losses = fitted_losses.detach().numpy()
    reference_weights, reference_losses = optimal_weights(logits.numpy(), labels.numpy())
    gap = float(np.max(fitted_losses - reference_losses))
    window = min(window, epochs)
    change = float((weights_seen[-1] - weights_seen[-1 - window]).abs().max())
    return EnsembleFit(
        weights=model.weights.detach().numpy(),
        v=model.v.detach().numpy(),
        history=pd.DataFrame(rows),
        converged=bool(gap < tol and change < tol),
        final_loss=final_loss.item(),
        final_grad_max=final_grad,
        loss_gap=gap,
        weight_change_last=change,
        reference_weights=reference_weights,
        reference_distance=float(np.abs(model.weights.detach().numpy() - reference_weights).max()),
        n_images=int(logits.shape[0]),
    )


def optimal_weights(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference optimum of the ensemble loss per finding, by SLSQP on the simplex of weights.

    The loss of one finding is convex in its weights (minus the log of a function linear
    in them), so a constrained solver finds the optimum reliably for a handful of scales.
    Returns ``(weights [F, S], loss per finding [F])``; a finding without known labels gets
    uniform weights and loss 0.
    """
    logits, labels = np.asarray(logits, dtype=float), np.asarray(labels, dtype=float)
    n_findings, n_scales = logits.shape[1:]
    weights, losses = np.full((n_findings, n_scales), 1.0 / n_scales), np.zeros(n_findings)
    for f in range(n_findings):
        known = ~np.isnan(labels[:, f])
        if not known.any():
            continue
        y = labels[known, f][:, None]
        log_sig_pos, log_sig_neg = -np.logaddexp(0, -logits[known, f]), -np.logaddexp(0, logits[known, f])

        def loss_and_grad(w, y=y, pos=log_sig_pos, neg=log_sig_neg):
            log_p = logsumexp(pos, b=w, axis=1, keepdims=True)
            log_q = logsumexp(neg, b=w, axis=1, keepdims=True)
            loss = -(y * log_p + (1 - y) * log_q).mean()
            grad = -(y * np.exp(pos - log_p) + (1 - y) * np.exp(neg - log_q)).mean(axis=0)
            return loss, grad

        result = minimize(
            loss_and_grad,
            weights[f],
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * n_scales,
            constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
            options={"ftol": 1e-12, "maxiter": 500},
        )
        start_loss = loss_and_grad(weights[f])[0]
        if result.success and result.fun <= start_loss:
            weights[f] = np.clip(result.x, 0.0, None) / np.clip(result.x, 0.0, None).sum()
        losses[f] = loss_and_grad(weights[f])[0]
    return weights, losses


def ensemble_logits(logits: np.ndarray | torch.Tensor, weights: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logit ``log p - log(1 - p)`` of the weighted ensemble, ``[N, F]``, from ``[N, F, S]`` scale logits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
    with torch.no_grad():
        log_p, log_q = log_ensemble_probabilities(logits, torch.log(weights))
    return (log_p - log_q).numpy()


def average_logits(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logit of the plain mean of the scales' probabilities, ``[N, F]``."""
    logits = np.asarray(logits)
    return ensemble_logits(logits, np.full(logits.shape[1:], 1.0 / logits.shape[2]))


def stack_scales(
    frames: Mapping[int, pd.DataFrame], resolutions: Sequence[int]
) -> tuple[pd.Index, np.ndarray]:
    """Align per-resolution score frames (indexed by dicom_id) into ``[N, findings, scales]``.

    Returns ``(ids, array)`` in the first resolution's image order, findings in its column order.
    Raises ``ValueError`` when the frames do not hold the same images or findings.
    """
    ids = frames[resolutions[0]].index
    findings = list(frames[resolutions[0]].columns)
    stacked = []
    for resolution in resolutions:
        frame = frames[resolution]
        if len(frame) != len(ids) or set(frame.index) != set(ids):
            raise ValueError(
                f"resolution {resolution} has predictions for other images than resolution "
                f"{resolutions[0]}; the ensemble needs the same images at every scale"
            )
        if sorted(frame.columns) != sorted(findings):
            raise ValueError(
                f"resolution {resolution} predicts other findings than resolution {resolutions[0]}; "
                "the ensemble needs the same label set at every scale"
            )
        stacked.append(frame.loc[ids, findings].to_numpy(dtype=float))
    return ids, np.stack(stacked, axis=-1)


@dataclass
class FoldEnsembles:
    """Ensemble test predictions per fold, their weights and the fits' convergence."""

    predictions: dict[tuple[str, int], pd.DataFrame]  # (ensemble | average, fold) -> logit frame
    weights: pd.DataFrame  # finding, resolution, fold, weight
    convergence: pd.DataFrame  # fold, converged, final_loss, final_grad_max, loss_gap, ...
    fits: dict[int, EnsembleFit]


def fit_fold_ensembles(
    val_predictions: Mapping[tuple[int, int], pd.DataFrame],
    test_predictions: Mapping[tuple[int, int], pd.DataFrame],
    index: pd.DataFrame,
    resolutions: Sequence[int],
    folds: Sequence[int] | None = None,
    **fit_kwargs,
) -> FoldEnsembles:
    """Fit the stacked ensemble on each fold's validation logits and apply it to its test logits.

    ``*_predictions`` are :func:`cxrlib.metrics.load_predictions` outputs; labels come from
    ``index`` (NaN = unknown). Also makes the plain average ensemble of each fold.
    """
    from .metrics import labels_for

    resolutions = list(resolutions)
    folds = sorted({fold for _, fold in test_predictions}) if folds is None else list(folds)
    predictions, weight_rows, reports, fits = {}, [], [], {}
    for fold in folds:
        val_ids, val_logits = stack_scales({r: val_predictions[(r, fold)] for r in resolutions}, resolutions)
        findings = list(val_predictions[(resolutions[0], fold)].columns)
        fit = fit_stacked_ensemble(val_logits, labels_for(index, val_ids, findings).to_numpy(), **fit_kwargs)
        fits[fold] = fit
        test_ids, test_logits = stack_scales(
            {r: test_predictions[(r, fold)][findings] for r in resolutions}, resolutions
        )
        for name, values in (
            (STACKED, ensemble_logits(test_logits, fit.weights)),
            (AVERAGE, average_logits(test_logits)),
        ):
            predictions[(name, fold)] = pd.DataFrame(values, index=test_ids, columns=findings)
        for f, finding in enumerate(findings):
            for s, resolution in enumerate(resolutions):
                weight_rows.append((finding, resolution, fold, float(fit.weights[f, s])))
        reports.append(
            {
                "fold": fold,
                "converged": fit.converged,
                "final_loss": fit.final_loss,
                "final_grad_max": fit.final_grad_max,
                "loss_gap": fit.loss_gap,
                "weight_change_last": fit.weight_change_last,
                "reference_distance": fit.reference_distance,
                "n_images": fit.n_images,
            }
        )
    weights = pd.DataFrame(weight_rows, columns=["finding", "resolution", "fold", "weight"])
    return FoldEnsembles(predictions, weights, pd.DataFrame(reports), fits)


def ensemble_weights_table(weights: pd.DataFrame) -> pd.DataFrame:
    """``ensemble_weights.csv``: finding, resolution, weight (mean over folds), std (ddof=1), n_folds."""
    grouped = weights.groupby(["finding", "resolution"], sort=False)["weight"]
    table = grouped.agg(weight="mean", std=lambda w: w.std(ddof=1), n_folds="count").reset_index()
    order = {f: i for i, f in enumerate(finding_order(weights["finding"]))}
    return table.sort_values(
        ["finding", "resolution"], key=lambda c: c.map(order) if c.name == "finding" else c
    )[["finding", "resolution", "weight", "std", "n_folds"]].reset_index(drop=True)


def write_ensemble_weights(run: str | os.PathLike, weights: pd.DataFrame) -> Path:
    """Write ``tables/ensemble_weights.csv`` (from the per-fold long weights) atomically."""
    return write_csv_atomic(ensemble_weights_table(weights), tables_dir(run) / "ensemble_weights.csv")


def versus_best_single(table3: pd.DataFrame, resolutions: list[int]) -> pd.DataFrame:
    """Per finding: the best single resolution and its mean test AUC against both ensembles."""
    rows = []
    for row in table3.to_dict("records"):
        means = {r: row.get(f"{r}_mean") for r in resolutions}
        means = {r: m for r, m in means.items() if m is not None and not pd.isna(m)}
        if not means:
            continue
        best = max(means, key=means.get)
        entry = {"finding": row["finding"], "best resolution": best, "best AUC": means[best]}
        for name in ("ensemble", "average"):
            value = row.get(f"{name}_mean")
            if value is not None and not pd.isna(value):
                entry[f"{name} AUC"] = value
                entry[f"{name} - best"] = value - means[best]
        rows.append(entry)
    return pd.DataFrame(rows).round(4)
