"""BoostNet (Yu et al., AAAI 2023) on a frozen backbone.

Stage outputs ``o_s`` are IM ``s``'s logits for ``s < G`` and the frozen final head's for ``s = G``.
Exit ``s`` reports the boosted ensemble ``F_s = o_s + decay·F_{s−1}`` (``F_{−1} = 0``, decay 0.5), i.e.
``F_s = Σ_{j≤s} decay^{s−j} o_j``. Each weak learner fits the residual of the detached ensemble before
it: ``loss = Σ_s CE(o_s + decay·sg(F_{s−1}), y)`` (the ``s = G`` term has no trainable part; it is kept
so the logged loss is BoostNet's whole loss).

The ensemble lives in the model as ``model.exit_combiner`` (a :class:`BoostNetEnsemble`), attached by
``prepare_model``, so stored outputs, gates and the real early-exit engine all see ``F_s``. Its
``decay`` buffer travels in the heads state dict, so loading BoostNet heads into a model without the
combiner fails loudly instead of silently reporting un-boosted logits.

Checkpoint: the epoch with the best val accuracy of the last stage (``select="final"``: ``F_G``, the
stage the official code tracks); ``"last_im"`` uses ``F_{G−1}``, ``"last"`` keeps the last epoch.
The MSDNet gradient rescaling of the official port is omitted (a no-op on a frozen backbone,
whose stages receive no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eedn.core.model import EarlyExitModel
from eedn.runtime.errors import EednError
from eedn.core.options import option
from eedn.train.strategy import (SELECT_CHOICES, FitContext, SGDHeadOptions, StrategyResult, TrainingStrategy,
                                 head_optimizer, init_ims_from_probe)
from eedn.train.heads import cosine_schedule, train_heads


class BoostNetEnsemble(nn.Module):
    """Per-exit logits ``[B, E, C]`` -> boosted ensembles ``F`` ``[B, E, C]``.

    Causal: on a prefix ``[B, l+1, C]`` (exits 0..l, as a real early-exit engine has them) it gives
    ``F_0..F_l``, the same values as on the full tensor."""

    decay: Tensor  # a registered buffer

    def __init__(self, decay: float = 0.5):
        super().__init__()
        self.register_buffer("decay", torch.tensor(float(decay)))

    def forward(self, logits: Tensor) -> Tensor:
        out, prev = [], None
        for s in range(logits.shape[1]):
            cur = logits[:, s] if prev is None else logits[:, s] + self.decay.to(logits.dtype) * prev
            out.append(cur)
            prev = cur
        return torch.stack(out, dim=1)


def boostnet_loss(stage_logits: Tensor, labels: Tensor, decay: float = 0.5) -> Tensor:
    """``Σ_s mean_n CE(o_s + decay·sg(F_{s−1}), y)`` for stage logits ``[B, E, C]``."""
    total, prev = stage_logits.new_zeros(()), None
    for s in range(stage_logits.shape[1]):
        boosted = stage_logits[:, s] if prev is None else stage_logits[:, s] + decay * prev.detach()
        total = total + F.cross_entropy(boosted, labels)
        prev = boosted
    return total


class BoostNetStrategy(TrainingStrategy):
    """Boosted IMs on a frozen backbone; exits report the running ensemble."""

    default_gate = "max_prob"

    @dataclass
    class Options(SGDHeadOptions):
        decay: float = option(0.5, "weight of the previous ensemble: F_s = o_s + decay·F_{s−1}", min=0, max=1)
        select: str = option("final", "checkpoint: best val accuracy of the final exit's ensemble (final), of "
                                      "the last IM's (last_im), or the last epoch (last); exit_ce does not apply "
                                      "(each exit reports an ensemble of the IMs before it)",
                             choices=SELECT_CHOICES)

    options: BoostNetStrategy.Options

    def prepare_model(self, model: EarlyExitModel) -> None:
        """Attach the ensemble combiner (before fit, and before saved BoostNet heads are loaded)."""
        if not isinstance(model.exit_combiner, BoostNetEnsemble):
            device = next(model.ims.parameters()).device if len(model.ims) else "cpu"
            model.exit_combiner = BoostNetEnsemble(self.options.decay).to(device)
        model.exit_combiner.decay.fill_(self.options.decay)

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.options
        torch.manual_seed(context.seed)
        self.prepare_model(model)
        model.backbone.requires_grad_(False)
        g = len(model.ims)
        if o.select == "exit_ce":
            raise EednError("strategy 'boostnet': select=exit_ce picks each IM's epoch alone, but BoostNet's exits "
                            "report ensembles of all earlier IMs; use select=final, last_im or last")
        if o.init == "probe":  # IM 0's optimum; later IMs start from their own exit's probe
            init_ims_from_probe(model, context, weight_decay=float(o.weight_decay or 0.0))
        opt = head_optimizer(model.ims.parameters(), o)

        def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
            ims = [model.ims[l](feats[l]) for l in range(g)]
            with torch.no_grad():
                final = model.exit_logits(g, feats[g])
            loss = boostnet_loss(torch.stack(ims + [final], dim=1), y, o.decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        history = train_heads(model, context, name="boostnet", epochs=o.epochs, batch_size=o.batch_size,
                              step=step, select=o.select, standardize=bool(o.standardize),
                              augmented=self.head_augment,
                              end_epoch=cosine_schedule(opt, o.epochs))
        return StrategyResult(settings=[("boostnet", model.heads_state_dict())], history=history)
