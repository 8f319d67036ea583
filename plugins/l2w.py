"""L2W-DEN (Han et al., ECCV 2022, "Learning to Weight Samples for Dynamic Early-exiting Networks")
on a frozen backbone.

A weight net ``MLP(G → 500 → G)`` (ReLU hidden layer, tanh output) reads a sample's per-IM CE losses
(detached) and outputs ``m`` ``[B, G]``. The per-sample, per-IM loss weights are
``w = 1 + 0.3·(m − mean(m))`` where the mean runs over the whole ``[B, G]`` batch matrix. (``m`` in the
weight formula is the weight net's tanh output, not its CE input: otherwise the net would be unused.)
The training loss of a batch is ``mean_n Σ_l w_{n,l}·CE_{n,l}`` over the IMs (the final head is frozen).

Each batch is split into halves A and B. Every ``meta_interval`` iterations (the first included) a
meta step runs first: one differentiable SGD step of the IMs on A with the predicted weights (with the
main optimiser's momentum buffers and weight decay; ``torch.func.functional_call``), then the meta loss
on B under the stepped IMs, with each sample assigned to one exit greedily by confidence (exit j takes
the ``floor(n·t_j)`` most confident unassigned samples, ``t_j ∝ meta_q^k`` for k = 1..G+1; the last IM
takes the rest), and one Adam step of the weight net. Then the IMs take a main step on A with the
detached weights, and another on B (halves swapped). The main lr follows a per-iteration cosine from
``lr`` to 0 over all iterations; the meta lr a cosine from ``meta_lr`` to 0. The checkpoint is the
epoch with the best val accuracy of the last IM (``select``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from eedn.runtime.errors import EednError
from eedn.core.model import EarlyExitModel
from eedn.core.options import option
from eedn.train.strategy import (FitContext, SGDHeadOptions, StrategyResult, TrainingStrategy, head_optimizer,
                                 init_ims_from_probe, per_exit_cross_entropy)
from eedn.train.heads import train_heads


class WeightNet(nn.Module):
    """Per-IM losses ``[B, G]`` -> tanh outputs ``m`` ``[B, G]`` in (-1, 1)."""

    def __init__(self, num_ims: int, hidden: int = 500):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_ims, hidden), nn.ReLU(), nn.Linear(hidden, num_ims), nn.Tanh())

    def forward(self, losses: Tensor) -> Tensor:
        return self.net(losses)


def l2w_sample_weights(m: Tensor, scale: float = 0.3) -> Tensor:
    """``w = 1 + scale·(m − mean(m))``, the mean taken over the whole ``[B, G]`` matrix."""
    return 1.0 + scale * (m - m.mean())


def meta_target_shares(num_ims: int, q: float = 0.75) -> Tensor:
    """Exit shares ``[G+1]`` ∝ ``q^k`` for k = 1..G+1 (q = 0.75 is p = 15 on MSDNet's p/20 grid)."""
    k = torch.arange(1, num_ims + 2, dtype=torch.float64)
    w = q ** k
    return w / w.sum()


def greedy_confidence_assignment(confidence: Tensor, shares: Tensor) -> Tensor:
    """Exit ``[n]`` in 0..G-1 for a ``[n, G]`` IM confidence matrix: IM j < G-1 takes the
    ``floor(n·shares[j])`` most confident unassigned samples; the last IM takes the rest."""
    n, g = confidence.shape
    assigned = torch.full((n,), g - 1, dtype=torch.long, device=confidence.device)
    free = torch.ones(n, dtype=torch.bool, device=confidence.device)
    for j in range(g - 1):
        take = min(int(math.floor(n * float(shares[j]) + 1e-9)), int(free.sum()))
        if take == 0:
            continue
        conf = confidence[:, j].masked_fill(~free, -math.inf)
        rows = conf.topk(take).indices
        assigned[rows] = j
        free[rows] = False
    return assigned


def cosine(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class L2WStrategy(TrainingStrategy):
    """IMs trained with per-sample weights from a meta-learned weight net."""

    default_gate = "max_prob"
    compat_select = "last_im"
    #: the meta step differentiates through one SGD step of the IMs, so the clean profile keeps SGD (on
    #: standardised features, where lr 0.1 converges)
    profile_overrides: ClassVar[dict[str, dict[str, Any]]] = {"clean": {"optimizer": "sgd", "lr": 0.1}}

    @dataclass
    class Options(SGDHeadOptions):
        meta_lr: float = option(1e-4, "Adam learning rate of the weight net (cosine to 0)", min=0)
        meta_weight_decay: float = option(1e-4, "Adam weight decay of the weight net", min=0)
        meta_interval: int = option(100, "iterations between meta steps (the first iteration has one)", min=1)
        hidden: int = option(500, "hidden width of the weight net", min=1)
        weight_scale: float = option(0.3, "scale of the sample weights: w = 1 + scale·(m − mean(m))", min=0)
        meta_q: float = option(0.75, "exit shares of the meta loss ∝ meta_q^k", min=0)

    options: L2WStrategy.Options

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.options
        torch.manual_seed(context.seed)
        model.backbone.requires_grad_(False)
        g = len(model.ims)
        if g == 0:
            raise EednError("l2w needs at least one intermediate exit")
        wnet = WeightNet(g, o.hidden).to(context.device)
        self.weight_net = wnet  # kept for inspection; it plays no part at inference
        if o.init == "probe":
            init_ims_from_probe(model, context, weight_decay=float(o.weight_decay or 0.0))
        opt = head_optimizer(model.ims.parameters(), o)
        if o.optimizer != "sgd":
            raise EednError("strategy 'l2w': the meta step differentiates through one SGD step of the IMs; set "
                            "optimizer=sgd")
        meta_opt = torch.optim.Adam(wnet.parameters(), lr=o.meta_lr, weight_decay=o.meta_weight_decay)
        shares = meta_target_shares(g, o.meta_q)
        total_steps = o.epochs * context.features.num_batches("train", o.batch_size)
        iteration, lr, meta_losses = 0, float(o.lr or 0.0), []

        def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
            """A meta step every ``meta_interval`` iterations, then one main step on each half."""
            nonlocal iteration, lr
            lr = cosine(float(o.lr or 0.0), iteration, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            for group in meta_opt.param_groups:
                group["lr"] = cosine(o.meta_lr, iteration, total_steps)
            half = (len(y) + 1) // 2
            a = ([f[:half] for f in feats], y[:half])
            b = ([f[half:] for f in feats], y[half:])
            if iteration % o.meta_interval == 0 and len(b[1]) > 0:
                meta_losses.append(self._meta_step(model, wnet, opt, meta_opt, a, b, lr, shares))
            total = 0.0
            for fs, ys in (a, b):
                if len(ys) == 0:
                    continue
                ce = per_exit_cross_entropy(model.im_logits(fs), ys)
                with torch.no_grad():
                    w = l2w_sample_weights(wnet(ce.detach()), o.weight_scale)
                loss = (w * ce).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(ys)
            iteration += 1
            return total / len(y)

        def end_epoch(epoch: int) -> dict:
            mean_meta = sum(meta_losses) / len(meta_losses) if meta_losses else None
            meta_losses.clear()
            return {"lr": lr, "meta_loss": mean_meta}

        history = train_heads(model, context, name="l2w", epochs=o.epochs, batch_size=o.batch_size, step=step,
                              select=str(o.select), patience=int(o.patience or 0), standardize=bool(o.standardize),
                              score_start=o.init == "probe", augmented=self.head_augment, end_epoch=end_epoch)
        return StrategyResult(settings=[("l2w", model.heads_state_dict())], history=history)

    def _meta_step(self, model: EarlyExitModel, wnet: WeightNet, opt: torch.optim.Optimizer, meta_opt: torch.optim.Adam,
                   a: tuple[list[Tensor], Tensor], b: tuple[list[Tensor], Tensor], lr: float, shares: Tensor) -> float:
        """One look-ahead SGD step of the IMs on A, meta loss on B, one Adam step of the weight net."""
        o = self.options
        g = len(model.ims)
        # IMs the checkpoint rule froze (patience ran out) keep their weights: the look-ahead steps the others
        params: dict[str, Tensor] = {n: p for n, p in model.ims.named_parameters() if p.requires_grad}
        if not params:
            return 0.0

        def logits_with(p: dict[str, Tensor], feats: list[Tensor]) -> Tensor:
            cols = []
            for l in range(g):
                prefix = f"{l}."
                sub = {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
                cols.append(functional_call(model.ims[l], sub, (feats[l],)))
            return torch.stack(cols, dim=1)

        ce_a = per_exit_cross_entropy(logits_with(params, a[0]), a[1])
        w = l2w_sample_weights(wnet(ce_a.detach()), o.weight_scale)
        loss_a = (w * ce_a).sum(1).mean()
        names = list(params)
        grads = torch.autograd.grad(loss_a, [params[n] for n in names], create_graph=True)
        stepped = {}
        for name, grad in zip(names, grads):
            p = params[name]
            d = grad + float(o.weight_decay or 0.0) * p
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and o.momentum:
                d = o.momentum * buf + d
            stepped[name] = p - lr * d
        logits_b = logits_with(stepped, b[0])
        with torch.no_grad():
            confidence = logits_b.softmax(-1).max(-1).values
            exit_of = greedy_confidence_assignment(confidence, shares)
        chosen = logits_b[torch.arange(len(b[1]), device=logits_b.device), exit_of]
        meta_loss = F.cross_entropy(chosen, b[1])
        meta_opt.zero_grad(set_to_none=True)
        meta_loss.backward(inputs=list(wnet.parameters()))
        meta_opt.step()
        return float(meta_loss.detach())
