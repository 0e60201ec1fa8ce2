"""fxcompress: a model-compression compiler for PyTorch built on torch.fx."""
from . import golden
from .api import CompileResult, compile
from .context import CompileContext, PassRecord
from .errors import (
                     ExportError,
                     FxCompressError,
                     InputError,
                     PassError,
                     RecipeError,
                     TracingError,
                     VerificationError,
)
from .export import export_onnx
from .instruments import strict_checks
from .pass_base import Contract, Pass, PassResult
from .pass_manager import PassManager
from .persist import CompiledModule, load
from .plans import load as load_plans
from .plans import save as save_plans
from .tracing import trace

__all__ = [
    "CompileContext", "CompileResult", "CompiledModule", "Contract", "ExportError", "FxCompressError", "InputError",
    "Pass", "PassError", "PassManager", "PassRecord", "PassResult", "RecipeError", "TracingError", "VerificationError",
    "compile", "export_onnx", "golden", "load", "load_plans", "save_plans", "strict_checks", "trace",
]
__version__ = "0.1.0"
