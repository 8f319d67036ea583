"""Exact per-exit cost in MACs, counted by torch's FlopCounterMode (MACs = FLOPs / 2).

Exit ``l`` costs everything run to reach and evaluate it: stem, stages ``0..l``, and the exit
features, IM and gate of every exit ``0..l`` (a sample that leaves at ``l`` paid for the earlier
exits it declined). The final exit adds the backbone head. ``full_macs`` is the plain backbone alone.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from eedn.core.model import EarlyExitModel


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    """Formulas for ops FlopCounterMode leaves at zero on this torch build (fused CPU attention)."""
    from torch.utils.flop_counter import flop_registry

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in flop_registry and op not in flop_registry:
        mapping[op] = _cpu_flash_sdpa_flops
    return mapping


def count_macs(fn: Callable[[], object]) -> int:
    """MACs of running ``fn()`` once (all matmuls, convolutions and attention)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_exit_macs(model: EarlyExitModel) -> tuple[list[int], int]:
    """Cumulative MACs per exit and the plain backbone's MACs, for one input sample."""
    bb = model.backbone
    was_training = model.training
    model.eval()
    spec = bb.input_spec
    param = next(bb.parameters())
    x = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=param.device, dtype=param.dtype)
    box: dict[str, object] = {}

    def run_stem():
        box["state"] = bb.stem(x)

    total = count_macs(run_stem)
    backbone_total = total
    exit_macs: list[int] = []
    g = len(model.ims)
    for i in range(bb.num_stages):
        def run_stage(i=i):
            box["state"] = bb.stage(i, box["state"])

        stage_macs = count_macs(run_stage)
        total += stage_macs
        backbone_total += stage_macs

        def run_exit(i=i):
            feats = bb.exit_features(i, box["state"])
            logits = model.exit_logits(i, feats)
            past = box.get("past")
            if i < g:
                model.gate.score_exit(i, logits, feats, past)
            box["past"] = logits.unsqueeze(1) if past is None else torch.cat([past, logits.unsqueeze(1)], 1)

        exit_cost = count_macs(run_exit)
        exit_macs.append(total + exit_cost)
        if i < g:
            total += exit_cost
        else:
            backbone_total += exit_cost
    model.train(was_training)
    return exit_macs, backbone_total


def macs_tensor(exit_macs: list[int]) -> Tensor:
    return torch.tensor(exit_macs, dtype=torch.float64)
