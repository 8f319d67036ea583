"""Type stub of the ``eedn`` facade: the lazily imported public names, so that editors complete them and
type checkers know their types. tests/test_api.py checks that it lists exactly ``eedn.__all__``, each from
the module ``eedn/__init__.py`` imports it from."""
from eedn.pipeline.api import calibrate_gate as calibrate_gate
from eedn.pipeline.api import evaluate as evaluate
from eedn.pipeline.api import fit_strategy as fit_strategy
from eedn.pipeline.api import load_dataset as load_dataset
from eedn.pipeline.api import load_run as load_run
from eedn.pipeline.api import split_outputs as split_outputs
from eedn.pipeline.api import train_backbone as train_backbone
from eedn.deploy.bench import benchmark as benchmark
from eedn.core.budgets import ThresholdGate as ThresholdGate
from eedn.core.build import build_backbone as build_backbone
from eedn.core.build import build_model as build_model
from eedn.core.build import create_model as create_model
from eedn.core.contracts import Backbone as Backbone
from eedn.core.contracts import DatasetSource as DatasetSource
from eedn.core.contracts import Evaluator as Evaluator
from eedn.core.contracts import Gate as Gate
from eedn.core.contracts import InferenceModule as InferenceModule
from eedn.core.contracts import InputSpec as InputSpec
from eedn.core.contracts import Metric as Metric
from eedn.core.contracts import select_rows as select_rows
from eedn.core.cost import measure_exit_macs as measure_exit_macs
from eedn.core.data import MappedDataset as MappedDataset
from eedn.core.data import DataSplits as DataSplits
from eedn.core.data import TensorImages as TensorImages
from eedn.core.data import channel_statistics as channel_statistics
from eedn.core.data import dataset_labels as dataset_labels
from eedn.core.data import hold_out as hold_out
from eedn.core.data import stratified_holdout as stratified_holdout
from eedn.core.data import subset as subset
from eedn.runtime.errors import EednError as EednError
from eedn.runtime.errors import UnknownNameError as UnknownNameError
from eedn.core.hookspecs import hookimpl as hookimpl
from eedn.deploy.inference import EarlyExitEngine as EarlyExitEngine
from eedn.deploy.inference import InferenceResult as InferenceResult
from eedn.core.model import EarlyExitModel as EarlyExitModel
from eedn.core.options import option as option
from eedn.core.options import resolve_options as resolve_options
from eedn.core.outputs import ExitOutputs as ExitOutputs
from eedn.pipeline.rundir import read_outputs as read_outputs
from eedn.core.plugins import create as create
from eedn.core.plugins import list_names as list_names
from eedn.core.plugins import register_plugin as register_plugin
from eedn.core.plugins import registry as registry
from eedn.evaluation.policy import apply_gate as apply_gate
from eedn.deploy.predict import predict_files as predict_files
from eedn.deploy.predict import read_images as read_images
from eedn.runtime.progress import Progress as Progress
from eedn.core.config import Config as Config
from eedn.core.config import resolve_config as resolve_config
from eedn.pipeline.run import run_pipeline as run_pipeline
from eedn.pipeline.rundir import read_results as read_results
from eedn.train.strategy import FitContext as FitContext
from eedn.train.strategy import StrategyResult as StrategyResult
from eedn.train.strategy import TrainingStrategy as TrainingStrategy

__version__: str

__all__ = [
    "EednError", "UnknownNameError", "hookimpl", "__version__", "Backbone", "InferenceModule", "Gate", "Evaluator",
    "DatasetSource", "InputSpec", "Metric", "select_rows", "TrainingStrategy", "StrategyResult", "FitContext",
    "option", "resolve_options", "ThresholdGate", "DataSplits", "TensorImages", "stratified_holdout", "hold_out",
    "subset", "channel_statistics", "dataset_labels", "MappedDataset", "ExitOutputs", "read_outputs", "EarlyExitModel", "build_model",
    "create_model", "build_backbone", "create", "list_names", "register_plugin", "registry", "Config", "resolve_config", "run_pipeline",
    "load_run", "measure_exit_macs", "split_outputs", "fit_strategy", "apply_gate", "calibrate_gate", "evaluate",
    "load_dataset", "train_backbone", "read_results", "Progress", "EarlyExitEngine", "InferenceResult",
    "predict_files", "read_images", "benchmark",
]
