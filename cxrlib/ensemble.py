"""Stacked scale ensemble (the paper's eq. 2-3, in log space) and the plain average-probability ensemble;
their frames hold the ensemble's logit. The fit and its convergence: docs/method.md, "Scale ensemble"."""

from collections import namedtuple
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import logsumexp

from .labels import finding_order

STACKED, AVERAGE = "ensemble", "average"


def log_ensemble_probabilities(logits: torch.Tensor, log_weights: torch.Tensor) -> tuple:
    """``(log p, log(1 - p))`` of ``p = sum_s w_s sigmoid(l_s)``: logits ``[N, F, S]``, weights ``[F, S]``."""
    return (
        torch.logsumexp(log_weights + F.logsigmoid(logits), dim=-1),
        torch.logsumexp(log_weights + F.logsigmoid(-logits), dim=-1),
    )


def ensemble_loss(
    log_p: torch.Tensor, log_q: torch.Tensor, labels: torch.Tensor, per_finding: bool = False
) -> torch.Tensor:
    """Binary cross-entropy per finding over its known labels, summed over findings (or per finding)."""
    known = ~torch.isnan(labels)
    targets = torch.nan_to_num(labels, nan=0.0)
    losses = torch.where(known, -(targets * log_p + (1.0 - targets) * log_q), 0.0)
    per = losses.sum(dim=0) / known.sum(dim=0).clamp_min(1)
    return per if per_finding else per.sum()


# weights [F, S], history per epoch, then how the fit ended (docs/method.md, "Scale ensemble")
EnsembleFit = namedtuple(
    "EnsembleFit",
    "weights history converged final_loss final_grad_max loss_gap weight_change_last reference_weights "
    "reference_distance n_images",
)


def fit_stacked_ensemble(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, epochs: int = 100, lr: float = 0.1,
    lr_decay: float = 0.96, tol: float = 1e-3, window: int = 10,
) -> EnsembleFit:  # fmt: skip
    """Fit eq. 2-3 on validation ``logits [N, F, S]`` and ``labels [N, F]`` (1 / 0 / NaN)."""
    logits = torch.tensor(np.asarray(logits, dtype=float))  # a float64 copy
    labels = torch.tensor(np.asarray(labels, dtype=float))
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"need logits [N, F, S] and labels [N, F], got {logits.shape}, {labels.shape}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensor operations: a thread pool costs more than it saves
    try:
        return _fit(logits, labels, epochs, lr, lr_decay, tol, window)
    finally:
        torch.set_num_threads(threads)


def _fit(logits, labels, epochs, lr, lr_decay, tol, window) -> EnsembleFit:
    v = torch.zeros(logits.shape[1:], dtype=torch.float64, requires_grad=True)  # uniform weights
    optimizer = torch.optim.Adam([v], lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    rows, seen = [], [torch.softmax(v, dim=1).detach()]
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        value = ensemble_loss(*log_ensemble_probabilities(logits, F.log_softmax(v, dim=1)), labels)
        value.backward()
        current_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        seen.append(torch.softmax(v, dim=1).detach())
        change = float((seen[-1] - seen[-2]).abs().max())
        rows.append((epoch, value.item(), current_lr, float(v.grad.abs().max()), change))
    v.grad = None
    per_finding = ensemble_loss(*log_ensemble_probabilities(logits, F.log_softmax(v, dim=1)), labels, True)
    final = per_finding.sum()
    final.backward()
    reference, reference_losses = optimal_weights(logits.numpy(), labels.numpy())
    gap = float(np.max(per_finding.detach().numpy() - reference_losses))
    grad, change = float(v.grad.abs().max()), float((seen[-1] - seen[-1 - min(window, epochs)]).abs().max())
    weights = seen[-1].numpy()
    return EnsembleFit(
        weights, pd.DataFrame(rows, columns=["epoch", "loss", "lr", "grad_max", "weight_change_max"]),
        gap < tol and change < tol, final.item(), grad, gap, change, reference,
        float(np.abs(weights - reference).max()), len(logits),
    )  # fmt: skip


def optimal_weights(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference optimum ``(weights [F, S], loss per finding [F])`` by SLSQP on the simplex (convex)."""
    logits, labels = np.asarray(logits, dtype=float), np.asarray(labels, dtype=float)
    n_findings, n_scales = logits.shape[1:]
    weights, losses = np.full((n_findings, n_scales), 1.0 / n_scales), np.zeros(n_findings)
    simplex = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
    for f in range(n_findings):
        known = ~np.isnan(labels[:, f])
        if not known.any():
            continue
        y = labels[known, f][:, None]
        pos, neg = -np.logaddexp(0, -logits[known, f]), -np.logaddexp(0, logits[known, f])

        def loss_and_grad(w, y=y, pos=pos, neg=neg):
            log_p = logsumexp(pos, b=w, axis=1, keepdims=True)
            log_q = logsumexp(neg, b=w, axis=1, keepdims=True)
            grad = -(y * np.exp(pos - log_p) + (1 - y) * np.exp(neg - log_q)).mean(axis=0)
            return -(y * log_p + (1 - y) * log_q).mean(), grad

        result = minimize(loss_and_grad, weights[f], jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * n_scales,
                          constraints=(simplex,), options={"ftol": 1e-12, "maxiter": 500})  # fmt: skip
        if result.success and result.fun <= loss_and_grad(weights[f])[0]:
            weights[f] = np.clip(result.x, 0.0, None) / np.clip(result.x, 0.0, None).sum()
        losses[f] = loss_and_grad(weights[f])[0]
    return weights, losses


def ensemble_logits(logits: np.ndarray | torch.Tensor, weights: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logit ``log p - log(1 - p)`` ``[N, F]`` of the weighted ensemble of scale logits ``[N, F, S]``."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
    with torch.no_grad():
        log_p, log_q = log_ensemble_probabilities(logits, torch.log(weights))
    return (log_p - log_q).numpy()


def average_logits(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logit of the plain mean of the scales' probabilities, ``[N, F]``."""
    logits = np.asarray(logits)
    return ensemble_logits(logits, np.full(logits.shape[1:], 1.0 / logits.shape[2]))


def stack_scales(frames: Mapping, resolutions: Sequence[int]) -> tuple[pd.Index, np.ndarray]:
    """``(ids, [N, findings, scales])`` of per-resolution score frames of the same images and findings."""
    ids, findings = frames[resolutions[0]].index, list(frames[resolutions[0]].columns)
    for resolution in resolutions:
        frame = frames[resolution]
        if sorted(frame.index) != sorted(ids) or sorted(frame.columns) != sorted(findings):
            raise ValueError(f"resolution {resolution} has other images or findings than {resolutions[0]}")
    return ids, np.stack([frames[r].loc[ids, findings].to_numpy(dtype=float) for r in resolutions], axis=-1)


# {(ensemble or average, fold): test logits}, weights (finding, resolution, fold, weight), convergence
FoldEnsembles = namedtuple("FoldEnsembles", "predictions weights convergence")


def fit_fold_ensembles(
    val: Mapping,
    test: Mapping,
    index: pd.DataFrame,
    resolutions: Sequence[int],
    folds: Sequence[int] | None = None,
) -> FoldEnsembles:
    """Each fold's stacked ensemble fitted on its validation logits, and both ensembles of its test ones."""
    from .metrics import labels_for

    folds = sorted({fold for _, fold in test}) if folds is None else list(folds)
    predictions, weights, reports = {}, [], []
    for fold in folds:
        val_ids, val_logits = stack_scales({r: val[(r, fold)] for r in resolutions}, resolutions)
        findings = list(val[(resolutions[0], fold)].columns)
        fit = fit_stacked_ensemble(val_logits, labels_for(index, val_ids, findings).to_numpy())
        ids, logits = stack_scales({r: test[(r, fold)][findings] for r in resolutions}, resolutions)
        stacked, average = ensemble_logits(logits, fit.weights), average_logits(logits)
        predictions[(STACKED, fold)] = pd.DataFrame(stacked, index=ids, columns=findings)
        predictions[(AVERAGE, fold)] = pd.DataFrame(average, index=ids, columns=findings)
        weights += [(f, r, fold, float(fit.weights[i, j])) for i, f in enumerate(findings)
                    for j, r in enumerate(resolutions)]  # fmt: skip
        report = {
            k: v for k, v in fit._asdict().items() if k not in ("weights", "history", "reference_weights")
        }
        reports.append({"fold": fold, **report})
    weights = pd.DataFrame(weights, columns=["finding", "resolution", "fold", "weight"])
    return FoldEnsembles(predictions, weights, pd.DataFrame(reports))


def ensemble_weights_table(weights: pd.DataFrame) -> pd.DataFrame:
    """``ensemble_weights.csv``: finding, resolution, weight (mean over folds), std (ddof=1), n_folds."""
    grouped = weights.groupby(["finding", "resolution"], sort=False)["weight"]
    table = grouped.agg(weight="mean", std=lambda w: w.std(ddof=1), n_folds="count").reset_index()
    order = {f: i for i, f in enumerate(finding_order(weights["finding"]))}
    return table.sort_values(
        ["finding", "resolution"], key=lambda c: c.map(order) if c.name == "finding" else c, ignore_index=True
    )


def versus_best_single(table3: pd.DataFrame, resolutions: list[int]) -> pd.DataFrame:
    """Per finding: the best single resolution and its mean test AUC against both ensembles."""
    table = table3.set_index("finding")
    means = table[[f"{r}_mean" for r in resolutions if f"{r}_mean" in table]].dropna(how="all")
    best = means.max(axis=1)
    best_at = means.idxmax(axis=1).str.removesuffix("_mean").astype(int)
    out = pd.DataFrame({"best resolution": best_at, "best AUC": best})
    for name in (STACKED, AVERAGE):
        if f"{name}_mean" in table:
            out[f"{name} AUC"] = table.loc[means.index, f"{name}_mean"]
            out[f"{name} - best"] = out[f"{name} AUC"] - best
    return out.reset_index().round(4)
