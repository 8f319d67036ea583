"""EarlyExitModel: a stage-wise backbone + one IM per intermediate exit + one gate object."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from eedn.core.contracts import Backbone, Gate, InferenceModule


class EarlyExitModel(nn.Module):
    """Exit ``l < G`` is IM ``l`` on ``backbone.exit_features(l, ...)``; exit ``G`` is the backbone's
    own head. ``forward`` is the all-exit pass used for training and stored outputs; real early exits
    live in :mod:`eedn.deploy.inference`."""

    def __init__(self, backbone: Backbone, ims: list[InferenceModule], gate: Gate):
        super().__init__()
        if len(ims) != backbone.num_stages - 1:
            raise ValueError(f"need {backbone.num_stages - 1} inference modules, got {len(ims)}")
        self.backbone = backbone
        self.ims = nn.ModuleList(ims)
        self.gate = gate
        #: optional module mapping per-exit logits [B, E, C] to the logits each exit reports, for
        #: strategies whose exits are ensembles of earlier ones (BoostNet). Identity when None.
        self.exit_combiner: nn.Module | None = None

    @property
    def num_exits(self) -> int:
        """E = G + 1 exits, the backbone's head included."""
        return self.backbone.num_stages

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def exit_features(self, x: Tensor) -> list[Tensor]:
        """One backbone pass; the feature vector every exit reads (the last one feeds the head)."""
        state = self.backbone.stem(x)
        feats = []
        for i in range(self.backbone.num_stages):
            state = self.backbone.stage(i, state)
            feats.append(self.backbone.exit_features(i, state))
        return feats

    def exit_logits(self, index: int, features: Tensor) -> Tensor:
        if index == len(self.ims):
            return self.backbone.head(features)
        return self.ims[index](features)

    def im_logits(self, feats: list[Tensor]) -> Tensor:
        """``[B, G, C]`` logits of the intermediate IMs only (what head-training strategies update)."""
        return torch.stack([im(f) for im, f in zip(self.ims, feats)], dim=1)

    def logits_from_features(self, feats: list[Tensor]) -> Tensor:
        """``[B, E, C]`` logits of every exit from the per-exit features."""
        logits = torch.stack([self.exit_logits(i, f) for i, f in enumerate(feats)], dim=1)
        return logits if self.exit_combiner is None else self.exit_combiner(logits)

    def gate_scores(self, logits: Tensor, feats: list[Tensor] | None = None) -> Tensor:
        """``[B, G]`` gate scores from all-exit logits."""
        g = len(self.ims)
        cols = [self.gate.score_exit(l, logits[:, l], None if feats is None else feats[l], logits[:, :l])
                for l in range(g)]
        return torch.stack(cols, dim=1) if cols else logits.new_zeros(logits.shape[0], 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_from_features(self.exit_features(x))

    def heads(self) -> nn.ModuleDict:
        """The modules a head-training strategy updates (IMs and gate)."""
        parts = {"ims": self.ims, "gate": self.gate}
        if self.exit_combiner is not None:
            parts["combiner"] = self.exit_combiner
        return nn.ModuleDict(parts)

    def heads_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.heads().state_dict().items()}

    def load_heads_state_dict(self, state: dict[str, Tensor]) -> None:
        self.heads().load_state_dict(state)

    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)
        self.backbone.eval()
