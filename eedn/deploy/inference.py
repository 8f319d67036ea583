"""Real batched early-exit inference: samples that exit leave the batch, so later stages run on fewer rows.

The engine runs ``backbone.stem`` and then one stage at a time. After stage ``l`` it evaluates exit
``l`` (exit features, IM logits, gate score) for the rows still running, asks the gate's causal rule
``exits_at(prefix)`` which of them leave, writes their logits into the output tensors (index writes,
no per-sample Python loop), and keeps only the remaining rows of the backbone state
(:func:`eedn.core.contracts.select_rows`) and of the score prefix. The backbone's own head (exit ``G``)
takes every row still running after the last stage. It stops as soon as no row is left.

Because every gate decision reads only the scores of exits ``0..l`` (the contract of
:meth:`eedn.core.contracts.Gate.exits_at`), the engine reaches the same exits as the simulation on stored
all-exit outputs, ``gate.decide(model.gate_scores(model(x)))``; only the floating-point rounding of
batched kernels on smaller batches can differ, in the last bits.

Strategies whose exits report ensembles of earlier exits (BoostNet, ``model.exit_combiner``) are
supported when the combiner is causal (exit ``l``'s output depends on exits ``0..l`` only); the
engine keeps the raw per-exit logits of the running rows and applies the combiner to that prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

import torch
from torch import Tensor, nn

from eedn.core.contracts import State, select_rows
from eedn.runtime.errors import EednError
from eedn.core.model import EarlyExitModel
from eedn.runtime.precision import autocast, to_memory_format


@dataclass
class InferenceResult:
    """Per-sample outcome of one early-exit pass over a batch of ``B`` inputs."""

    #: predicted class ``[B]`` (argmax of the exit's logits).
    predictions: Tensor
    #: exit each sample left at ``[B]``, in ``0..G`` (``G`` = the backbone's own head).
    exit_index: Tensor
    #: max softmax probability of the exit's logits ``[B]``.
    confidences: Tensor
    #: logits of the exit each sample left at ``[B, C]`` (after the exit combiner, if any).
    logits: Tensor
    #: cumulative MACs each sample cost ``[B]`` (float64): ``exit_macs[exit_index]``.
    macs: Tensor

    def __len__(self) -> int:
        return int(self.predictions.shape[0])


def _as_macs_tensor(exit_macs: Sequence[float] | Tensor, num_exits: int) -> Tensor:
    macs = torch.as_tensor(exit_macs, dtype=torch.float64).flatten().cpu()
    if macs.numel() != num_exits:
        raise EednError(f"exit_macs has {macs.numel()} entries but the model has {num_exits} exits; "
                        "measure them with eedn.measure_exit_macs(model)")
    return macs


def check_causal_combiner(combiner: nn.Module, num_exits: int, num_classes: int) -> None:
    """Raise :class:`EednError` unless ``combiner`` applied to the first ``l+1`` exits gives the same
    exit-``l`` output as applied to all exits (the engine only ever has the prefix).

    Checked once on random logits, in float64 where the combiner allows it, on the combiner's device.
    """
    param = next(iter(list(combiner.parameters()) + list(combiner.buffers())), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, num_exits, num_classes, generator=gen).to(device)
    name = type(combiner).__name__
    try:
        with torch.inference_mode():
            full = combiner(z)
            for l in range(num_exits):
                part = combiner(z[:, : l + 1])
                if part.shape != (3, l + 1, num_classes) or not torch.allclose(part[:, -1], full[:, l], rtol=1e-4,
                                                                               atol=1e-5):
                    raise EednError(f"exit combiner {name} is not causal: exit {l}'s output depends on later "
                                    "exits, so samples cannot leave early; real early-exit inference needs a "
                                    "combiner whose exit l reads exits 0..l only")
    except EednError:
        raise
    except Exception as exc:  # noqa: BLE001 - a combiner that cannot take a prefix at all
        raise EednError(f"exit combiner {name} fails on a prefix of the exits ({type(exc).__name__}: {exc}); "
                        "real early-exit inference applies it to exits 0..l after stage l") from exc


def _indices(mask: Tensor, count: int) -> Tensor:
    """Positions of the True entries of a bool ``[b]`` mask whose count is known (no second sync)."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (NotImplementedError, RuntimeError):  # a backend without nonzero_static
        return mask.nonzero().squeeze(1)


class EarlyExitEngine:
    """Batched early-exit inference for one :class:`~eedn.core.model.EarlyExitModel`.

    ``exit_macs`` (cumulative MACs per exit, ``E`` numbers) gives each sample's cost; when omitted it
    is measured once with :func:`eedn.core.cost.measure_exit_macs` on first use and kept. The model runs
    in eval mode on its own device; inputs are moved there. ``precision`` runs it under
    :func:`eedn.runtime.precision.autocast` (logits come back as fp32); ``channels_last`` feeds NHWC images.

    ``compile=True`` runs each exit's segment (the stem for exit 0, the stage, exit features and IM logits)
    through ``torch.compile`` with dynamic batch sizes; gate decisions and row bookkeeping stay eager. The
    first calls compile (seconds per exit and batch shape), so it is for long-running inference; on a CPU it
    helped convolutional networks at batch 1 and slowed larger batches (docs/inference.md).
    """

    def __init__(self, model: EarlyExitModel, exit_macs: Sequence[float] | Tensor | None = None,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile
        self._segments: list | None = None
        self._exit_macs = None if exit_macs is None else _as_macs_tensor(exit_macs, model.num_exits)
        self._macs_on: dict[torch.device, Tensor] = {}
        self._checked_combiner: nn.Module | None = None

    @property
    def exit_macs(self) -> Tensor:
        """Cumulative MACs per exit ``[E]`` (float64, CPU); measured on first use if not given."""
        if self._exit_macs is None:
            from eedn.core.cost import measure_exit_macs

            self._exit_macs = _as_macs_tensor(measure_exit_macs(self.model)[0], self.model.num_exits)
        return self._exit_macs

    def _macs_on_device(self, device: torch.device) -> Tensor:
        if device not in self._macs_on:
            self._macs_on[device] = self.exit_macs.to(device)
        return self._macs_on[device]

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def __call__(self, x: Tensor) -> InferenceResult:
        model = self.model
        combiner = model.exit_combiner
        if combiner is not None and self._checked_combiner is not combiner:
            check_causal_combiner(combiner, model.num_exits, model.num_classes)
            self._checked_combiner = combiner
        device = self._device()
        macs_table = self._macs_on_device(device)
        was_training = model.training
        if was_training:
            model.eval()
        try:
            with torch.inference_mode(), autocast(self.precision, device):
                result = self._run(to_memory_format(x.to(device), self.channels_last), macs_table)
            if result.logits.dtype != torch.float32:
                result.logits = result.logits.float()
            return result
        finally:
            if was_training:
                model.train()

    def compiled_segments(self) -> list:
        """One ``torch.compile``-d function per exit: input (images for exit 0, else the state) ->
        ``(state, features, logits)``. Built on first use."""
        if self._segments is None:
            import torch._dynamo

            model, bb = self.model, self.model.backbone
            # every exit's function shares one code object, so dynamo keys its cache on the exit index too
            limit = 8 * bb.num_stages
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)

            def make(index: int):
                def segment(state: State):
                    if index == 0:
                        state = bb.stem(cast(Tensor, state))  # exit 0's segment takes the images
                    state = bb.stage(index, state)
                    feats = bb.exit_features(index, state)
                    return state, feats, model.exit_logits(index, feats)
                return torch.compile(segment, dynamic=True)

            self._segments = [make(l) for l in range(bb.num_stages)]
        return self._segments

    def _run(self, x: Tensor, macs_table: Tensor) -> InferenceResult:
        model, bb, gate = self.model, self.model.backbone, self.model.gate
        combiner = model.exit_combiner
        bb.check_input(x)
        n, device = x.shape[0], x.device
        last = bb.num_stages - 1  # exit G: the backbone's head
        exit_index = torch.full((n,), last, dtype=torch.long, device=device)
        out_logits: Tensor | None = None
        if n == 0:
            empty = torch.empty(0, model.num_classes, device=device)
            return InferenceResult(exit_index.clone(), exit_index, empty[:, 0], empty, macs_table[exit_index])

        rows = torch.arange(n, device=device)  # original positions of the rows still running
        segments = self.compiled_segments() if self.compile else None
        state = bb.stem(x) if segments is None else x
        prefix: Tensor | None = None  # gate scores [b, l+1] of the running rows
        raw: Tensor | None = None  # un-combined per-exit logits [b, l+1, C] (only with a combiner)
        past: Tensor | None = None  # reported logits [b, l, C] of the earlier exits (only for history gates)
        history = gate.reads_history
        for l in range(bb.num_stages):
            if segments is None:
                state = bb.stage(l, state)
                feats = bb.exit_features(l, state)
                logits = model.exit_logits(l, feats)
            else:
                state, feats, logits = segments[l](state)
            if combiner is not None:
                raw = logits.unsqueeze(1) if raw is None else torch.cat([raw, logits.unsqueeze(1)], dim=1)
                logits = combiner(raw)[:, -1]
            if out_logits is None:
                out_logits = logits.new_empty(n, logits.shape[-1])
            if l == last:
                out_logits[rows] = logits
                break
            score = gate.score_exit(l, logits, feats, past).unsqueeze(1)
            if history:
                past = logits.unsqueeze(1) if past is None else torch.cat([past, logits.unsqueeze(1)], dim=1)
            prefix = score if prefix is None else torch.cat([prefix, score], dim=1)
            leave = gate.exits_at(prefix)
            if leave.dtype != torch.bool:
                leave = leave.bool()
            running = rows.shape[0]
            leaving = int(leave.sum())  # the one host sync per exit: the next shapes depend on it
            if leaving == 0:
                continue  # nobody leaves: keep the state as it is, no copy
            if leaving == running:
                out_logits[rows] = logits
                exit_index[rows] = l
                break
            gone = _indices(leave, leaving)
            kept = _indices(~leave, running - leaving)
            out_rows = rows[gone]
            out_logits[out_rows] = logits[gone]
            exit_index[out_rows] = l
            rows = rows[kept]
            state = select_rows(state, kept)
            prefix = prefix[kept]
            if past is not None:
                past = past[kept]
            if raw is not None:
                raw = raw[kept]
        assert out_logits is not None
        predictions = out_logits.argmax(-1)
        confidences = out_logits.float().softmax(-1).amax(-1)
        return InferenceResult(predictions, exit_index, confidences, out_logits, macs_table[exit_index])


def early_exit_inference(model: EarlyExitModel, x: Tensor,
                         exit_macs: Sequence[float] | Tensor | None = None) -> InferenceResult:
    """One early-exit pass over ``x`` (see :class:`EarlyExitEngine`; build the engine once to reuse
    its measured MACs across calls)."""
    return EarlyExitEngine(model, exit_macs)(x)


def full_inference(model: EarlyExitModel, x: Tensor) -> Tensor:
    """Logits ``[B, C]`` of the plain backbone through its own head: the baseline early exits are
    timed against (no IMs, no gates)."""
    bb = model.backbone
    device = next(bb.parameters()).device
    was_training = bb.training
    if was_training:
        bb.eval()
    try:
        with torch.inference_mode():
            return bb(x.to(device))
    finally:
        if was_training:
            bb.train()
