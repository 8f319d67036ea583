"""Any timm model as a stage-wise backbone: ``--backbone timm:<model_name>``.

Built with ``timm.create_model(name, pretrained=False)`` (never downloads) and split into stages through
timm's public surface only:

* **ViT family** (``patch_embed`` + ``blocks`` at one resolution: ViT, DeiT, ...): the stem is the model's own
  ``forward_features`` with its blocks and final norm left out (patch embedding, class token, position
  embedding, ``norm_pre``), a stage is ``every`` consecutive blocks, and an exit reads
  ``forward_head(norm(tokens), pre_logits=True)``: the class token or the pooled tokens, whichever the model
  pools. An exit after every k blocks is ``--set backbone_options.every=k``.
* **Hierarchical families** (ResNet, ConvNeXt, EfficientNet, RegNet, Swin, ...): the model's top-level
  children in order, cut at the modules its ``feature_info`` names (the same sequential reading as timm's
  ``features_only``); the feature points at stride <= 2 belong to the stem, every later one ends a stage.
  Intermediate exits average-pool their stage's map; the last exit is the model's own ``forward_head``.

Either way the split is checked once at construction: the staged forward must equal ``model(x)`` on a random
batch, else one error says this model cannot be split (e.g. blocks that take extra arguments). MACs are
counted exactly like the built-ins' (:mod:`eedn.core.cost`). ``--backbone-checkpoint`` takes a local timm / Hugging
Face weight file (``.safetensors``, ``.pth``, ``.bin``, a timm-trainer checkpoint).

Pretrained tags: ``timm:<model_name>.<tag>`` (``timm:resnet10t.c3_in1k``) resolves like
``timm.create_model("resnet10t.c3_in1k")``: the architecture of ``resnet10t`` with that tag's configuration. Its
weights come from ``--backbone-checkpoint`` when given, else from the local Hugging Face / torch-hub cache when
the tag's file is there (``backbone_options.pretrained=cache``, the default). eedn never downloads; only
``--set backbone_options.pretrained=download`` lets timm fetch them.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from eedn.core.contracts import Backbone, InputSpec, State
from eedn.runtime.errors import EednError, warn
from eedn.core.options import declares, option
from eedn.core.transfer import fit_pretrained, read_state_dict

#: feature points at this stride or finer are part of the stem (ResNet's act1, EfficientNet's first block)
STEM_MAX_REDUCTION = 2
#: the staged forward may differ from timm's by float rounding only
SPLIT_TOLERANCE = 1e-4


@dataclass
class TimmOptions:
    """The options of every timm backbone."""

    every: int = option(1, "ViT family: blocks per stage (an exit after every k blocks)", min=1)
    global_pool: str | None = option(None, "timm's global_pool argument (ViT: token, avg; default: the model's)")
    drop_path_rate: float = option(0.0, "stochastic depth rate passed to timm.create_model", min=0.0, max=1.0)
    pretrained: str = option("cache", "weights of a tagged name (timm:NAME.TAG): cache = the local Hugging Face / "
                             "torch-hub cache when present, download = let timm download them (opt-in), none = "
                             "random initialisation", choices=("cache", "download", "none"))


def split_name(name: str) -> tuple[str, str]:
    """``resnet10t.c3_in1k`` → ``("resnet10t", "c3_in1k")`` the way timm splits a pretrained tag off a name."""
    from timm.models import split_model_name_tag

    return split_model_name_tag(name)


def cached_weights(name: str) -> Path | None:
    """The local file of a tagged model's pretrained weights, if timm's sources for it are already cached: the
    Hugging Face hub cache (``$HF_HUB_CACHE``) or torch hub's checkpoints folder (``$TORCH_HOME``). Never
    downloads."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else \
            ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = getattr(cfg, "url", None)
    if url:
        from urllib.parse import urlparse

        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if local.is_file():
            return local
    return None


def _create(variant: str, num_classes: int, image_size: int, in_channels: int, options: TimmOptions) -> nn.Module:
    import timm

    arch, tag = split_name(variant)
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        hint = f"; e.g. {', '.join(close)}" if close else "; `python -c \"import timm; print(timm.list_models())\"`"
        raise EednError(f"timm has no model '{arch}'{hint}")
    if tag and variant not in timm.list_pretrained(f"{arch}.*"):
        tags = timm.list_pretrained(f"{arch}.*")[:8]
        hint = f"; its tags: {', '.join(tags)}" if tags else f"; timm has no pretrained tag for {arch}"
        raise EednError(f"timm has no pretrained tag '{tag}' for {arch}{hint}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels,
                              "drop_path_rate": options.drop_path_rate}
    if options.global_pool is not None:
        kwargs["global_pool"] = options.global_pool
    download = bool(tag) and options.pretrained == "download"  # the only way timm may reach the network
    try:  # transformers take the image size; convolutional models do not
        return timm.create_model(variant, pretrained=download, img_size=image_size, **kwargs)
    except TypeError:
        return timm.create_model(variant, pretrained=download, **kwargs)


def _is_token_model(model: nn.Module) -> bool:
    info = getattr(model, "feature_info", None) or []
    return (isinstance(getattr(model, "blocks", None), nn.Sequential) and hasattr(model, "patch_embed")
            and len({f["reduction"] for f in info}) <= 1)


class TimmBackbone(Backbone):
    """A timm model run as stem + stages (see the module docstring). Its weights live under ``model.``."""

    # `model` is any timm model: forward_features, forward_head, blocks or norm depend on its family (duck-typed)
    _stem_view: Any  # the token model without its blocks (set in __init__, not registered)

    def __init__(self, model: Any, variant: str, num_classes: int, input_spec: InputSpec, every: int):
        super().__init__()
        self.model = model
        self.variant = variant
        self.num_classes = num_classes
        self.input_spec = input_spec
        self._display_name = f"timm {variant}"
        self.tokens = _is_token_model(model)
        self._nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        if self.tokens:
            blocks = list(model.blocks)
            groups: list[nn.Module] = [nn.Sequential(*blocks[i : i + every]) for i in range(0, len(blocks), every)]
            # plain lists (not registered) so the state dict keeps timm's own key names under model.
            self._stages: list[nn.Module] = groups
            self._stem_parts: list[nn.Module] = []
            self._trailing: list[nn.Module] = []
            view = copy.copy(model)  # shares every parameter; its own child dict leaves the model untouched
            view._modules = dict(model._modules)
            view._modules["blocks"] = nn.Identity()
            view._modules["norm"] = nn.Identity()
            object.__setattr__(self, "_stem_view", view)
        else:
            self._split_hierarchical(model)
        self.num_stages = len(self._stages)
        self.feature_dims = self._check_split()

    # ----------------------------------------------------------------------------------- split
    def _split_hierarchical(self, model: Any) -> None:
        info = getattr(model, "feature_info", None)
        if not info:
            raise EednError(f"timm model {self.variant} has no feature_info, so eedn cannot find its stages")
        points = [f["module"] for f in info]
        children: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            if any(p.startswith(name + ".") for p in points):
                children.extend((f"{name}.{n}", c) for n, c in child.named_children())
            else:
                children.append((name, child))
        names = [n for n, _ in children]
        missing = [p for p in points if p not in names]
        if missing:
            raise EednError(f"timm model {self.variant}: feature modules {', '.join(missing)} are not in its "
                            "top-level order, so eedn cannot split it into stages")
        stem_end = max((names.index(f["module"]) + 1 for f in info if f["reduction"] <= STEM_MAX_REDUCTION),
                       default=0)
        ends = [names.index(f["module"]) + 1 for f in info if f["reduction"] > STEM_MAX_REDUCTION]
        if not ends:
            raise EednError(f"timm model {self.variant} has no feature points past the stem, so no stages")
        self._stem_parts = [m for _, m in children[:stem_end]]
        starts = [stem_end] + ends[:-1]
        self._stages = [nn.Sequential(*[m for _, m in children[a:b]]) for a, b in zip(starts, ends)]
        # modules after the last stage that forward_features still runs (a final norm or conv) come before the
        # exit; the rest belong to forward_head. Found by watching one forward_features call.
        used: set[int] = set()
        rest = [m for _, m in children[ends[-1]:]]
        hooks = [m.register_forward_hook(lambda mod, *_: used.add(id(mod))) for m in rest]
        try:
            with torch.no_grad():
                model.eval().forward_features(self._dry_input())
        finally:
            for h in hooks:
                h.remove()
        self._trailing = [m for m in rest if id(m) in used]

    def _dry_input(self) -> Tensor:
        spec = self.input_spec
        generator = torch.Generator().manual_seed(0)
        return torch.randn(2, spec.channels, spec.image_size, spec.image_size, generator=generator)

    def _check_split(self) -> list[int]:
        """Feature widths per exit, after checking the staged forward equals ``model(x)``."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = self._dry_input()
                state = self.stem(x)
                dims = []
                for i in range(len(self._stages)):
                    state = self.stage(i, state)
                    dims.append(int(self.exit_features(i, state).shape[-1]))
                staged = self.head(self.exit_features(len(self._stages) - 1, state))
                reference = self.model(x)
        except EednError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means the split does not fit this model
            raise EednError(f"timm model {self.variant} cannot be run stage by stage ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160]}); pick a ViT-style or hierarchical model") from exc
        finally:
            self.train(was_training)
        if staged.shape != reference.shape or not torch.allclose(staged, reference, rtol=SPLIT_TOLERANCE,
                                                                 atol=SPLIT_TOLERANCE):
            raise EednError(f"timm model {self.variant}: its stage-wise forward does not reproduce model(x), so "
                            "eedn cannot split it; pick a ViT-style or hierarchical model")
        return dims

    # ------------------------------------------------------------------------------ contract
    def stem(self, x: Tensor) -> State:
        if self.tokens:
            return self._stem_view.forward_features(x)
        for module in self._stem_parts:
            x = module(x)
        return x

    def stage(self, index: int, state: State) -> State:
        return self._stages[index](state)

    def exit_features(self, index: int, state: State) -> Tensor:
        if self.tokens:
            return self.model.forward_head(self.model.norm(state), pre_logits=True)
        if index == len(self._stages) - 1:
            for module in self._trailing:
                state = module(state)
            return self.model.forward_head(state, pre_logits=True)
        return cast(Tensor, state).mean(dim=(1, 2) if self._nhwc else (2, 3))  # a CNN's state is one map

    def head(self, features: Tensor) -> Tensor:
        return self.model.get_classifier()(features)

    def load_pretrained(self, path: str | os.PathLike, adapt_input_channels: bool = False) -> dict[str, list[str]]:
        """A local timm / Hugging Face weight file of this model (``.safetensors``, ``.pth``, ``.bin``, a timm
        trainer checkpoint, or eedn's own saves with the ``model.`` prefix). A classifier of another class count
        is dropped; the first convolution adapts to other channel counts when asked."""
        state = read_state_dict(path)
        if not any(k.startswith("model.") for k in state):
            state = {f"model.{k}": v for k, v in state.items()}
        pretrained = getattr(self.model, "pretrained_cfg", None) or {}  # timm's description of the weights
        classifier = pretrained.get("classifier")
        classifiers = tuple(f"model.{c}." for c in ([classifier] if isinstance(classifier, str) else classifier or ()))
        first = pretrained.get("first_conv")
        first_conv = f"model.{first}.weight" if isinstance(first, str) else None
        spec = self.input_spec
        return fit_pretrained(self, state, f"checkpoint {path} (for {self.display_name}, {self.num_classes} classes, "
                                           f"{spec.channels}-channel {spec.image_size} px images)", classifiers,
                              first_conv, adapt_input_channels)


@declares(TimmOptions)
def timm_backbone(variant: str, num_classes: int, image_size: int, in_channels: int = 3,
                  **options: Any) -> TimmBackbone:
    """``timm:<model_name>``: any timm model split into stages (see the module docstring)."""
    if int(num_classes) < 1 or int(in_channels) < 1 or int(image_size) < 1:
        raise EednError(f"timm:{variant} needs positive num_classes, in_channels and image_size, got "
                        f"{num_classes}, {in_channels}, {image_size}")
    opts = TimmOptions(**options)  # validated by the registry; typed from here on
    model = _create(variant, num_classes, image_size, in_channels, opts)
    backbone = TimmBackbone(model, variant, num_classes, InputSpec(in_channels, image_size), opts.every)
    _, tag = split_name(variant)
    if tag and opts.pretrained == "download":
        backbone.weights_source = f"timm pretrained {variant}"
    elif tag and opts.pretrained == "cache":
        found = cached_weights(variant)
        if found is None:
            from huggingface_hub import constants

            hf_cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
            warn(f"no local weights for timm:{variant} (looked in {hf_cache} and {torch.hub.get_dir()}): it starts "
                 "from random initialisation unless --backbone-checkpoint FILE gives them; --set "
                 "backbone_options.pretrained=download lets timm fetch them")
        else:
            backbone.load_pretrained(found, adapt_input_channels=in_channels != 3)
            backbone.weights_source = str(found)
    return backbone

