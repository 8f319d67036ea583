"""L2W-DEN (Han et al., ECCV 2022, "Learning to Weight Samples for Dynamic Early-exiting Networks")
on a frozen backbone (spec §4.3).

A weight net ``MLP(G → 500 → G)`` (ReLU hidden layer, tanh output) reads a sample's per-IM CE losses
(detached) and outputs ``m`` ``[B, G]``. The per-sample, per-IM loss weights are
``w = 1 + 0.3·(m − mean(m))`` where the mean runs over the whole ``[B, G]`` batch matrix. (Reading of
the spec line "Input: the sample's per-IM CE losses m; weights w = 1 + 0.3·(m − mean(m))": ``m`` in the
weight formula is the weight net's tanh output, not its CE input — otherwise the net would be unused.)
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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from eedn.strategy import StrategyResult, TrainingStrategy
from eedn.data import DataSplits
from eedn.errors import EednError
from eedn.model import EarlyExitModel
from eedn.strategy import FitContext, per_exit_cross_entropy, sgd
from eedn_plugins.sdn import resolve_options, selection_metric, train_batches, val_exit_accuracy


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
    DEFAULTS: dict[str, Any] = {
        "epochs": 15, "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
        "meta_lr": 1e-4, "meta_weight_decay": 1e-4, "meta_interval": 100, "hidden": 500,
        "weight_scale": 0.3, "meta_q": 0.75, "select": "last_im",
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.opts = resolve_options("l2w", self.DEFAULTS, options)
        if not isinstance(self.opts["meta_interval"], int) or self.opts["meta_interval"] < 1:
            raise EednError(f"l2w option meta_interval must be a positive integer, got {self.opts['meta_interval']!r}")

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.opts
        torch.manual_seed(context.seed)
        model.backbone.requires_grad_(False)
        g = len(model.ims)
        if g == 0:
            raise EednError("l2w needs at least one intermediate exit")
        wnet = WeightNet(g, int(o["hidden"])).to(context.device)
        self.weight_net = wnet  # kept for inspection; it plays no part at inference
        opt = sgd(model.ims.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        meta_opt = torch.optim.Adam(wnet.parameters(), lr=o["meta_lr"], weight_decay=o["meta_weight_decay"])
        shares = meta_target_shares(g, float(o["meta_q"]))
        total_steps = o["epochs"] * context.features.num_batches("train", o["batch_size"])
        step, history = 0, []
        best_metric, best_state = None, None
        for epoch in range(o["epochs"]):
            model.ims.train()
            total, count, meta_losses = 0.0, 0, []
            for feats, y in context.progress.track(train_batches(context, o["batch_size"], epoch, self.head_augment),
                                                   f"L2W-DEN epoch {epoch + 1}/{o['epochs']}"):
                lr = cosine(o["lr"], step, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                for group in meta_opt.param_groups:
                    group["lr"] = cosine(o["meta_lr"], step, total_steps)
                half = (len(y) + 1) // 2
                a = ([f[:half] for f in feats], y[:half])
                b = ([f[half:] for f in feats], y[half:])
                if step % o["meta_interval"] == 0 and len(b[1]) > 0:
                    meta_losses.append(self._meta_step(model, wnet, opt, meta_opt, a, b, lr, shares))
                for fs, ys in (a, b):
                    if len(ys) == 0:
                        continue
                    ce = per_exit_cross_entropy(model.im_logits(fs), ys)
                    with torch.no_grad():
                        w = l2w_sample_weights(wnet(ce.detach()), float(o["weight_scale"]))
                    loss = (w * ce).sum(1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, count = total + float(loss.detach()) * len(ys), count + len(ys)
                step += 1
            val_acc = val_exit_accuracy(model, context)
            metric = selection_metric(val_acc, o["select"])
            if best_state is None or metric is None or metric > best_metric:
                best_metric, best_state = metric, model.heads_state_dict()
            history.append({"phase": "l2w", "epoch": epoch, "loss": total / max(count, 1), "lr": lr,
                            "meta_loss": sum(meta_losses) / len(meta_losses) if meta_losses else None,
                            "val_accuracy": val_acc.tolist()})
        model.load_heads_state_dict(best_state)
        return StrategyResult(settings=[("l2w", model.heads_state_dict())], history=history)

    def _meta_step(self, model: EarlyExitModel, wnet: WeightNet, opt: torch.optim.SGD, meta_opt: torch.optim.Adam,
                   a: tuple[list[Tensor], Tensor], b: tuple[list[Tensor], Tensor], lr: float, shares: Tensor) -> float:
        """One look-ahead SGD step of the IMs on A, meta loss on B, one Adam step of the weight net."""
        o = self.opts
        g = len(model.ims)
        params = dict(model.ims.named_parameters())

        def logits_with(p: dict[str, Tensor], feats: list[Tensor]) -> Tensor:
            cols = []
            for l in range(g):
                prefix = f"{l}."
                sub = {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
                cols.append(functional_call(model.ims[l], sub, (feats[l],)))
            return torch.stack(cols, dim=1)

        ce_a = per_exit_cross_entropy(logits_with(params, a[0]), a[1])
        w = l2w_sample_weights(wnet(ce_a.detach()), float(o["weight_scale"]))
        loss_a = (w * ce_a).sum(1).mean()
        names = list(params)
        grads = torch.autograd.grad(loss_a, [params[n] for n in names], create_graph=True)
        stepped = {}
        for name, grad in zip(names, grads):
            p = params[name]
            d = grad + o["weight_decay"] * p
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and o["momentum"]:
                d = o["momentum"] * buf + d
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
