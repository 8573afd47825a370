"""Fitting a stage head in numpy: weighted multinomial logistic regression on standardised features.

Used by training (`method: frozen` profiles), by `python -m train adapt` and by `edge-inspect adapt` on the
board, so a head fitted anywhere is fitted the same way. Logistic regression because it is what measured best
per second on frozen ImageNet features of real SEM images (docs/adaptation.md): a head refit in 1-10 s matched
fine-tuning the whole network (16 min). The optimiser is L-BFGS (a few dozen lines of numpy; the board has no
scipy); tests/test_adapt.py checks it against scipy's.

    loss(W, b) = sum_i w_i * -log softmax(z_i W + b)[y_i] / sum_i w_i  +  lam / 2 * |W|^2,
    z = (x - mean) / scale, mean and scale the weighted mean and standard deviation of the training features.
"""
from __future__ import annotations

import numpy as np

from edge_runtime.head import Head, softmax

DEFAULT_LAMBDA = 0.1        # the L2 strength training chose on real SEM features (val loss, docs/adaptation.md)
MAX_ITER = 200             # the validation loss of real-data heads settles by ~100 iterations


def lbfgs(fun_grad, x0: np.ndarray, *, max_iter: int = MAX_ITER, memory: int = 10, gtol: float = 1e-5,
          ftol: float = 1e-8) -> np.ndarray:
    """Minimise a smooth function given (value, gradient) -> (float, ndarray): limited-memory BFGS (two-loop
    recursion) with an Armijo backtracking line search. Stops when the largest gradient entry is under gtol or
    an iteration improves the value by less than ftol (relative)."""
    x = np.asarray(x0, np.float64).copy()
    f, g = fun_grad(x)
    history: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(max_iter):
        if np.max(np.abs(g)) <= gtol:
            break
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(history):
            a = rho * (s @ q)
            alphas.append(a)
            q -= a * y
        if history:
            s, y, _ = history[-1]
            q *= (s @ y) / (y @ y)
        else:
            q /= max(1.0, np.linalg.norm(g))
        for (s, y, rho), a in zip(history, reversed(alphas)):
            q += s * (a - rho * (y @ q))
        d = -q
        slope = g @ d
        if slope >= 0:                 # not a descent direction: restart from steepest descent
            history.clear()
            d, slope = -g, -(g @ g)
        t = 1.0
        while True:
            x_new = x + t * d
            f_new, g_new = fun_grad(x_new)
            if f_new <= f + 1e-4 * t * slope:
                break
            t *= 0.5
            if t < 1e-12:
                return x
        s, y = x_new - x, g_new - g
        sy = s @ y
        if sy > 1e-12:
            history.append((s, y, 1.0 / sy))
            if len(history) > memory:
                history.pop(0)
        converged = abs(f - f_new) <= ftol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            break
    return x


def standardiser(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation per feature (a constant feature gets scale 1)."""
    w = weights / weights.sum()
    mean = w @ x
    sd = np.sqrt(np.maximum(w @ (x - mean) ** 2, 0.0))
    return mean, np.where(sd > 1e-6, sd, 1.0)


def fit_softmax(x: np.ndarray, y: np.ndarray, classes: list[str], *, weights: np.ndarray | None = None,
                lam: float = DEFAULT_LAMBDA, max_iter: int = MAX_ITER) -> Head:
    """A one-layer softmax head over `classes` (y: class indices) fitted to features x (N, D)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    n, d = x.shape
    k = len(classes)
    if n == 0 or k < 2:
        raise ValueError(f"need images of at least two classes, got {n} images and {k} classes")
    if y.min() < 0 or y.max() >= k:
        raise ValueError("labels must index the classes")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    mean, scale = standardiser(x, w)
    z = (x - mean) / scale
    w = w / w.sum()
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    def fun_grad(theta):
        weight, bias = theta[:d * k].reshape(d, k), theta[d * k:]
        p = softmax(z @ weight + bias)
        loss = -(w * np.log(p[np.arange(n), y] + 1e-12)).sum() + 0.5 * lam * (weight * weight).sum()
        err = (p - onehot) * w[:, None]
        return loss, np.concatenate([(z.T @ err + lam * weight).ravel(), err.sum(0)])

    theta = lbfgs(fun_grad, np.zeros(d * k + k), max_iter=max_iter)
    return Head(mean, scale, [(theta[:d * k].reshape(d, k), theta[d * k:])], ["softmax"], tuple(classes))


def balanced_weights(y: np.ndarray, k: int) -> np.ndarray:
    """Per-sample weights that give every class present the same total weight."""
    counts = np.bincount(y, minlength=k).astype(float)
    return (len(y) / (np.count_nonzero(counts) * np.maximum(counts, 1.0)))[y]


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per sample, each class spread round-robin over the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return fold
