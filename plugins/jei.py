"""JEI-DNN (Regol et al., ICLR 2024): the joint exit/inference training of the gate in ``jei_gate.py``, with the
targets, losses and profiles of ``jei_targets.py``.

The strategy warms the IMs up, then alternates blocks of gate batches (cumulative BCE targets aimed
at the most cost-effective exit) and IM batches, one λ per trained setting (docs/usage.md lists the
switches).
The backbone is frozen; in the clean profile it is a fixed feature extractor, so every epoch and
every λ trains from cached per-exit features.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from eedn.runtime.errors import EednError
from eedn.core.model import EarlyExitModel
from eedn.core.options import option
from eedn.core.stacked import StackedHeads
from eedn.train.strategy import (FitContext, HeadTrainingOptions, StrategyResult, TrainingStrategy, head_optimizer,
                                 init_ims_from_probe, per_exit_cross_entropy, resolve_head_profile, warmup_weights)
from eedn.train.heads import Checkpoint, CheckpointGroup, check_finite, train_heads
from eedn_plugins.jei_gate import CLEAN_EXIT_RULE, EXIT_RULES, JeiGate
from eedn_plugins.jei_targets import (PROFILES, SWEEP_MODES, TARGETS, _check_alternation, alternation_block,
                                      exit_weighted_im_loss, gate_phase_loss, gate_targets, official_warmup_epochs,
                                      pos_weights, resolve_variant, uniform_im_loss)

# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def _per_profile(help: str, choices: tuple[str, ...] | None = None) -> Any:
    """An option whose default comes from :data:`PROFILES`."""
    return option(None, f"{help} (default: per profile)", choices=choices)


# --------------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------------


def _final_logits(model: EarlyExitModel, feats: list[Tensor]) -> Tensor:
    """``[B, C]`` logits of the frozen backbone head (exit G)."""
    g = len(model.ims)
    return model.exit_logits(g, feats[g])


class _Validation:
    """Val (V_sel) features held once on the device; every post-epoch evaluation reads them."""

    def __init__(self, context: FitContext, chunk: int = 8192):
        fs = context.features.features("val")  # eval-mode features even when training runs in train mode
        self.feats = [f.float().to(context.device) for f in fs.feats]
        self.labels = fs.labels.to(context.device)
        self.chunk = chunk

    @torch.no_grad()
    def outputs(self, model: EarlyExitModel) -> tuple[Tensor, Tensor]:
        """All-exit logits ``[N, E, C]`` and gate scores ``[N, G]``."""
        logits, scores = [], []
        n = len(self.labels)
        for start in range(0, n, self.chunk):
            feats = [f[start : start + self.chunk] for f in self.feats]
            im = model.im_logits(feats)
            logits.append(torch.cat([im, _final_logits(model, feats).unsqueeze(1)], 1).float())
            scores.append(torch.sigmoid(cast(JeiGate, model.gate).gate_logits(im, feats)))  # fit() checked the gate
        return torch.cat(logits), torch.cat(scores)

    @torch.no_grad()
    def outputs_stacked(self, model: EarlyExitModel, stack: StackedHeads) -> tuple[Tensor, Tensor]:
        """:meth:`outputs` of every stacked copy: ``[K, N, E, C]`` and ``[K, N, G]``."""
        logits, scores = [], []
        for start in range(0, len(self.labels), self.chunk):
            feats = [f[start : start + self.chunk] for f in self.feats]
            im = stack.im_logits(feats)
            final = _final_logits(model, feats).unsqueeze(1)
            logits.append(torch.cat([im, final.expand(stack.k, *final.shape)], 2).float())
            scores.append(torch.sigmoid(stack.gate_logits(im, feats)))
        return torch.cat(logits, 1), torch.cat(scores, 1)


class JeiStrategy(TrainingStrategy):
    """JEI-DNN: IM warm-up, then gate/IM alternation for each λ (one trained setting per λ).

    Options marked "per profile" are filled from :data:`PROFILES`; ``self.options`` and ``describe()``
    hold the fully resolved values, so a run records them and reloading with them rebuilds the same
    strategy.
    """

    default_gate = "jei"
    trains_gate = True
    trains_backbone = False
    tradeoff_option = "lambda"
    @dataclass
    class Options:
        profile: str = option("clean", "clean (eedn's defaults) or paper-compat (the official code's choices)",
                              choices=tuple(PROFILES))
        lambda_: float | list[float] = option(0.5, "cost trade-off λ of the gate targets; a list trains one "
                                                    "setting per λ", min=0)
        epochs: int = option(15, "total epochs per λ, warm-up included", min=1)
        batch_size: int = option(64, "training batch size", min=1)
        warmup: str | None = _per_profile("fixed (warmup_epochs) or early_stop (per-IM patience)",
                                          ("fixed", "early_stop"))
        warmup_epochs: int | None = option(None, "fixed warm-up length (constant lr) (default: 3; paper-compat: "
                                                 "the official value of the dataset and backbone, 1 to 6)", min=0)
        max_warmup_epochs: int = option(6, "most warm-up epochs with warmup=early_stop", min=0)
        warmup_patience: int = option(2, "epochs without val gain before an IM stops (early_stop)", min=1)
        alternation: str | None = _per_profile("gate/IM phase blocks: auto (min(200, half an epoch) batches), "
                                               "batches:N or fraction:F")
        gate_cost: str | None = _per_profile("cost c_l in the gate targets: (l+1)/(G+1) (uniform_index), "
                                             "MACs / final MACs (measured, true_macs) or the official op "
                                             "counter's Mul-Adds / final (official_counter, the cleanup code's)",
                                             ("uniform_index", "measured", "true_macs", "official_counter"))
        im_loss: str | None = _per_profile("IM loss: plain mean CE (uniform, the official effective loss) or "
                                           "Σ sg(P)·CE (exit_weighted)", ("uniform", "exit_weighted"))
        im_loss_renorm: bool = option(False, "with im_loss=exit_weighted: rescale to the uniform loss's magnitude")
        targets: str | None = option(None, "gate targets: cumulative 1{l >= l*} (official), hazard 1{l = l*} on "
                                           "survivors l* >= l, onehot 1{l = l*} (default: cumulative, or what "
                                           "exit_rule reads)", choices=TARGETS)
        exit_rule: str | None = option(None, "test-time rule: official (capped probabilities, hazard >= 0.5), cdf "
                                             "or hazard (first g_l >= tau) (default: clean profile "
                                             f"{CLEAN_EXIT_RULE}, paper-compat official; with targets set, the "
                                             "rule they pair with)",
                                       choices=EXIT_RULES)
        tau: float = option(0.5, "threshold of exit_rule=cdf|hazard", above=0, max=1)
        pos_weight_counts: str | None = option(None, "gate pos-weights from exact-exit, cumulative or survivor "
                                                     "counts (default: the ones matching targets and exit_rule)",
                                               choices=("exact", "cumulative", "survivors"))
        im_training: str | None = _per_profile("alternate (official: IM blocks between gate blocks) or converge "
                                               "(IMs first, trained to convergence by the shared head training of "
                                               "the same profile, then frozen while the gates learn)",
                                               ("alternate", "converge"))
        max_im_epochs: int = option(50, "most IM epochs with im_training=converge", min=1)
        optimizers: str | None = _per_profile("one SGD per phase (separate) or one for both (shared)",
                                              ("separate", "shared"))
        select: str | None = _per_profile("setting kept per λ: the last epoch, the best val accuracy − λ·cost "
                                          "(val_tradeoff) or the paper-time rule (pt_compat)",
                                          ("last", "val_tradeoff", "pt_compat"))
        backbone_mode: str | None = _per_profile("frozen backbone in eval mode (cacheable) or train mode "
                                                 "(dropout, DropPath on)", ("eval", "train"))
        head_augment: bool | None = _per_profile("train the heads on augmented images (no feature cache)")
        lr: float = option(0.01, "SGD learning rate", min=0)
        momentum: float = option(0.9, "SGD momentum", min=0)
        weight_decay: float = option(5e-4, "SGD weight decay", min=0)
        eta_min: float = option(2e-4, "final lr of the cosine schedule after the warm-up", min=0)
        sweep: str = option("auto", "how the λ of a sweep train: stacked (all λ as one batched model), loop "
                                    "(one λ after another) or auto (stacked when the features are cached)",
                            choices=SWEEP_MODES)

    class Resolved(Options):
        """What ``self.options`` holds once ``__init__`` has filled the per-profile options (and ``fit`` the
        warm-up length): the declared dataclass with those fields never None. A type for checkers, never built."""

        warmup: str
        warmup_epochs: int
        alternation: str
        gate_cost: str
        im_loss: str
        targets: str
        exit_rule: str
        pos_weight_counts: str
        optimizers: str
        select: str
        backbone_mode: str
        head_augment: bool

    options: JeiStrategy.Resolved

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        profile = PROFILES[o.profile]
        o = dataclasses.replace(o, **{k: v for k, v in profile.items() if getattr(o, k) is None})
        exit_rule = o.exit_rule
        if exit_rule is None and o.targets is None and o.profile == "clean":
            exit_rule = CLEAN_EXIT_RULE  # the consistent rule that measured best (docs/results.md)
        variant: dict[str, Any] = resolve_variant(o.targets, exit_rule, o.pos_weight_counts)
        self.options = dataclasses.replace(o, **variant)
        self._check_relations()

    def gate_options(self) -> dict:
        """The rule the trained gate must read its scores with (recorded with the gate in run.json)."""
        return {"exit_rule": self.options.exit_rule, "tau": self.options.tau}

    def prepare_model(self, model: EarlyExitModel) -> None:
        if isinstance(model.gate, JeiGate):
            model.gate.set_rule(self.options.exit_rule, self.options.tau)

    def _check_relations(self) -> None:
        """What the declaration cannot say: the alternation syntax and how options constrain each other."""
        o = self.options
        _check_alternation(o.alternation)
        if o.im_loss_renorm and o.im_loss != "exit_weighted":
            raise EednError("strategy 'jei': im_loss_renorm=true only applies to im_loss=exit_weighted; "
                            "set im_loss=exit_weighted or drop im_loss_renorm")
        if o.warmup == "fixed" and o.warmup_epochs is not None and o.epochs <= o.warmup_epochs:
            raise EednError(f"strategy 'jei': epochs={o.epochs} counts warm-up plus main epochs and must "
                            f"exceed warmup_epochs={o.warmup_epochs}")
        if o.im_training == "converge" and o.optimizers == "shared":
            raise EednError("strategy 'jei': im_training=converge (the clean profile's default) keeps the trained IMs "
                            "fixed, but a shared optimiser moves them during gate batches (weight decay, momentum); "
                            "set optimizers=separate, or im_training=alternate")
        if o.warmup == "early_stop" and o.epochs < 2:
            raise EednError("strategy 'jei': epochs must be >= 2 with warmup=early_stop (one warm-up, one main epoch)")

    @property
    def lambdas(self) -> list[float]:
        lam = self.options.lambda_
        return list(lam) if isinstance(lam, list) else [lam]

    # ---------------------------------------------------------------- fit
    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        opts = self.options
        gate = model.gate
        if not isinstance(gate, JeiGate):
            raise EednError(f"strategy 'jei' trains the 'jei' gate; got {type(gate).__name__} "
                            "(drop the gate option or use gate=jei)")
        torch.manual_seed(context.seed)
        self.prepare_model(model)  # the gate reads its scores with this strategy's exit rule
        model.freeze_backbone()
        if self.head_augment or not context.features.cacheable:
            context.log("jei: features are not cacheable (backbone_mode="
                        f"{self.backbone_mode}, head_augment={self.head_augment}); every epoch re-runs the backbone")
        context.log(f"jei: gate cost {opts.gate_cost}, im_loss {opts.im_loss}, profile {opts.profile}")
        if opts.warmup_epochs is None:  # paper-compat: the official length for this dataset and backbone
            opts.warmup_epochs = official_warmup_epochs(context.features.data.name,
                                                           getattr(model.backbone, "variant", ""))
            context.log(f"jei: {opts.warmup_epochs} warm-up epoch(s), the official value for this setting")
            self._check_relations()
        val = _Validation(context)
        if opts.gate_cost == "official_counter":
            costs = official_counter_costs(model)
        else:
            costs = context.normalised_costs("measured" if opts.gate_cost == "true_macs" else opts.gate_cost)
        costs = costs.to(context.device)
        macs = torch.tensor(context.exit_macs, dtype=torch.float64, device=context.device)
        history: list[dict] = []

        warmup_epochs_run, warm_momentum = self._warmup(model, context, val, history)
        # paper-compat shares one SGD between warm-up and main phase: the IMs keep their warm-up momentum
        momentum = warm_momentum if opts.optimizers == "shared" else {}
        snapshot = model.heads_state_dict()

        if self.stacks_sweep(context):
            context.log(f"jei: {len(self.lambdas)} λ trained as one stacked model")
            states = self._alternate_stacked(model, context, val, costs, macs, warmup_epochs_run, history,
                                             snapshot, momentum)
        else:
            states = []
            for lam in self.lambdas:
                model.load_heads_state_dict(snapshot)
                states.append(self._alternate(model, context, val, lam, costs, macs, warmup_epochs_run, history,
                                              momentum))
        settings = [(f"lambda={lam:g}", state) for lam, state in zip(self.lambdas, states)]
        model.load_heads_state_dict(settings[-1][1])
        return StrategyResult(settings=settings, history=history)

    def stacks_sweep(self, context: FitContext) -> bool:
        """Whether the λ train as one stacked model: ``sweep=auto`` stacks when every epoch reads cached
        features (clean profile); a train-mode backbone or augmented heads run the per-λ loop."""
        mode = self.options.sweep
        if mode == "auto":
            return context.features.cacheable and not self.head_augment
        return mode == "stacked"

    # ---------------------------------------------------------------- warm-up
    def _im_head_options(self) -> HeadTrainingOptions:
        """How im_training=converge trains the IMs: the shared head training's profile of the same name (clean:
        standardised features, a probe start, AdamW; paper-compat: JEI's SGD), one head at a time stopping on
        its val CE."""
        opts = self.options
        given: dict[str, Any] = {"profile": opts.profile, "epochs": opts.max_im_epochs, "batch_size": opts.batch_size,
                                 "select": "exit_ce", "momentum": opts.momentum}
        if opts.profile == "paper-compat":
            given |= {"lr": opts.lr, "weight_decay": opts.weight_decay, "patience": opts.warmup_patience}
        return resolve_head_profile(HeadTrainingOptions(**given))

    def _warmup(self, model: EarlyExitModel, context: FitContext, val: _Validation,
                history: list[dict]) -> tuple[int, dict[str, Tensor]]:
        """The IMs before the gates, in the shared head-training loop: the official warm-up (Σ (G+1−l)·CE(IM_l),
        SGD at constant lr, ``warmup_epochs`` or per-IM early stopping on val accuracy) or, with
        ``im_training=converge``, every head on its own mean CE to convergence (per-IM val-CE early stopping).
        Returns the epochs that count as warm-up and the SGD momentum of every IM parameter (keyed like the
        heads' state)."""
        opts = self.options
        g = len(model.ims)
        converge = opts.im_training == "converge"
        early = opts.warmup == "early_stop" or converge
        # early stopping may end sooner; leave at least one main epoch either way
        epochs = min(opts.max_warmup_epochs, opts.epochs - 1) if early else int(opts.warmup_epochs or 0)
        standardize, patience, score_start = False, opts.warmup_patience, False
        if converge:
            head = self._im_head_options()
            epochs, standardize, patience = opts.max_im_epochs, bool(head.standardize), int(head.patience or 0)
            score_start = head.init == "probe"  # the probe's heads stand unless an epoch beats them on val CE
            if head.init == "probe":
                init_ims_from_probe(model, context, weight_decay=float(head.weight_decay or 0.0))
            opt = head_optimizer(model.ims.parameters(), head)
        else:
            opt = torch.optim.SGD(model.ims.parameters(), lr=opts.lr, momentum=opts.momentum,
                                  weight_decay=opts.weight_decay)
        weights = (torch.ones(g) if converge else warmup_weights(g)).to(context.device)  # G+1-l officially

        def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
            ce = per_exit_cross_entropy(model.im_logits(feats), y)
            with torch.no_grad():
                final_ce = F.cross_entropy(_final_logits(model, feats).float(), y)
            loss = (ce * weights).sum(1).mean()
            value = loss.item()
            check_finite(value, "jei warm-up", epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return value + float(final_ce)  # the logged loss includes the frozen final head's CE

        def validate() -> dict:
            logits, scores = val.outputs(model)
            entry: dict[str, Any] = {
                "phase": "warmup", "lambda": None,
                "val_im_accuracy": (logits[:, :g].argmax(-1) == val.labels[:, None]).float().mean(0).tolist(),
                "val_gated_accuracy": _gated_accuracy(model, logits, scores, val.labels)}
            if converge:
                entry["val_im_loss"] = per_exit_cross_entropy(logits[:, :g], val.labels).mean(0).tolist()
            return entry

        def score(record: dict) -> Any:
            """converge: lowest val CE per head; warmup=early_stop: best val accuracy per head; fixed: the last."""
            if converge:
                return [-c for c in record["val_im_loss"]]
            return record["val_im_accuracy"] if early else None

        checkpoint = Checkpoint(model.heads_state_dict, score, model.load_heads_state_dict,
                                parts=[f"ims.{l}." for l in range(g)] if early else None,
                                modules=list(model.ims) if early else None, patience=patience if early else 0,
                                record_key="frozen" if early else None)
        records = train_heads(model, context, name="jei warm-up", epochs=epochs, batch_size=opts.batch_size,
                              step=step, augmented=self.head_augment, validate=validate, checkpoint=checkpoint,
                              standardize=standardize, score_start=score_start, phase="warmup",
                              epoch_metrics=lambda r: {"loss": r["loss"],
                                                       "val_gated_accuracy": r["val_gated_accuracy"]})
        history.extend(records)
        momentum = {}
        for name, p in model.ims.named_parameters():
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum[f"ims.{name}"] = buf.detach().clone()
        # converged IMs stay fixed; the gates then train for the usual epochs - warmup_epochs epochs
        return (int(opts.warmup_epochs or 0) if converge else len(records)), momentum

    # ---------------------------------------------------------------- alternation
    # The per-λ arithmetic (targets, losses, the after-epoch refresh and selection) lives in the methods
    # below; the per-λ loop (_alternate) and the stacked sweep (_alternate_stacked) both call them, so a
    # variant added there trains the same way in either path.

    def _gate_batch_loss(self, per_exit_ce: Tensor, gate_logits: Tensor, lam: float, costs: Tensor,
                         pos_weight: Tensor) -> Tensor:
        """Gate-phase loss of one λ on one batch: BCE towards the ``targets`` kind of ``per_exit_ce`` ``[B, E]``."""
        return gate_phase_loss(gate_logits, per_exit_ce, lam, costs, pos_weight, self.options.targets)

    def _im_batch_loss(self, gate: JeiGate, ce: Tensor, gate_logits: Callable[[], Tensor]) -> Tensor:
        """IM-phase loss of one λ on one batch from the IMs' CE ``[B, G]``; ``gate_logits()`` gives the
        gate's pre-sigmoid scores when the loss needs exit probabilities."""
        if self.options.im_loss == "uniform":
            return uniform_im_loss(ce)
        g = ce.shape[1]
        with torch.no_grad():
            probs = gate.exit_probabilities(torch.sigmoid(gate_logits()))[:, :g]
        return exit_weighted_im_loss(probs, ce, renorm=self.options.im_loss_renorm)

    def _make_optimizers(self, ims: list[Tensor], gate: list[Tensor]) -> dict[str, torch.optim.SGD]:
        """One SGD per phase, or one for both (``optimizers=shared``, the official choice)."""
        opts = self.options

        def make_sgd(params: list[Tensor]) -> torch.optim.SGD:
            return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum,
                                   weight_decay=opts.weight_decay)

        if opts.optimizers == "shared":
            shared = make_sgd(ims + gate)
            return {"ims": shared, "gate": shared}
        return {"ims": make_sgd(ims), "gate": make_sgd(gate)}

    def _epoch_shape(self, context: FitContext) -> tuple[int, int, int, int, bool]:
        """Batch size, total epochs, train batches per epoch, batches per alternation block, and whether only
        gate batches run (im_training=converge: the IMs were trained to convergence before)."""
        bs = self.options.batch_size
        nb = context.features.num_batches("train", bs)
        gates_only = self.options.im_training == "converge"
        return bs, self.options.epochs, nb, alternation_block(self.options.alternation, nb), gates_only

    def _schedulers(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> list:
        """Cosine schedules of the optimisers that step (with im_training=converge only the gates' does)."""
        skip_ims = self.options.im_training == "converge"
        unique = list({id(o): o for name, o in optimizers.items() if not (skip_ims and name == "ims")}.values())
        return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=self.options.epochs,
                                                           eta_min=self.options.eta_min) for o in unique]

    def _after_epoch(self, context: FitContext, gate: JeiGate, logits: Tensor, scores: Tensor, labels: Tensor,
                     lam: float, costs: Tensor, macs: Tensor, epoch: int, lrs: dict[str, float],
                     sums: dict[str, float], counts: dict[str, int]) -> tuple[Tensor, dict]:
        """After a post-warm-up epoch, from the val outputs of one λ: its refreshed pos-weights and its
        history record."""
        g = scores.shape[1]
        best_exit, _ = gate_targets(per_exit_cross_entropy(logits, labels), lam, costs)
        pos_weight = pos_weights(best_exit, g, self.options.pos_weight_counts).to(context.device)
        exit_index = gate.decide(scores)
        acc = float((logits[torch.arange(len(exit_index)), exit_index].argmax(-1) == labels).float().mean())
        entry: dict[str, Any] = {
            "phase": "main", "epoch": epoch, "lambda": lam,
            "gate_loss": sums["gate"] / counts["gate"] if counts["gate"] else None,
            "im_loss": sums["ims"] / counts["ims"] if counts["ims"] else None,
            "gate_samples": counts["gate"], "im_samples": counts["ims"],
            "lr_ims": lrs["ims"], "lr_gate": lrs["gate"],
            "val_gated_accuracy": acc, "val_mean_cost": float(costs[exit_index].mean()),
            "val_macs_fraction": float(macs[exit_index].mean() / context.full_macs),
            "val_exit_fractions": (torch.bincount(exit_index, minlength=g + 1).float() / len(exit_index)).tolist(),
            "pos_weights": pos_weight.tolist(),
            # the rule against its own targets (eedn warns when it sends nearly everyone before l*)
            "val_target_exit_fractions": (torch.bincount(best_exit, minlength=g + 1).float() / len(best_exit)).tolist(),
            "val_exits_before_target": float((exit_index < best_exit).float().mean()),
        }
        context.progress.epoch(f"jei λ={lam:g}", epoch, self.options.epochs, gate_loss=entry["gate_loss"],
                               im_loss=entry["im_loss"], val_gated_accuracy=acc,
                               val_macs_fraction=entry["val_macs_fraction"])
        return pos_weight, entry

    def _checkpoint(self, lam: float, warmup_best: float, initial: dict[str, Tensor],
                    state: Callable[[], dict[str, Tensor]]) -> Checkpoint:
        """The setting a λ keeps (``select``), as a rule of the shared checkpoint: the last epoch, the best val
        accuracy − λ·cost, or the paper-time rule: compared against the warm-up best and never updated, so the
        last epoch beating the warm-up wins (with none, the warm-up model stands)."""
        select = self.options.select
        if select == "val_tradeoff":
            return Checkpoint(state, lambda r: r["val_gated_accuracy"] - lam * r["val_mean_cost"], initial=initial)
        if select == "pt_compat":
            return Checkpoint(state, lambda r: r["val_gated_accuracy"], initial=initial, baseline=warmup_best,
                              fixed_baseline=True)
        return Checkpoint(state, lambda r: None, initial=initial)

    def _alternation(self, context: FitContext, optimizers: Mapping[str, torch.optim.Optimizer],
                     train_batch: Callable[[list[Tensor], Tensor, str, int], list[float]],
                     validate: Callable[[int, dict[str, float], list[dict[str, float]], dict[str, int]], Any],
                     k_count: int) -> tuple[Callable, Callable, Callable]:
        """The ``step`` / ``end_epoch`` / ``validate`` hooks of the shared head-training loop for the gate/IM
        alternation of ``k_count`` λ (one, or a stacked sweep): phase blocks by batch index, per-phase loss sums,
        the lr of the epoch, then the cosine schedule."""
        _, _, _, block, gates_only = self._epoch_shape(context)
        schedulers = self._schedulers(optimizers)
        state: dict[str, Any] = {"epoch": None, "batch": 0, "lrs": {}}
        sums = [{"gate": 0.0, "ims": 0.0} for _ in range(k_count)]
        counts = {"gate": 0, "ims": 0}

        def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
            if state["epoch"] != epoch:
                state["epoch"], state["batch"] = epoch, 0
            phase = "gate" if gates_only or (state["batch"] // block) % 2 == 0 else "ims"
            state["batch"] += 1
            values = train_batch(feats, y, phase, epoch)
            for k, value in enumerate(values):
                sums[k][phase] += value * len(y)
            counts[phase] += len(y)
            return float(sum(values))

        def end_epoch(epoch: int) -> dict:
            state["epoch"] = epoch
            state["lrs"] = {name: o.param_groups[0]["lr"] for name, o in optimizers.items()}
            for s in schedulers:
                s.step()
            return {}

        def after(epoch: int) -> Any:
            out = validate(int(state["epoch"]), state["lrs"], [dict(x) for x in sums], dict(counts))
            for x in sums:
                x.update(gate=0.0, ims=0.0)
            counts.update(gate=0, ims=0)
            return out

        return step, end_epoch, lambda: after(int(state["epoch"]))

    def _alternate(self, model: EarlyExitModel, context: FitContext, val: _Validation, lam: float, costs: Tensor,
                   macs: Tensor, first_epoch: int, history: list[dict], momentum: dict[str, Tensor]) -> dict:
        """One λ on the live model (the per-λ loop path), in the shared head-training loop."""
        torch.manual_seed(context.seed)  # every λ starts from the same state, as if run alone
        gate, g = cast(JeiGate, model.gate), len(model.ims)  # fit() checked the gate
        bs, total_epochs, _, _, _ = self._epoch_shape(context)
        optimizers = self._make_optimizers(list(model.ims.parameters()), list(gate.parameters()))
        for name, p in model.ims.named_parameters():
            if f"ims.{name}" in momentum:
                optimizers["ims"].state[p]["momentum_buffer"] = momentum[f"ims.{name}"].clone()
        checkpoint = self._checkpoint(lam, _best_warmup_gated_accuracy(history), model.heads_state_dict(),
                                      model.heads_state_dict)
        pos_weight = torch.ones(g, device=context.device)
        entries: list[dict] = []

        def train_batch(feats: list[Tensor], y: Tensor, phase: str, epoch: int) -> list[float]:
            if phase == "gate":
                with torch.no_grad():
                    im = model.im_logits(feats)
                    all_logits = torch.cat([im, _final_logits(model, feats).unsqueeze(1)], 1)
                loss = self._gate_batch_loss(per_exit_cross_entropy(all_logits, y), gate.gate_logits(im, feats), lam,
                                             costs, pos_weight)
            else:
                im = model.im_logits(feats)
                loss = self._im_batch_loss(gate, per_exit_cross_entropy(im, y), lambda: gate.gate_logits(im, feats))
            value = loss.item()
            check_finite(value, f"jei λ={lam:g}", epoch)
            # zero to None (as the official torch versions do): a shared optimiser then leaves the idle
            # group alone, with no weight decay or momentum step
            optimizers[phase].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[phase].step()
            return [value]

        def validate(epoch: int, lrs: dict[str, float], sums: list[dict[str, float]], counts: dict[str, int]) -> dict:
            nonlocal pos_weight
            logits, scores = val.outputs(model)
            pos_weight, entry = self._after_epoch(context, gate, logits, scores, val.labels, lam, costs, macs,
                                                  epoch, lrs, sums[0], counts)
            entries.append(entry)
            return entry

        step, end_epoch, after = self._alternation(context, optimizers, train_batch, validate, 1)
        train_heads(model, context, name=f"jei λ={lam:g}", epochs=total_epochs, batch_size=bs, step=step,
                    augmented=self.head_augment, end_epoch=end_epoch, validate=after, first_epoch=first_epoch,
                    checkpoint=checkpoint, epoch_metrics=lambda r: None, phase="main")
        history.extend(entries)
        history.append({"phase": "select", "lambda": lam, "select": self.options.select,
                        "epoch": checkpoint.chosen_epoch()})
        assert checkpoint.result is not None
        return checkpoint.result

    def _alternate_stacked(self, model: EarlyExitModel, context: FitContext, val: _Validation, costs: Tensor,
                           macs: Tensor, first_epoch: int, history: list[dict], snapshot: dict[str, Tensor],
                           momentum: dict[str, Tensor]) -> list[dict]:
        """Every λ at once: K copies of the heads stacked along a leading dimension (:mod:`eedn.core.stacked`),
        the same batches for all, each copy's arithmetic that of its λ alone, in the shared head-training loop.
        Returns one state per λ."""
        torch.manual_seed(context.seed)
        lambdas, k_count = self.lambdas, len(self.lambdas)
        gate, g = cast(JeiGate, model.gate), len(model.ims)  # fit() checked the gate
        bs, total_epochs, _, _, _ = self._epoch_shape(context)
        stack = StackedHeads(model, [snapshot] * k_count)
        optimizers = self._make_optimizers(stack.group("ims."), stack.group("gate."))
        stack.stack_momentum(momentum, optimizers["ims"])
        baseline = _best_warmup_gated_accuracy(history)
        group = CheckpointGroup([self._checkpoint(lam, baseline, snapshot, functools.partial(stack.state, k))
                                 for k, lam in enumerate(lambdas)], "lambdas")
        pos_weight = [torch.ones(g, device=context.device) for _ in lambdas]
        records: list[list[dict]] = [[] for _ in lambdas]

        def train_batch(feats: list[Tensor], y: Tensor, phase: str, epoch: int) -> list[float]:
            if phase == "gate":
                with torch.no_grad():
                    im = stack.im_logits(feats)  # [K, B, G, C]
                    final = _final_logits(model, feats).unsqueeze(1)
                    ce = _stacked_cross_entropy(torch.cat([im, final.expand(k_count, *final.shape)], 2), y)
                logits = stack.gate_logits(im, feats)
                losses = [self._gate_batch_loss(ce[k], logits[k], lam, costs, pos_weight[k])
                          for k, lam in enumerate(lambdas)]
            else:
                im = stack.im_logits(feats)
                ce = _stacked_cross_entropy(im, y)
                gate_logits = _Lazy(lambda: stack.gate_logits(im, feats))  # only exit_weighted reads it
                losses = [self._im_batch_loss(gate, ce[k], functools.partial(_row, gate_logits, k))
                          for k in range(k_count)]
            loss = torch.stack(losses)
            values = loss.tolist()
            for k, value in enumerate(values):
                check_finite(value, f"jei λ={lambdas[k]:g}", epoch)
            optimizers[phase].zero_grad(set_to_none=True)
            loss.sum().backward()  # copies share no parameter: each gets its own λ's gradient exactly
            optimizers[phase].step()
            return values

        def validate(epoch: int, lrs: dict[str, float], sums: list[dict[str, float]], counts: dict[str, int]) -> dict:
            logits, scores = val.outputs_stacked(model, stack)
            entries = []
            for k, lam in enumerate(lambdas):
                pos_weight[k], entry = self._after_epoch(context, gate, logits[k], scores[k], val.labels, lam,
                                                         costs, macs, epoch, lrs, sums[k], counts)
                records[k].append(entry)
                entries.append(entry)
            return {"phase": "main", "lambdas": entries}

        step, end_epoch, after = self._alternation(context, optimizers, train_batch, validate, k_count)
        model.heads().train()
        train_heads(model, context, name=f"jei {k_count} λ stacked", epochs=total_epochs, batch_size=bs, step=step,
                    augmented=self.head_augment, end_epoch=end_epoch, validate=after, first_epoch=first_epoch,
                    checkpoint=group, epoch_metrics=lambda r: None, phase="main")
        states = []
        for k, checkpoint in enumerate(group.members):
            history.extend(records[k])
            history.append({"phase": "select", "lambda": lambdas[k], "select": self.options.select,
                            "epoch": checkpoint.chosen_epoch()})
            assert checkpoint.result is not None
            states.append(checkpoint.result)
        return states


class _Lazy:
    """A value computed on first use, then reused."""

    def __init__(self, make: Callable[[], Tensor]):
        self.make: Callable[[], Tensor] = make
        self.value: Tensor | None = None

    def __call__(self) -> Tensor:
        if self.value is None:
            self.value = self.make()
        return self.value


def _stacked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``[K, B, E]`` per-exit CE of K copies' logits ``[K, B, E, C]`` (row by row, as for one copy)."""
    k, b, e, c = logits.shape
    return per_exit_cross_entropy(logits.reshape(k * b, e, c), labels.repeat(k)).view(k, b, e)


def official_counter_costs(model: EarlyExitModel) -> Tensor:
    """``gate_cost=official_counter``: the cleanup code's cost vector, the official op counter's Mul-Adds of
    every exit over the final exit's (docs/method.md §3.4; [0.409, 0.506, ..., 0.894, 1] for T2T-ViT-7 at
    224 px). Backbones that carry the counter (T2T-ViT) provide ``official_exit_muladds``."""
    counter = getattr(model.backbone, "official_exit_muladds", None)
    if counter is None:
        raise EednError(f"strategy 'jei': gate_cost=official_counter needs a backbone with the official op counter "
                        f"(t2t_vit), not {type(model.backbone).__name__}; use gate_cost=uniform_index or measured")
    muladds = torch.tensor(counter(list(model.ims), cast(JeiGate, model.gate).official_muladds()), dtype=torch.float64)
    return (muladds / muladds[-1]).float()


def _gated_accuracy(model: EarlyExitModel, logits: Tensor, scores: Tensor, labels: Tensor) -> float:
    exit_index = model.gate.decide(scores)
    return float((logits[torch.arange(len(labels)), exit_index].argmax(-1) == labels).float().mean())


def _best_warmup_gated_accuracy(history: list[dict]) -> float:
    values = [h["val_gated_accuracy"] for h in history if h.get("phase") == "warmup"]
    return max(values) if values else -math.inf


def _row(make: Callable[[], Tensor], k: int) -> Tensor:
    """Row ``k`` of what ``make`` computes (copy k's gate logits in the stacked sweep, made on first use)."""
    return make()[k]
