"""JEI-DNN's learned exit gate (Regol et al., ICLR 2024) and its exit rules.

The gate scores IM ``l`` with ``g_l = σ(Linear(4→1)(stats(softmax(ŷ_l))))`` on four detached
confidence statistics. Under the official rule the scores set *unconditional* exit probabilities, capped so
their sum is at most 1, and a sample leaves at the first exit whose hazard reaches 0.5; the consistent rules
(``cdf``, ``hazard``) read the same scores as the quantities their targets train them to estimate
(docs/method.md, docs/usage.md). The strategy that trains this gate is in ``jei.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from eedn.core.contracts import Gate
from eedn.core.options import option

# --------------------------------------------------------------------------------------------------
# Gate statistics and the exit rule (pure functions, unit-tested on worked examples)
# --------------------------------------------------------------------------------------------------

GATE_STATISTICS = ("p_max", "entropy", "margin", "pow_entropy")


def gate_statistics(logits: Tensor) -> Tensor:
    """``[..., 4]`` = [p_max, H(p), top1 − top2, H(q)] of ``p = softmax(logits)``, with ``q ∝ p²``.

    Detached on purpose: the gate must not push gradients into the IM it reads.
    ``0·ln 0 = 0`` via ``xlogy``, so saturated softmaxes give finite entropies.
    """
    with torch.no_grad():
        p = logits.detach().float().softmax(-1)
        if p.shape[-1] >= 2:
            top = p.topk(2, dim=-1).values
            p_max, margin = top[..., 0], top[..., 0] - top[..., 1]
        else:  # one class: nothing to compare against
            p_max = p[..., 0]
            margin = p_max
        entropy = -torch.special.xlogy(p, p).sum(-1)
        p2 = p * p
        q = p2 / p2.sum(-1, keepdim=True)
        pow_entropy = -torch.special.xlogy(q, q).sum(-1)
        return torch.stack([p_max, entropy, margin, pow_entropy], dim=-1)


def _capped_and_hazards(g: Tensor) -> tuple[Tensor, Tensor]:
    """Capped exit probabilities ``[B, G]`` and hazards ``[B, G]``, following the row-by-row rule exactly.

    The loop runs over exits (G is small) and is vectorised over the batch; it performs the same
    float operations in the same order as the row-by-row reference, so decisions agree bit for bit.
    """
    b, n_gates = g.shape
    running_sum = g.new_zeros(b)
    survival = g.new_ones(b)
    probs, hazard = [], []
    for l in range(n_gates):
        gl = g[:, l]
        p = torch.clamp(torch.minimum(gl, 1 - running_sum), min=0)
        running_sum = running_sum + gl
        alive = survival > 0
        h = torch.where(alive, torch.clamp(p / torch.where(alive, survival, torch.ones_like(survival)), 0, 1),
                        torch.zeros_like(p))
        survival = survival * (1 - h)
        probs.append(p)
        hazard.append(h)
    if n_gates == 0:
        return g.new_zeros(b, 0), g.new_zeros(b, 0)
    return torch.stack(probs, 1), torch.stack(hazard, 1)


def capped_exit_probabilities(g: Tensor) -> Tensor:
    """``[B, G+1]``: ``P_l = max(0, min(g_l, 1 − Σ_{j<l} g_j))`` (raw-g sum) and ``P_G = 1 − Σ P_l``."""
    p, _ = _capped_and_hazards(g)
    return torch.cat([p, (1 - p.sum(1)).unsqueeze(1)], dim=1)


def hazards(g: Tensor) -> Tensor:
    """``[B, G]``: ``h_l = clip(P_l / Π_{j<l}(1 − h_j), 0, 1)``, 0 once the product is 0."""
    return _capped_and_hazards(g)[1]


def jei_exit_decision(g: Tensor) -> Tensor:
    """Exit index ``[B]``: the first ``l`` with ``h_l ≥ 0.5``, else ``G`` (the backbone's head)."""
    n_gates = g.shape[1]
    if n_gates == 0:
        return torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
    leave = hazards(g) >= 0.5
    first = leave.to(torch.uint8).argmax(1)
    return torch.where(leave.any(1), first, torch.full_like(first, n_gates))


#: how a rule reads the gate scores: ``official`` as capped unconditional exit probabilities (the hazard
#: rule above), ``cdf`` as ``P(l* ≤ l | x)`` and ``hazard`` as ``P(l* = l | l* ≥ l, x)``; the last two exit at
#: the first ``g_l ≥ τ`` (docs/method.md, "Consistent gate variants")
EXIT_RULES = ("official", "cdf", "hazard")


def first_above_decision(g: Tensor, tau: float = 0.5) -> Tensor:
    """Exit index ``[B]``: the first ``l`` with ``g_l ≥ τ``, else ``G`` (the backbone's head)."""
    n_gates = g.shape[1]
    if n_gates == 0:
        return torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
    leave = g >= tau
    first = leave.to(torch.uint8).argmax(1)
    return torch.where(leave.any(1), first, torch.full_like(first, n_gates))


def cdf_exit_probabilities(g: Tensor) -> Tensor:
    """``[B, G+1]`` exit probabilities of scores read as a CDF: ``P_l = F_l − F_{l−1}`` with
    ``F = cummax(g)`` (a CDF cannot fall) and ``P_G = 1 − F_{G−1}``."""
    f = torch.cummax(g, dim=1).values if g.shape[1] else g
    f = torch.cat([f, torch.ones_like(g[:, :1])], dim=1)
    return torch.diff(f, dim=1, prepend=torch.zeros_like(f[:, :1]))


def hazard_exit_probabilities(g: Tensor) -> Tensor:
    """``[B, G+1]`` exit probabilities of scores read as hazards: ``P_l = g_l Π_{j<l}(1 − g_j)``,
    ``P_G = Π_j(1 − g_j)``."""
    survival = torch.cumprod(torch.cat([torch.ones_like(g[:, :1]), 1 - g], dim=1), dim=1)  # [B, G+1]
    return torch.cat([g * survival[:, :-1], survival[:, -1:]], dim=1)


class JeiGate(Gate):
    """One ``Linear(4, 1)`` per intermediate exit on detached confidence statistics."""

    trainable = True
    @dataclass
    class Options:
        """How the scores are read; the strategy that trains the gate sets both to match its targets."""

        exit_rule: str = option("official", "official (capped exit probabilities, hazard >= 0.5), cdf or "
                                            "hazard (first exit with g_l >= tau)", choices=EXIT_RULES)
        tau: float = option(0.5, "threshold of the cdf and hazard rules", above=0, max=1)

    options: JeiGate.Options

    def __init__(self, num_exits: int, num_classes: int, **options: Any):
        super().__init__(num_exits, num_classes, **options)
        self.linears = nn.ModuleList([nn.Linear(len(GATE_STATISTICS), 1) for _ in range(num_exits)])

    def set_rule(self, exit_rule: str, tau: float) -> None:
        """Read the scores with ``exit_rule`` (one of :data:`EXIT_RULES`) at threshold ``tau``."""
        self.options = dataclasses.replace(self.options, exit_rule=exit_rule, tau=float(tau))

    @property
    def exit_rule(self) -> str:
        return self.options.exit_rule

    def gate_logit(self, exit_index: int, logits: Tensor) -> Tensor:
        """Pre-sigmoid score ``[B]`` of exit ``exit_index`` (what the BCE gate loss reads)."""
        lin = cast(nn.Linear, self.linears[exit_index])
        return lin(gate_statistics(logits).to(lin.weight.dtype)).squeeze(-1)

    def gate_logits(self, im_logits: Tensor) -> Tensor:
        """``[B, G]`` pre-sigmoid scores of all gates from the IM logits ``[B, G, C]`` in one pass."""
        linears = cast(list[nn.Linear], list(self.linears))
        weight = torch.cat([lin.weight for lin in linears], 0)  # [G, 4]
        bias = torch.cat([lin.bias for lin in linears], 0)  # [G]
        stats = gate_statistics(im_logits).to(weight.dtype)  # [B, G, 4]
        return (stats * weight).sum(-1) + bias

    def gate_logits_stacked(self, params: dict[str, Tensor], im_logits: Tensor) -> Tensor:
        """:meth:`gate_logits` of K stacked copies (``linears.l.weight`` ``[K, 1, 4]``) on their own IM
        logits ``[K, B, G, C]`` → ``[K, B, G]``, with the same arithmetic per copy."""
        n = len(self.linears)
        weight = torch.cat([params[f"linears.{l}.weight"] for l in range(n)], 1)  # [K, G, 4]
        bias = torch.cat([params[f"linears.{l}.bias"] for l in range(n)], 1)  # [K, G]
        stats = gate_statistics(im_logits).to(weight.dtype)  # [K, B, G, 4]
        return (stats * weight.unsqueeze(1)).sum(-1) + bias.unsqueeze(1)

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.gate_logit(exit_index, logits))

    def exits_at(self, prefix: Tensor) -> Tensor:
        if self.exit_rule != "official":
            return prefix[:, -1] >= self.options.tau
        # hazards are causal in g, so the prefix alone fixes h at its last column
        return hazards(prefix)[:, -1] >= 0.5

    def exit_probabilities(self, scores: Tensor) -> Tensor:
        if self.exit_rule == "cdf":
            return cdf_exit_probabilities(scores)
        if self.exit_rule == "hazard":
            return hazard_exit_probabilities(scores)
        return capped_exit_probabilities(scores)

    def official_muladds(self) -> int:
        """One gate's cost in the official op counter: 9C + 6 (docs/method.md §2.3)."""
        return 9 * self.num_classes + 6

    def decide(self, scores: Tensor) -> Tensor:
        if self.exit_rule != "official":
            return first_above_decision(scores, self.options.tau)
        return jei_exit_decision(scores)

    def describe(self) -> dict:
        rules = {"official": "first exit with hazard >= 0.5 on min-capped exit probabilities",
                 "cdf": f"first exit with g_l >= {self.options.tau:g}, g_l read as P(l* <= l)",
                 "hazard": f"first exit with g_l >= {self.options.tau:g}, g_l read as P(l* = l | l* >= l)"}
        return {"type": "jei", "num_gates": self.num_exits, "statistics": list(GATE_STATISTICS),
                "exit_rule": self.exit_rule, "tau": self.options.tau, "rule": rules[self.exit_rule]}
