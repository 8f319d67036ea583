"""JEI-DNN's pure parts (Regol et al., ICLR 2024): the gate targets and pos-weights, the gate and IM losses, and the
profiles and variant pairings that fill the strategy's options (``jei.py`` trains with them, ``jei_gate.py`` reads the
gate's scores). Functions of tensors and strings only, no model and no training state."""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from eedn.runtime.errors import EednError

# --------------------------------------------------------------------------------------------------
# Targets, pos-weights and losses
# --------------------------------------------------------------------------------------------------


def gate_targets(per_exit_ce: Tensor, lam: float, costs: Tensor) -> tuple[Tensor, Tensor]:
    """``(l*, t)``: ``l* = first argmin_l (CE_l + λ c_l)`` over exits 0..G and cumulative targets
    ``t_l = 1{l ≥ l*}`` for the G gates (all 0 when l* = G)."""
    total = per_exit_ce + lam * costs.to(per_exit_ce)
    best = total.argmin(dim=1)  # torch returns the first minimum: ties go to the earlier exit
    n_gates = per_exit_ce.shape[1] - 1
    gates = torch.arange(n_gates, device=per_exit_ce.device)
    return best, (gates.unsqueeze(0) >= best.unsqueeze(1)).to(per_exit_ce.dtype)


def pos_weights_from_counts(counts: Tensor, num_samples: int, max_weight: float = 5.0) -> Tensor:
    """``w_l = min((N − n_l)/n_l, 5)`` with ``n_l`` clamped to ≥ 0.1."""
    n = counts.double().clamp(min=0.1)
    return ((num_samples - n) / n).clamp(max=max_weight).float()


def pos_weights(best_exit: Tensor, num_gates: int, counts: str = "exact") -> Tensor:
    """Positive-class weights from the optimal exits ``l*`` of the val samples: ``exact`` counts
    ``#{l* = l}`` (the official choice, although targets are cumulative), ``cumulative`` ``#{l* ≤ l}``, or
    ``survivors``: ``#{l* = l}`` among the ``#{l* ≥ l}`` samples still running at ``l`` (hazard targets)."""
    hist = torch.bincount(best_exit.cpu(), minlength=num_gates + 1)
    if counts == "survivors":
        running = hist.flip(0).cumsum(0).flip(0)[:num_gates]  # #{l* >= l}
        n = hist[:num_gates].double().clamp(min=0.1)
        return ((running.double() - n) / n).clamp(min=0.0, max=5.0).float()  # no survivors: no loss, weight 0
    hist = hist[:num_gates]
    if counts == "cumulative":
        hist = hist.cumsum(0)
    return pos_weights_from_counts(hist, int(best_exit.numel()))


#: gate target kinds: ``cumulative`` ``1{l ≥ l*}`` (official), ``hazard`` ``1{l = l*}`` on the samples still
#: running at ``l`` only, ``onehot`` ``1{l = l*}`` on every sample (docs/method.md, "Consistent gate variants")
TARGETS = ("cumulative", "hazard", "onehot")


def variant_targets(best_exit: Tensor, num_gates: int, kind: str = "cumulative") -> tuple[Tensor, Tensor | None]:
    """``(t, mask)`` ``[N, G]`` for the gates from the optimal exits ``l*``; ``mask`` (None: every pair) marks
    the (sample, gate) pairs the loss reads: for ``hazard`` only ``l* ≥ l``."""
    gates = torch.arange(num_gates, device=best_exit.device).unsqueeze(0)
    best = best_exit.unsqueeze(1)
    if kind == "cumulative":
        return (gates >= best).float(), None
    onehot = (gates == best).float()
    return onehot, ((best >= gates).float() if kind == "hazard" else None)


def gate_phase_loss(gate_logits: Tensor, per_exit_ce: Tensor, lam: float, costs: Tensor, pos_weight: Tensor,
                    targets: str = "cumulative") -> Tensor:
    """The gate loss of one batch: targets of kind ``targets`` from ``l*`` (:func:`gate_targets`), then the
    pos-weighted BCE (the official loss for ``cumulative``)."""
    best, cumulative = gate_targets(per_exit_ce, lam, costs)
    if targets == "cumulative":
        return gate_bce_loss(gate_logits, cumulative, pos_weight)
    t, mask = variant_targets(best, gate_logits.shape[1], targets)
    return gate_bce_loss(gate_logits, t.to(gate_logits), pos_weight, mask)


def gate_bce_loss(gate_logits: Tensor, targets: Tensor, pos_weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the N×G pairs of ``w·BCEWithLogits``, ``w = pos_weight_l`` where ``t = 1`` else 1; with a
    ``mask``, the mean over the pairs it marks (0 when none)."""
    bce = F.binary_cross_entropy_with_logits(gate_logits, targets, reduction="none")
    w = torch.where(targets > 0.5, pos_weight.to(bce).unsqueeze(0), torch.ones_like(bce))
    if mask is None:
        return (w * bce).mean()
    mask = mask.to(bce)
    return (mask * w * bce).sum() / mask.sum().clamp(min=1)


def uniform_im_loss(ce: Tensor) -> Tensor:
    """``mean_{n,l} CE_{n,l}``: the official IM loss once its exit weighting cancels."""
    return ce.mean()


def exit_weighted_im_loss(exit_probs: Tensor, ce: Tensor, renorm: bool = False, eps: float = 1e-6) -> Tensor:
    """``(1/N) Σ_n Σ_l sg(P_{n,l})·CE_{n,l}`` (the paper's intent), or with ``renorm`` the version
    rescaled to the uniform loss's magnitude, ``(1/(N·G)) Σ sg(P)·sg(S_n/(W_n+ε))·CE``."""
    p = exit_probs.detach()
    if not renorm:
        return (p * ce).sum(1).mean()
    with torch.no_grad():
        ratio = ce.sum(1) / ((p * ce).sum(1) + eps)
    return (p * ratio.unsqueeze(1) * ce).mean()


def official_im_loss(exit_probs: Tensor, ce: Tensor) -> Tensor:
    """The official code's IM loss ``mean_{n,l}[P·L·S_n/W_n]`` with the ratio *not* detached.

    Kept to document why the official loss is uniform: since ``Σ_l P·L = W_n``, it equals ``mean_n S_n / G``
    and its gradient w.r.t. every ``L_{n,l}`` is exactly ``1/(N·G)``: the exit weighting has no effect.
    """
    s = ce.sum(1, keepdim=True)
    w = (exit_probs * ce).sum(1, keepdim=True)
    return (exit_probs * ce * s / w).mean()


# --------------------------------------------------------------------------------------------------
# Profiles, pairings and the alternation
# --------------------------------------------------------------------------------------------------

#: what each profile sets for the options declared "per profile" (explicit options still win).
#: ``paper-compat`` reproduces the official code's behaviour (docs/usage.md, "JEI-DNN switches"). ``clean`` trains
#: the IMs to convergence first (``im_training=converge``): on the digits ResNet the alternation leaves exit 0's IM
#: at chance (10 %) and exit 1's at 29 %, against 75 % / 90.5 % for converged IMs (docs/method.md, "Converged IMs").
PROFILES: dict[str, dict[str, Any]] = {
    "clean": {"warmup": "fixed", "alternation": "auto", "gate_cost": "uniform_index", "im_loss": "uniform",
              "optimizers": "separate", "select": "last", "backbone_mode": "eval",
              "head_augment": False, "warmup_epochs": 3, "im_training": "converge"},
    "paper-compat": {"warmup": "fixed", "alternation": "batches:200", "gate_cost": "uniform_index",
                     "im_loss": "uniform", "optimizers": "shared", "im_training": "alternate",
                     "select": "pt_compat", "backbone_mode": "train", "head_augment": True},
}
#: per target kind: the exit rules that read it consistently and the pos-weight counts that match it (the
#: first of each is the default; ``cdf`` defaults to cumulative counts, docs/method.md "Consistent gate variants")
PAIRINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "cumulative": {"exit_rule": ("official", "cdf"), "pos_weight_counts": ("exact", "cumulative")},
    "hazard": {"exit_rule": ("hazard",), "pos_weight_counts": ("survivors",)},
    "onehot": {"exit_rule": ("official",), "pos_weight_counts": ("exact",)},
}
SWEEP_MODES = ("auto", "stacked", "loop")
#: the paper-time code's fixed warm-up epochs per (dataset, backbone) (docs/method.md §3.2); paper-compat reads
#: them, any other setting warms up for DEFAULT_WARMUP_EPOCHS (the CIFAR10 T2T-ViT-7 value)
OFFICIAL_WARMUP_EPOCHS = {("cifar10", "t2t_vit_7"): 3, ("cifar10", "t2t_vit_14"): 1, ("cifar100", "t2t_vit_7"): 4,
                          ("cifar100", "t2t_vit_14"): 1, ("cifar100-lt", "t2t_vit_7"): 4,
                          ("cifar100-lt", "t2t_vit_14"): 1, ("svhn", "t2t_vit_7"): 6}
DEFAULT_WARMUP_EPOCHS = 3
_ALTERNATION = re.compile(r"^(auto|batches:(\d+)|fraction:([0-9.eE+-]+))$")


def _check_alternation(value: str) -> None:
    m = _ALTERNATION.match(value)
    ok = m is not None
    if m is not None and ok and m.group(2) is not None:
        ok = int(m.group(2)) >= 1
    if m is not None and ok and m.group(3) is not None:
        try:
            ok = 0 < float(m.group(3)) <= 1
        except ValueError:
            ok = False
    if not ok:
        raise EednError(f"strategy 'jei': invalid alternation={value!r}; valid: auto, batches:N (N >= 1) or "
                        "fraction:F (0 < F <= 1)")


def alternation_block(spec: str, batches_per_epoch: int) -> int:
    """Batches per phase block: ``auto`` = min(200, ⌈half an epoch⌉) so every epoch (of ≥ 2 batches)
    sees both phases; ``batches:N``; ``fraction:F`` of an epoch."""
    if spec == "auto":
        return max(1, min(200, math.ceil(batches_per_epoch / 2)))
    kind, _, value = spec.partition(":")
    if kind == "batches":
        return int(value)
    return max(1, round(float(value) * batches_per_epoch))


def resolve_variant(targets: str | None, exit_rule: str | None, counts: str | None) -> dict[str, str]:
    """Fill the unset of ``targets`` / ``exit_rule`` / ``pos_weight_counts`` from the set ones (:data:`PAIRINGS`)
    and refuse pairings that read the gate inconsistently."""
    if targets is None:
        targets = "hazard" if exit_rule == "hazard" else "cumulative"
    pairing = PAIRINGS[targets]
    exit_rule = exit_rule or pairing["exit_rule"][0]
    if exit_rule not in pairing["exit_rule"]:
        raise EednError(f"strategy 'jei': exit_rule={exit_rule} does not read targets={targets}; with targets="
                        f"{targets} use exit_rule {' or '.join(pairing['exit_rule'])}")
    if counts is None:
        counts = "cumulative" if exit_rule == "cdf" else pairing["pos_weight_counts"][0]
    if counts not in pairing["pos_weight_counts"]:
        raise EednError(f"strategy 'jei': pos_weight_counts={counts} does not match targets={targets}; use "
                        f"{' or '.join(pairing['pos_weight_counts'])} (or leave it unset)")
    return {"targets": targets, "exit_rule": exit_rule, "pos_weight_counts": counts}


def official_warmup_epochs(dataset: str, backbone: str) -> int:
    """The paper-time code's warm-up epochs for a dataset / T2T-ViT size (docs/method.md §3.2), else 3."""
    return OFFICIAL_WARMUP_EPOCHS.get((dataset.lower(), backbone), DEFAULT_WARMUP_EPOCHS)
