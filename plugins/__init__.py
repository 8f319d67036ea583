"""eedn's built-in plugins, registered exactly as a third-party package registers its own.

This page is the whole registration: one hook per kind, each naming its factories by ``"module:attribute"``
reference, so eedn imports a family's module (and torch, timm, torchvision) only when one of its plugins
is built. Listing plugins and starting the CLI stay fast. ``default=True`` marks what runs when the user names
none of that kind (every evaluator so marked runs unless the user lists others). The implementations live one file
per family beside this one. The package is installed under the ``eedn`` entry-point group (``pyproject.toml``).
"""
from __future__ import annotations

from eedn.core.hookspecs import hookimpl

_T2T = ("Any image size that is a multiple of 16 (32 px -> 5 tokens, 224 px -> 197); drop_path_rate (0.1). "
        "--backbone-checkpoint: official T2T-ViT or eedn weights (head and position table adapted).")
_CIFAR = "stages = residual blocks (exits='block', default) or the 3 layers (exits='stage')"
_TV = "stages = its 4 layers (exits='stage', default) or every block; 3x3 stem without max-pool at <= 64 px"


@hookimpl
def register_backbones(register):
    t2t = "eedn_plugins.t2t_vit"
    register("t2t_vit", f"{t2t}:t2t_vit", default=True,
             description="T2T-ViT by size: size=auto|7|14|24|tiny; auto = tiny for 1-channel inputs of <= 32 px "
                         "(digits), else 7. " + _T2T)
    register("t2t_vit_7", f"{t2t}:t2t_vit_7", description="T2T-ViT-7 (d=256, 7 blocks, 4 heads, MLP x2), the "
                                                          "JEI-DNN backbone. " + _T2T)
    register("t2t_vit_14", f"{t2t}:t2t_vit_14", description="T2T-ViT-14 (d=384, 14 blocks, 6 heads, MLP x3). " + _T2T)
    register("t2t_vit_24", f"{t2t}:t2t_vit_24", description="T2T-ViT-24 (d=512, 24 blocks, 8 heads, MLP x3). " + _T2T)
    register("t2t_vit_tiny", f"{t2t}:t2t_vit_tiny",
             description="Tiny T2T-ViT for tests and CPU demos (d=64, 4 blocks, 2 heads, token dim 32). " + _T2T)
    res = "eedn_plugins.resnet"
    register("resnet", f"{res}:resnet", description="ResNet by size: size=auto|tiny|20|32|56|110|18|50; auto = tiny "
                                                    "for 1-channel inputs of <= 32 px (digits), ResNet-20 up to 64 px, "
                                                    "else torchvision ResNet-18")
    register("resnet20", f"{res}:resnet20", description=f"CIFAR ResNet-20, 16/32/64 wide; {_CIFAR}")
    register("resnet32", f"{res}:resnet32", description=f"CIFAR ResNet-32; {_CIFAR}")
    register("resnet56", f"{res}:resnet56", description=f"CIFAR ResNet-56; {_CIFAR}")
    register("resnet110", f"{res}:resnet110", description=f"CIFAR ResNet-110; {_CIFAR}")
    register("resnet18", f"{res}:resnet18", description=f"torchvision ResNet-18; {_TV}")
    register("resnet50", f"{res}:resnet50", description=f"torchvision ResNet-50; {_TV}")
    register("resnet_tiny", f"{res}:resnet_tiny", description="CIFAR-style ResNet-8, 8/16/32 wide, 3 block stages")
    fast = "eedn_plugins.fast_cifar"
    register("fast_cifar", f"{fast}:fast_cifar",
             description="fast CIFAR convnet in airbench94's layout (whitened 2x2 stem, groups of conv-pool-BN-GELU, "
                         "widths 64/256/256, ~118 M MACs at 32 px); one exit per convolution (6; 9 with "
                         "convs_per_group=3)")
    register("fast_cifar_small", f"{fast}:fast_cifar_small",
             description="fast_cifar at half width (32/128/128) for quick runs")
    register("timm", "eedn_plugins.timm_backbones:timm_backbone", namespace=True,
             description="any timm model, timm:<model_name> (pretrained=False): ViT family = blocks as stages "
                         "(every=k blocks per exit), hierarchical families = their feature_info stages; "
                         "--backbone-checkpoint: a local timm/HF weight file")


@hookimpl
def register_inference_modules(register):
    register("linear", "eedn_plugins.heads:LinearIM", default=True, description="one Linear layer (JEI-DNN's IM)")
    register("mlp", "eedn_plugins.heads:MLPIM", description="Linear-GELU-Linear")


@hookimpl
def register_gates(register):
    th = "eedn_plugins.thresholds"
    register("max_prob", f"{th}:MaxProbGate", default=True, description="max softmax probability thresholds (MSDNet budgets)")
    register("entropy", f"{th}:EntropyGate", description="negative-entropy thresholds (MSDNet budgets)")
    register("margin", f"{th}:MarginGate", description="top-1 minus top-2 probability thresholds (MSDNet budgets)")
    register("patience", f"{th}:PatienceGate", description="exit after k consecutive agreeing predictions")
    register("jei", "eedn_plugins.jei_gate:JeiGate",
             description="JEI-DNN learned gate: Linear(4->1) on confidence statistics, hazard rule")


@hookimpl
def register_strategies(register):
    register("jei", "eedn_plugins.jei:JeiStrategy", default=True,
             description="JEI-DNN: IM warm-up, then alternating gate/IM training per λ")
    register("im-only", "eedn_plugins.heads:IMOnlyStrategy",
             description="IMs with the JEI warm-up loss, threshold gate")
    register("sdn", "eedn_plugins.sdn:SDNStrategy",
             description="SDN weighted joint loss (weights grow linearly to the IM position)")
    register("boostnet", "eedn_plugins.boostnet:BoostNetStrategy",
             description="BoostNet: IMs as boosted weak learners (exits report ensembles)")
    register("l2w", "eedn_plugins.l2w:L2WStrategy",
             description="L2W-DEN: meta-learned per-sample loss weights for the IMs")


@hookimpl
def register_evaluators(register):
    register("calibration", "eedn_plugins.calibration:CalibrationEvaluator", default=True,
             description="ECE (equal-width / equal-mass), MCE, NLL, Brier of the gated prediction and every exit, "
                         "raw and after per-exit temperature scaling; paper-compat per-batch ECE. Headline: the "
                         "gated prediction's ECE, raw and scaled")
    register("conformal", "eedn_plugins.conformal:ConformalEvaluator", default=True,
             description="split conformal sets (LAC/APS/RAPS) on the gated prediction; one q̂ (general) or one "
                         "per exit (gated); coverage and mean set size at fixed alphas. Headline: set size and "
                         "coverage at LAC, α = 0.05, general q̂ (headline_* options)")


@hookimpl
def register_datasets(register):
    ds = "eedn_plugins.datasets"
    register("digits", f"{ds}.digits:DigitsSource", default=True,
             description="sklearn's embedded 1797 8x8 digits (default; upsampled to 32 px, no files needed)")
    register("cifar10", f"{ds}.cifar:CifarSource", description="CIFAR-10 from data_dir (torchvision layout)")
    register("cifar100", f"{ds}.cifar:Cifar100Source", description="CIFAR-100 from data_dir (torchvision layout)")
    register("cifar100-lt", f"{ds}.cifar:LongTailCifarSource",
             description="long-tailed CIFAR-100 (imbalance 100, imbalanced class-ordered test, shot groups)")
    register("cifar10-lt", f"{ds}.cifar:LongTailCifar10Source", description="long-tailed CIFAR-10 (imbalance 100)")
    register("svhn", f"{ds}.svhn:SvhnSource", description="SVHN train/test .mat files from data_dir")
    register("torchvision", f"{ds}.torchvision_datasets:TorchvisionSource", namespace=True,
             description="any torchvision classification dataset from local files, torchvision:<ClassName> "
                         "(download=False); channels, classes, size and mean/std from the data")
    register("image-folder", f"{ds}.image_folder:ImageFolderSource",
             description="train/<class>/* (and optional test/) in a directory or .tar.gz at data_dir")


@hookimpl
def register_risks(register):
    rk = "eedn_plugins.risks"
    register("prediction_gap", f"{rk}:PredictionGap", default=True,
             description="1{exit prediction != final prediction}; needs no labels; in {0, 1}")
    register("accuracy_gap", f"{rk}:AccuracyGap",
             description="1{final correct} - 1{exit correct}; in [-1, 1] (clip=true: its positive part, in {0, 1})")
    register("set_size_gap", f"{rk}:SetSizeGap",
             description="(|C_exit| - |C_final|) / classes of conformal sets (needs the conformal evaluator); "
                         "in [-1, 1]")
    register("miscoverage_gap", f"{rk}:MiscoverageGap",
             description="1{y not in C_exit} - 1{y not in C_final} of conformal sets (needs the conformal "
                         "evaluator); in [-1, 1]")
