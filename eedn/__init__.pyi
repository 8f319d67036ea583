"""Type stub of the ``eedn`` facade: the lazily imported public names, so that editors complete them and
type checkers know their types. tests/test_api.py checks that it lists exactly ``eedn.__all__``, each from
the module ``eedn/__init__.py`` imports it from."""
from eedn.api import calibrate_gate as calibrate_gate
from eedn.api import evaluate as evaluate
from eedn.api import fit_strategy as fit_strategy
from eedn.api import load_dataset as load_dataset
from eedn.api import load_run as load_run
from eedn.api import split_outputs as split_outputs
from eedn.api import train_backbone as train_backbone
from eedn.bench import benchmark as benchmark
from eedn.budgets import ThresholdGate as ThresholdGate
from eedn.build import build_backbone as build_backbone
from eedn.build import build_model as build_model
from eedn.build import create_model as create_model
from eedn.contracts import Backbone as Backbone
from eedn.contracts import DatasetSource as DatasetSource
from eedn.contracts import Evaluator as Evaluator
from eedn.contracts import Gate as Gate
from eedn.contracts import InferenceModule as InferenceModule
from eedn.contracts import InputSpec as InputSpec
from eedn.contracts import Metric as Metric
from eedn.contracts import select_rows as select_rows
from eedn.cost import measure_exit_macs as measure_exit_macs
from eedn.data import MappedDataset as MappedDataset
from eedn.data import DataSplits as DataSplits
from eedn.data import TensorImages as TensorImages
from eedn.data import channel_statistics as channel_statistics
from eedn.data import dataset_labels as dataset_labels
from eedn.data import hold_out as hold_out
from eedn.data import stratified_holdout as stratified_holdout
from eedn.data import subset as subset
from eedn.errors import EednError as EednError
from eedn.errors import UnknownNameError as UnknownNameError
from eedn.hookspecs import hookimpl as hookimpl
from eedn.inference import EarlyExitEngine as EarlyExitEngine
from eedn.inference import InferenceResult as InferenceResult
from eedn.model import EarlyExitModel as EarlyExitModel
from eedn.options import option as option
from eedn.options import resolve_options as resolve_options
from eedn.outputs import ExitOutputs as ExitOutputs
from eedn.outputs import read_outputs as read_outputs
from eedn.plugins import create as create
from eedn.plugins import list_names as list_names
from eedn.plugins import register_plugin as register_plugin
from eedn.plugins import registry as registry
from eedn.policy import apply_gate as apply_gate
from eedn.predict import predict_files as predict_files
from eedn.predict import read_images as read_images
from eedn.progress import Progress as Progress
from eedn.run import run_pipeline as run_pipeline
from eedn.rundir import read_results as read_results
from eedn.strategy import FitContext as FitContext
from eedn.strategy import StrategyResult as StrategyResult
from eedn.strategy import TrainingStrategy as TrainingStrategy

__version__: str

__all__ = [
    "EednError", "UnknownNameError", "hookimpl", "__version__", "Backbone", "InferenceModule", "Gate", "Evaluator",
    "DatasetSource", "InputSpec", "Metric", "select_rows", "TrainingStrategy", "StrategyResult", "FitContext",
    "option", "resolve_options", "ThresholdGate", "DataSplits", "TensorImages", "stratified_holdout", "hold_out",
    "subset", "channel_statistics", "dataset_labels", "ExitOutputs", "read_outputs", "EarlyExitModel", "build_model",
    "create_model", "build_backbone", "create", "list_names", "register_plugin", "registry", "run_pipeline",
    "load_run", "measure_exit_macs", "split_outputs", "fit_strategy", "apply_gate", "calibrate_gate", "evaluate",
    "load_dataset", "train_backbone", "read_results", "Progress", "EarlyExitEngine", "InferenceResult",
    "predict_files", "read_images", "benchmark",
]
