"""K copies of an early-exit model's heads (IMs and gate) trained at once, stacked along a leading dimension.

A λ sweep trains the same heads K times from the same start on the same batches; only the targets differ.
Stacking the K copies' parameters (``[K, ...]`` leaves) and running the heads under :func:`torch.func.vmap`
replaces K small forward/backward/step sequences per batch by one, so a sweep costs about one training run
(docs/method.md, "λ sweeps"). Every operation is per copy: copy k's arithmetic is that of a run with K = 1,
which is how a single λ trains too (the equality is tested).
"""
from __future__ import annotations

from typing import Any, Callable, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from eedn.core.model import EarlyExitModel


class _Bound(nn.Module):
    """Calls ``fn`` with the module's parameters swapped in by :func:`functional_call` (keys ``heads.<name>``)."""

    def __init__(self, module: nn.Module, fn: Callable[..., Tensor]):
        super().__init__()
        self.heads = module
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class StackedHeads:
    """The heads of ``model`` in K copies, copy k starting from ``states[k]`` (``model.heads_state_dict()``
    form). Parameters are ``[K, ...]`` leaf tensors (``self.params``, keyed like the heads' state dict), so
    an optimiser over them updates every copy elementwise, exactly as K optimisers would."""

    def __init__(self, model: EarlyExitModel, states: list[dict[str, Tensor]]):
        if not states:
            raise ValueError("StackedHeads needs at least one state")
        self.model = model
        self.k = len(states)
        trainable = {name for name, p in model.heads().named_parameters()}
        self.params: dict[str, Tensor] = {}
        for key in states[0]:
            stacked = torch.stack([s[key].detach() for s in states]).clone()
            self.params[key] = stacked.requires_grad_(key in trainable and stacked.is_floating_point())

    def group(self, prefix: str) -> list[Tensor]:
        """The stacked leaves whose key starts with ``prefix`` (``"ims."`` or ``"gate."``)."""
        return [p for key, p in self.params.items() if key.startswith(prefix) and p.requires_grad]

    def _sub(self, prefix: str) -> dict[str, Tensor]:
        return {key[len(prefix):]: p for key, p in self.params.items() if key.startswith(prefix)}

    def _vmapped(self, module: nn.Module, prefix: str, fn: Callable[..., Tensor], batched_input: bool,
                 *args) -> Tensor:
        """Fallback for modules without a stacked forward: ``fn`` per copy under :func:`torch.func.vmap`."""
        bound = _Bound(module, fn)
        params = {f"heads.{key}": p for key, p in self._sub(prefix).items()}

        def one(p: dict[str, Tensor], *inputs):
            return functional_call(bound, p, inputs)

        return vmap(one, in_dims=(0, *([0 if batched_input else None] * len(args))))(params, *args)

    def im_logits(self, feats: list[Tensor]) -> Tensor:
        """``[K, B, G, C]``: every copy's IM logits on the same features (shared by all copies).

        An IM with a ``forward_stacked(params, features) -> [K, B, C]`` method (its own parameters given
        stacked) runs it; any other IM runs under :func:`torch.func.vmap`.
        """
        cols = []
        for l, (im, f) in enumerate(zip(self.model.ims, feats)):
            prefix = f"ims.{l}."
            if hasattr(im, "forward_stacked"):
                cols.append(cast(Any, im).forward_stacked(self._sub(prefix), f))  # duck-typed, like the gate's
            else:
                cols.append(self._vmapped(im, prefix, im.forward, False, f))
        return torch.stack(cols, dim=2)

    def gate_logits(self, im_logits: Tensor, feats: list[Tensor] | None = None) -> Tensor:
        """``[K, B, G]``: copy k's gate on copy k's IM logits ``im_logits[k]`` and the shared features ``feats``
        (``gate_logits_stacked`` when the gate has it, else :func:`torch.func.vmap` over ``gate_logits``)."""
        gate: Any = self.model.gate  # a gate that trains has gate_logits (and may have gate_logits_stacked)
        if hasattr(gate, "gate_logits_stacked"):
            return gate.gate_logits_stacked(self._sub("gate."), im_logits, feats)
        return self._vmapped(gate, "gate.", gate.gate_logits, True, im_logits)

    def state(self, k: int) -> dict[str, Tensor]:
        """Copy k as a heads state dict (loadable with ``model.load_heads_state_dict``)."""
        return {key: p[k].detach().clone() for key, p in self.params.items()}

    def stack_momentum(self, buffers: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Start ``optimizer``'s SGD momentum of every copy from the same per-parameter ``buffers``
        (keyed like the heads' state dict), as K optimisers that all inherited one state would."""
        for key, buf in buffers.items():
            p = self.params.get(key)
            if p is not None and p.requires_grad:
                optimizer.state[p]["momentum_buffer"] = buf.detach().unsqueeze(0).expand_as(p).clone()
