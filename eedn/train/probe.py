"""A converged linear probe per exit: the reference an exit's linear IM should reach on the same features.

Each exit's features are standardised with the train split's mean and standard deviation, a multinomial logistic
regression is fitted to convergence with L-BFGS (weight decay on the weights, optionally early stopping on val
CE), and the weights are folded back onto the raw features (``W' = W/σ``, ``b' = b − W'μ``), so the result is a
plain ``Linear`` with the IM's inference cost. Head training uses it as a warm start (``init=probe``), the tests
and the ablation as the bar the trained IMs are held to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LinearProbe:
    """Weights ``[C, D]`` and bias ``[C]`` on the raw features, and what the fit did."""

    weight: Tensor
    bias: Tensor
    iterations: int
    train_loss: float
    val_loss: float | None = None

    def logits(self, features: Tensor) -> Tensor:
        return features.float() @ self.weight.t() + self.bias

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return float((self.logits(features).argmax(-1) == labels).float().mean())


def standardization(features: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-feature mean and standard deviation ``([D], [D])`` of ``[N, D]`` features; a constant feature gets
    σ = 1, so it is left as it is rather than blown up."""
    x = features.float()
    mu = x.mean(0)
    sigma = x.std(0, unbiased=False) if len(x) > 1 else torch.ones_like(mu)
    return mu, torch.where(sigma > eps, sigma, torch.ones_like(sigma))


def fold_standardization(weight: Tensor, bias: Tensor, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Weights that act on raw features as ``(weight, bias)`` act on ``(x − μ)/σ``: ``W/σ``, ``b − (W/σ)μ``."""
    w = weight / sigma
    return w, bias - w @ mu


def unfold_standardization(weight: Tensor, bias: Tensor, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`fold_standardization`: raw-feature weights expressed on standardised features."""
    return weight * sigma, bias + weight @ mu


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 1e-4,
                     val: tuple[Tensor, Tensor] | None = None, max_iter: int = 500, chunk: int = 25,
                     patience: int = 3, tol: float = 1e-7) -> LinearProbe:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS.

    Minimises ``mean CE + weight_decay/2·‖W‖²`` (``W`` on the standardised features, bias not decayed). With
    ``val`` the fit runs in chunks of ``chunk`` iterations and keeps the chunk end with the lowest val CE,
    stopping after ``patience`` chunks without a new best (early stopping); without it, it runs until the
    loss changes by less than ``tol`` or ``max_iter`` iterations.
    """
    x = features.float()
    y = labels.long()
    mu, sigma = standardization(x)
    z = (x - mu) / sigma
    d = z.shape[1]
    w = torch.zeros(num_classes, d, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=chunk, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=tol, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        return F.cross_entropy(z @ w.t() + b, y) + 0.5 * weight_decay * w.square().sum()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    zv = None if val is None else (val[0].float() - mu) / sigma
    best: tuple[float, Tensor, Tensor] | None = None
    stale, done, previous = 0, 0, float("inf")
    with torch.enable_grad():
        while done < max_iter:
            opt.step(closure)
            done += chunk
            with torch.no_grad():
                loss = float(objective())
                if zv is not None and val is not None:
                    val_loss = float(F.cross_entropy(zv @ w.t() + b, val[1].long()))
                    if best is None or val_loss < best[0]:
                        best, stale = (val_loss, w.detach().clone(), b.detach().clone()), 0
                    else:
                        stale += 1
                        if stale >= patience:
                            break
            if abs(previous - loss) < tol:
                break
            previous = loss
    kept_val: float | None = None
    wf, bf = w.detach(), b.detach()
    if best is not None:
        kept_val, wf, bf = best
    weight, bias = fold_standardization(wf, bf, mu, sigma)
    return LinearProbe(weight, bias, done, loss, kept_val)


def probe_exits(train: list[Tensor], train_labels: Tensor, num_classes: int, *, weight_decay: float = 1e-4,
                val: tuple[list[Tensor], Tensor] | None = None, max_iter: int = 500) -> list[LinearProbe]:
    """One converged probe per exit's features (``train[l]`` ``[N, D_l]``), val CE early stopping when ``val``
    (``(features per exit, labels)``) is given."""
    probes = []
    for l, x in enumerate(train):
        v = None if val is None else (val[0][l], val[1])
        probes.append(fit_linear_probe(x, train_labels, num_classes, weight_decay=weight_decay, val=v,
                                       max_iter=max_iter))
    return probes
