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

from eedn.core.budgets import calibrate_offset, check_target, check_val
from eedn.core.contracts import Gate
from eedn.core.options import option
from eedn.core.outputs import ExitOutputs

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


#: what a gate reads (``gate_features``): ``own`` = the 4 statistics of its own exit (JEI-DNN); ``history`` adds
#: the trajectory of the earlier exits (:data:`HISTORY_STATISTICS`); ``history+hidden`` adds a learned projection
#: of the exit's hidden features. Every input of gate ``l`` comes from exits ``0..l`` only (causal).
GATE_FEATURE_SETS = ("own", "history", "history+hidden")
GATE_MODELS = ("linear", "mlp")
#: the history statistics of exit ``l``: max-prob of exit ``l-1`` and the change to it, the entropy change, the
#: patience count of PABEE (Zhou et al., NeurIPS 2020: consecutive earlier exits predicting exit ``l``'s class,
#: over ``G``), the share of all earlier exits that agree with it, and the mean max-prob of exits ``0..l``
#: (the confidence trajectory EENet (Ilhan et al., 2024) scores exits from). Exit 0 has no past: changes and
#: counts are 0, its previous max-prob is its own.
HISTORY_STATISTICS = ("p_max_prev", "p_max_change", "entropy_change", "patience", "agreement", "p_max_mean")
HIDDEN_PROJECTION = 8  # width of the learned projection of the hidden features (history+hidden)
MLP_WIDTH = 16  # hidden width of gate_model=mlp


def history_statistics(logits: Tensor, num_gates: int) -> Tensor:
    """``[B, L, 6]`` history statistics of every exit from the logits ``[B, L, C]`` of exits ``0..L-1``; the
    patience count is over ``num_gates`` (G), whatever ``L`` is.

    Exit ``l``'s row reads rows ``0..l`` only, with the same arithmetic whatever ``L`` is, so the engine
    (which sees a prefix) and the simulation on stored outputs (which sees all exits) agree bit for bit.
    """
    with torch.no_grad():
        stats = gate_statistics(logits)  # [B, L, 4]
        pred = logits.detach().argmax(-1)  # [B, L]
        b, n = pred.shape
        scale = float(max(num_gates, 1))
        rows = []
        p_sum = stats.new_zeros(b)
        for l in range(n):
            p_max, entropy = stats[:, l, 0], stats[:, l, 1]
            p_sum = p_sum + p_max
            if l == 0:
                zero = torch.zeros_like(p_max)
                rows.append(torch.stack([p_max, zero, zero, zero, zero, p_max], -1))
                continue
            same = pred[:, :l] == pred[:, l : l + 1]  # [B, l]: earlier exits agreeing with exit l
            streak = torch.flip(same.to(torch.int64), [1]).cumprod(1).sum(1).to(stats.dtype)
            rows.append(torch.stack([stats[:, l - 1, 0], p_max - stats[:, l - 1, 0], entropy - stats[:, l - 1, 1],
                                     streak / scale, same.to(stats.dtype).mean(1), p_sum / (l + 1)], -1))
        return torch.stack(rows, 1) if rows else stats.new_zeros(b, 0, len(HISTORY_STATISTICS))


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
#: the clean profile's rule: consistent with its targets, and the best of the three measured on digits
#: (docs/results.md); paper-compat keeps ``official``
CLEAN_EXIT_RULE = "cdf"


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
    """One small model per intermediate exit (``Linear(4, 1)`` in JEI-DNN) on detached confidence statistics,
    optionally with the earlier exits' history and a learned projection of the hidden features.

    A scalar ``offset`` (a buffer, 0 as trained) is added to every pre-sigmoid score: :meth:`calibrate` sets it
    on val so that one trained gate meets a MACs budget without retraining (``retargetable``)."""

    trainable = True
    retargetable = True

    @dataclass
    class Options:
        """How the scores are read; the strategy that trains the gate sets both to match its targets."""

        exit_rule: str = option("official", "official (capped exit probabilities, hazard >= 0.5), cdf or "
                                            "hazard (first exit with g_l >= tau)", choices=EXIT_RULES)
        tau: float = option(0.5, "threshold of the cdf and hazard rules", above=0, max=1)
        gate_features: str = option("own", "what each gate reads: own (4 statistics of its exit, JEI-DNN), history "
                                           "(+ max-prob trajectory, PABEE agreement, entropy change of the earlier "
                                           "exits) or history+hidden (+ a learned projection of the exit's "
                                           "features)", choices=GATE_FEATURE_SETS)
        gate_model: str = option("linear", f"per-exit gate model: linear or mlp (one hidden layer of {MLP_WIDTH})",
                                 choices=GATE_MODELS)

    options: JeiGate.Options
    offset: Tensor

    def __init__(self, num_exits: int, num_classes: int, **options: Any):
        super().__init__(num_exits, num_classes, **options)
        o = self.options
        self.reads_history = o.gate_features != "own"
        self.reads_features = o.gate_features == "history+hidden"
        width = len(GATE_STATISTICS) + (len(HISTORY_STATISTICS) if self.reads_history else 0)
        width += HIDDEN_PROJECTION if self.reads_features else 0
        self.input_width = width
        if o.gate_model == "linear":
            self.linears = nn.ModuleList([nn.Linear(width, 1) for _ in range(num_exits)])
        else:
            self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(width, MLP_WIDTH), nn.ReLU(), nn.Linear(MLP_WIDTH, 1))
                                       for _ in range(num_exits)])
        self.projections: nn.ModuleList | None = None  # built by bind_features (history+hidden)
        self.register_buffer("offset", torch.zeros((), dtype=torch.float64))
        self.setting: dict = {}

    def bind_features(self, feature_dims: list[int]) -> None:
        """Called by the model builder with the width of every intermediate exit's features."""
        if self.reads_features and self.projections is None:
            self.projections = nn.ModuleList([nn.Linear(d, HIDDEN_PROJECTION) for d in feature_dims[: self.num_exits]])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # gates saved before the offset existed load with offset 0 (as trained)
        state_dict.setdefault(prefix + "offset", torch.zeros((), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_rule(self, exit_rule: str, tau: float) -> None:
        """Read the scores with ``exit_rule`` (one of :data:`EXIT_RULES`) at threshold ``tau``."""
        self.options = dataclasses.replace(self.options, exit_rule=exit_rule, tau=float(tau))

    @property
    def exit_rule(self) -> str:
        return self.options.exit_rule

    # ---------------------------------------------------------------- inputs and scores
    def _inputs(self, exit_index: int, logits_upto: Tensor, features: Tensor | None) -> Tensor:
        """Gate ``exit_index``'s input ``[B, F]`` from the logits ``[B, l+1, C]`` of exits ``0..l``."""
        parts = [gate_statistics(logits_upto[:, -1])]
        if self.reads_history:
            parts.append(history_statistics(logits_upto, self.num_exits)[:, -1])
        if self.reads_features:
            if features is None or self.projections is None:
                raise ValueError("gate_features=history+hidden needs the exit's features")
            proj = self.projections[exit_index]
            parts.append(proj(features.to(next(proj.parameters()).dtype)))
        return torch.cat([p.to(parts[-1].dtype) for p in parts], -1)

    def _head(self, exit_index: int) -> nn.Module:
        return self.linears[exit_index] if self.options.gate_model == "linear" else self.mlps[exit_index]

    def gate_logit(self, exit_index: int, logits: Tensor, past: Tensor | None = None,
                   features: Tensor | None = None) -> Tensor:
        """Pre-sigmoid score ``[B]`` of exit ``exit_index`` (what the BCE gate loss reads) from its IM's logits,
        the earlier exits' logits ``past`` ``[B, l, C]`` (history) and its features (hidden)."""
        upto = logits.unsqueeze(1) if past is None or not self.reads_history else \
            torch.cat([past, logits.unsqueeze(1)], 1)
        head = self._head(exit_index)
        weight = next(head.parameters())
        return head(self._inputs(exit_index, upto, features).to(weight.dtype)).squeeze(-1)

    def gate_logits(self, im_logits: Tensor, feats: list[Tensor] | None = None) -> Tensor:
        """``[B, G]`` pre-sigmoid scores of all gates from the IM logits ``[B, G, C]`` (and the per-exit
        features, for history+hidden)."""
        if self.options.gate_features == "own" and self.options.gate_model == "linear":
            linears = cast(list[nn.Linear], list(self.linears))
            weight = torch.cat([lin.weight for lin in linears], 0)  # [G, 4]
            bias = torch.cat([lin.bias for lin in linears], 0)  # [G]
            stats = gate_statistics(im_logits).to(weight.dtype)  # [B, G, 4]
            return (stats * weight).sum(-1) + bias
        hist = history_statistics(im_logits, self.num_exits) if self.reads_history else None
        cols = []
        for l in range(im_logits.shape[1]):
            parts = [gate_statistics(im_logits[:, l])]
            if hist is not None:
                parts.append(hist[:, l])
            if self.reads_features:
                if feats is None or self.projections is None:
                    raise ValueError("gate_features=history+hidden needs the exits' features")
                proj = self.projections[l]
                parts.append(proj(feats[l].to(next(proj.parameters()).dtype)))
            head = self._head(l)
            x = torch.cat([p.to(parts[-1].dtype) for p in parts], -1)
            cols.append(head(x.to(next(head.parameters()).dtype)).squeeze(-1))
        return torch.stack(cols, 1) if cols else im_logits.new_zeros(im_logits.shape[0], 0)

    def gate_logits_stacked(self, params: dict[str, Tensor], im_logits: Tensor,
                            feats: list[Tensor] | None = None) -> Tensor:
        """:meth:`gate_logits` of K stacked copies (``linears.l.weight`` ``[K, 1, F]``) on their own IM
        logits ``[K, B, G, C]`` → ``[K, B, G]``, with the same arithmetic per copy."""
        if self.options.gate_features == "own" and self.options.gate_model == "linear":
            n = len(self.linears)
            weight = torch.cat([params[f"linears.{l}.weight"] for l in range(n)], 1)  # [K, G, 4]
            bias = torch.cat([params[f"linears.{l}.bias"] for l in range(n)], 1)  # [K, G]
            stats = gate_statistics(im_logits).to(weight.dtype)  # [K, B, G, 4]
            return (stats * weight.unsqueeze(1)).sum(-1) + bias.unsqueeze(1)
        k = im_logits.shape[0]
        return torch.stack([_call_with(self, {name: p[i] for name, p in params.items()}, im_logits[i], feats)
                            for i in range(k)])

    def forward(self, im_logits: Tensor, feats: list[Tensor] | None = None) -> Tensor:
        return self.gate_logits(im_logits, feats)

    def score_exit(self, exit_index: int, logits: Tensor, features: Tensor | None = None,
                   past: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.gate_logit(exit_index, logits, past, features) + self.offset.to(logits.device))

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        if self.reads_history and exit_index > 0:
            raise ValueError("a history gate scores exit l from exits 0..l: call score_exit with past")
        return self.score_exit(exit_index, logits, features)

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

    # ---------------------------------------------------------------- one knob for any budget
    def calibrate(self, val: ExitOutputs, target: dict) -> None:
        """Set ``offset`` so that the trained gate meets a ``macs_fraction`` or ``accuracy_drop`` target on val
        (the stored scores were computed with the current offset)."""
        check_val(self, val)
        check_target(target, ("macs_fraction", "accuracy_drop"))
        shift, summary = calibrate_offset(self.decide, val, target)
        self.offset.add_(shift)
        self.setting = {"target": dict(target), "offset": float(self.offset), "val_accuracy": summary["accuracy"],
                        "val_macs_fraction": summary["macs_fraction"]}

    def describe(self) -> dict:
        rules = {"official": "first exit with hazard >= 0.5 on min-capped exit probabilities",
                 "cdf": f"first exit with g_l >= {self.options.tau:g}, g_l read as P(l* <= l)",
                 "hazard": f"first exit with g_l >= {self.options.tau:g}, g_l read as P(l* = l | l* >= l)"}
        statistics = list(GATE_STATISTICS) + (list(HISTORY_STATISTICS) if self.reads_history else [])
        if self.reads_features:
            statistics.append(f"hidden_projection[{HIDDEN_PROJECTION}]")
        return {"type": "jei", "num_gates": self.num_exits, "statistics": statistics,
                "gate_features": self.options.gate_features, "gate_model": self.options.gate_model,
                "exit_rule": self.exit_rule, "tau": self.options.tau, "rule": rules[self.exit_rule],
                "offset": float(self.offset)} | self.setting


def _call_with(gate: JeiGate, params: dict[str, Tensor], im_logits: Tensor, feats: list[Tensor] | None) -> Tensor:
    """``gate.gate_logits`` with one stacked copy's parameters swapped in (differentiable in ``params``)."""
    from torch.func import functional_call

    return functional_call(gate, params, (im_logits, feats))
