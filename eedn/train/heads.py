"""The shared head-training loop every strategy trains its IMs (and gates) with, and the one rule for which
epoch's heads a training keeps (:class:`Checkpoint`). The strategy contract and the head-training options are
:mod:`eedn.train.strategy`'s."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from eedn.runtime.errors import EednError
from eedn.train.features import compute_split_outputs
from eedn.runtime.io import fault_point
from eedn.core.model import EarlyExitModel
from eedn.train.strategy import (FitContext, HeadTrainingOptions, SELECT_CHOICES, head_optimizer, init_ims_from_probe,
                                 per_exit_cross_entropy, resolve_head_profile, standardize_ims, unstandardize_ims,
                                 warmup_weights)


# ------------------------------------------------------------------------------ checkpoints


class Checkpoint:
    """The one rule for which epoch's heads a training keeps.

    After each epoch ``update(record, epoch)`` scores the epoch (``score(record)``: a float, one float per part,
    or None for "keep the last epoch"); per part (``parts``: state-dict key prefixes, e.g. one per IM; None:
    the whole heads) the state of the best-scoring epoch is kept, higher being better. With ``baseline`` an
    epoch must beat it to be kept (``initial`` stands otherwise); ``fixed_baseline`` never raises the bar (the
    official code's rule: the last epoch beating the warm-up wins). With ``patience`` a part that has not
    improved for that many epochs is restored to its best state and frozen (``modules[i]``); ``record_key``
    writes the parts' stopped flags into the epoch's record. ``finish()`` loads the kept state (with ``load``)
    and returns it (also as ``result``).
    """

    def __init__(self, state: Callable[[], dict[str, Tensor]], score: Callable[[dict], Any],
                 load: Callable[[dict[str, Tensor]], None] | None = None, parts: list[str] | None = None,
                 modules: list[nn.Module] | None = None, patience: int = 0, baseline: float = -math.inf,
                 fixed_baseline: bool = False, initial: dict[str, Tensor] | None = None,
                 record_key: str | None = None):
        self.state, self.score, self.load = state, score, load
        self.record_key = record_key
        self.result: dict[str, Tensor] | None = None
        self.parts = parts
        self.modules = modules
        n = len(parts) if parts is not None else 1
        self.patience = patience
        self.best = [baseline] * n
        self.fixed_baseline = fixed_baseline
        self.kept: list[dict[str, Tensor] | None] = [initial] * n
        self.epochs: list[int | None] = [None] * n
        self.stale = [0] * n
        self.stopped = [False] * n
        self.keeps_last = False
        self.last_epoch: int | None = None

    @property
    def all_stopped(self) -> bool:
        return all(self.stopped)

    def _part(self, state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        if self.parts is None:
            return state
        return {k: v for k, v in state.items() if k.startswith(self.parts[i])}

    def update(self, record: dict, epoch: int) -> None:
        self.last_epoch = epoch
        scores = self.score(record)
        if scores is None:
            self.keeps_last = True
            return
        scores = [float(s) for s in (scores if isinstance(scores, (list, tuple)) else [scores])]
        state: dict[str, Tensor] | None = None
        for i, score in enumerate(scores):
            if self.stopped[i]:
                continue
            if score > self.best[i]:
                state = state if state is not None else self.state()
                self.kept[i], self.epochs[i], self.stale[i] = self._part(state, i), epoch, 0
                if not self.fixed_baseline:
                    self.best[i] = score
            else:
                self.stale[i] += 1
                if self.patience and self.stale[i] >= self.patience:
                    self._stop(i)
        if self.record_key is not None:
            record[self.record_key] = list(self.stopped)

    def _stop(self, i: int) -> None:
        self.stopped[i] = True
        if self.modules is not None and self.load is not None and self.kept[i] is not None:
            live = self.state()
            live.update(self.kept[i])  # type: ignore[arg-type]
            self.load(live)
            self.modules[i].requires_grad_(False)

    def chosen_epoch(self) -> int | list[int | None] | None:
        if self.keeps_last:
            return self.last_epoch
        return self.epochs[0] if self.parts is None else list(self.epochs)

    def finish(self) -> dict[str, Tensor]:
        """The kept heads (loaded into the model when a ``load`` was given); stopped parts are unfrozen."""
        state = self.state()
        if not self.keeps_last:
            for kept in self.kept:
                if kept is not None:
                    state.update(kept)
        if self.load is not None:
            self.load(state)
        if self.modules is not None:
            for m in self.modules:
                m.requires_grad_(True)
        self.result = state
        return state


class CheckpointGroup:
    """One :class:`Checkpoint` per trained copy (a stacked λ sweep): copy k reads ``record[key][k]``."""

    def __init__(self, members: list[Checkpoint], key: str):
        self.members, self.key = members, key

    @property
    def all_stopped(self) -> bool:
        return all(m.all_stopped for m in self.members)

    def update(self, record: dict, epoch: int) -> None:
        for k, member in enumerate(self.members):
            member.update(record[self.key][k], epoch)

    def finish(self) -> list[dict[str, Tensor]]:
        return [m.finish() for m in self.members]


def select_checkpoint(model: EarlyExitModel, select: str, patience: int = 0) -> Checkpoint:
    """The checkpoint rule of ``select`` (:data:`SELECT_CHOICES`) on the live model's heads."""
    if select not in SELECT_CHOICES:
        raise EednError(f"select must be one of {', '.join(SELECT_CHOICES)}, got {select!r}")
    state, load = model.heads_state_dict, model.load_heads_state_dict
    if select == "exit_ce":
        g = len(model.ims)
        return Checkpoint(state, lambda r: [-c for c in r["val_loss"][:g]], load,
                          parts=[f"ims.{l}." for l in range(g)], modules=list(model.ims), patience=patience)
    return Checkpoint(state, lambda r: selection_metric(torch.tensor(r["val_accuracy"]), select), load)


def selection_metric(val_accuracy: Tensor, select: str) -> float | None:
    """The val number a checkpoint is chosen on: the last IM's or the final exit's accuracy (None: keep
    the last epoch)."""
    if select == "last":
        return None
    return float(val_accuracy[-2] if select == "last_im" and len(val_accuracy) > 1 else val_accuracy[-1])


# ------------------------------------------------------------------------------ the head-training loop


def val_exit_accuracy(model: EarlyExitModel, context: FitContext) -> Tensor:
    """Per-exit val accuracy ``[E]`` of the model as it reports its exits (combiner included)."""
    out = compute_split_outputs(model, context.features, "val", context.exit_macs, context.full_macs)
    return out.exit_accuracy()


def val_exit_metrics(model: EarlyExitModel, context: FitContext) -> dict:
    """Per-exit val accuracy and mean CE (``val_accuracy``, ``val_loss``) as the model reports its exits."""
    out = compute_split_outputs(model, context.features, "val", context.exit_macs, context.full_macs)
    ce = per_exit_cross_entropy(out.logits, out.labels).mean(0)
    return {"val_accuracy": out.exit_accuracy().tolist(), "val_loss": ce.tolist()}


def check_finite(loss: float, stage: str, epoch: int, setting: str = "strategy_options.lr") -> None:
    """Stop with one line when a training loss stops being finite (nothing is cached or written)."""
    if not math.isfinite(loss):
        raise EednError(f"{stage}: the training loss became {loss} in epoch {epoch + 1}; training diverged. "
                        f"Lower the learning rate ({setting}) and run again")


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> Callable[[int], dict]:
    """An ``end_epoch`` hook for :func:`eedn.train.heads.train_heads`: steps a per-epoch cosine schedule
    (to 0 over ``epochs``) and records the lr the epoch ran at."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    def end_epoch(epoch: int) -> dict:
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        return {"lr": lr}

    return end_epoch


def epoch_accuracies(val_accuracy: Tensor) -> dict[str, Any]:
    """What an epoch of head training shows: the IMs' mean val accuracy (the final head is often frozen, so
    its accuracy says nothing about training); ``record`` keeps every exit's for the trackers."""
    acc = [float(a) for a in val_accuracy]
    shown = {"IM_val_accuracy": sum(acc[:-1]) / len(acc[:-1])} if len(acc) > 1 else {"val_accuracy": acc[-1]}
    return shown | {"record": {f"val_accuracy_exit_{i}": a for i, a in enumerate(acc)}}


def _default_epoch_metrics(record: dict) -> dict | None:
    """A head-training epoch's progress line: the loss and the IMs' mean val accuracy (:func:`epoch_accuracies`)."""
    acc = record.get("val_accuracy")
    return {"loss": record.get("loss")} | (epoch_accuracies(acc) if acc is not None and len(acc) else {})


def train_heads(model: EarlyExitModel, context: FitContext, *, name: str, epochs: int, batch_size: int,
                step: Callable[[list[Tensor], Tensor, int], float], select: str = "last", augmented: bool = False,
                end_epoch: Callable[[int], dict | None] | None = None,
                validate: Callable[[], dict] | None = None, first_epoch: int = 0,
                checkpoint: Checkpoint | CheckpointGroup | None = None, patience: int = 0,
                standardize: bool = False, score_start: bool = False,
                epoch_metrics: Callable[[dict], dict | None] = _default_epoch_metrics,
                phase: str | None = None) -> list[dict]:
    """The epoch loop every head-training strategy shares (JEI's warm-up and alternations included).

    Each epoch (``first_epoch`` .. ``epochs - 1``) feeds the train batches (cached features when possible,
    same seeded order either way) to ``step(features, labels, epoch) -> loss``, which does the strategy's own
    optimiser work; checks the loss is finite; calls ``end_epoch(epoch)`` (schedulers; may return extra history
    fields); measures ``validate()`` (default: per-exit val accuracy and CE, :func:`val_exit_metrics`) and
    hands the epoch's record to the ``checkpoint`` rule (default: :func:`select_checkpoint` of ``select``),
    which keeps the chosen heads and loads them back at the end. The loop ends early when every part of the
    checkpoint has stopped (``patience``). With ``standardize`` the IMs train on standardised features and are
    folded back at the end (:class:`StandardizedIM`). With ``score_start`` the heads as they start (e.g. a
    probe's) are scored first, as epoch -1, so training keeps them unless an epoch beats them on val. Returns
    one history record per epoch.
    """
    if select not in SELECT_CHOICES:
        raise EednError(f"{name}: select must be one of {', '.join(SELECT_CHOICES)}, got {select!r}")
    if standardize:
        standardize_ims(model, context)
    try:
        checkpoint = checkpoint or select_checkpoint(model, select, patience)
        validate = validate or (lambda: val_exit_metrics(model, context))
        if score_start:
            checkpoint.update(validate(), -1)
        history = _epoch_loop(model, context, name, epochs, batch_size, step, augmented, end_epoch, validate,
                              first_epoch, checkpoint, epoch_metrics, phase or name)
        checkpoint.finish()
    finally:
        if standardize:
            unstandardize_ims(model)
    return history


def _epoch_loop(model: EarlyExitModel, context: FitContext, name: str, epochs: int, batch_size: int,
                step: Callable[[list[Tensor], Tensor, int], float], augmented: bool,
                end_epoch: Callable[[int], dict | None] | None, validate: Callable[[], dict], first_epoch: int,
                checkpoint: Checkpoint | CheckpointGroup, epoch_metrics: Callable[[dict], dict | None],
                phase: str) -> list[dict]:
    source = context.features
    history: list[dict] = []
    total_batches = source.num_batches("train", batch_size)
    for epoch in range(first_epoch, epochs):
        if checkpoint.all_stopped:
            break
        model.heads().train()
        total, count = 0.0, 0
        batches = source.batches("train", batch_size, shuffle=True, seed=context.seed, epoch=epoch, augmented=augmented)
        for feats, y in context.progress.track(batches, name, total=total_batches, epoch=epoch, epochs=epochs):
            with context.head_autocast():
                loss = float(step(feats, y, epoch))
            check_finite(loss, name, epoch)
            context.progress.step(name, loss)
            total, count = total + loss * len(y), count + len(y)
        extra = (end_epoch(epoch) if end_epoch is not None else None) or {}
        record = {"phase": phase, "epoch": epoch, "loss": total / max(count, 1), **extra, **validate()}
        checkpoint.update(record, epoch)
        history.append(record)
        metrics = epoch_metrics(record)
        if metrics is not None:
            context.progress.epoch(name, epoch, epochs, **metrics)
        fault_point("head-epoch")
    return history


def train_heads_warmup(model: EarlyExitModel, context: FitContext, *, epochs: int, batch_size: int = 64,
                       options: HeadTrainingOptions | None = None, weights: Tensor | None = None,
                       augmented: bool = False, name: str = "IM warm-up") -> list[dict]:
    """JEI warm-up / IM-only training: minimise Σ_l w_l·CE(IM_l) (default ``w_l = G + 1 - l``) on a frozen
    backbone (the frozen final head's CE is constant and omitted) with the optimiser, standardisation, start
    and checkpoint rule of ``options`` (default: the clean profile)."""
    o = options or resolve_head_profile(HeadTrainingOptions(), "last")
    g = len(model.ims)
    w = (weights if weights is not None else warmup_weights(g)).to(context.device)
    if o.init == "probe":
        init_ims_from_probe(model, context, weight_decay=float(o.weight_decay or 0.0))
    opt = head_optimizer(model.ims.parameters(), o)

    def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
        loss = (per_exit_cross_entropy(model.im_logits(feats), y) * w).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return train_heads(model, context, name=name, epochs=epochs, batch_size=batch_size, step=step,
                       select=str(o.select), patience=int(o.patience or 0), standardize=bool(o.standardize),
                       score_start=o.init == "probe", augmented=augmented)
