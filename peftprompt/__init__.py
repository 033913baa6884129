"""peftprompt: parameter-efficient fine-tuning with recursive (self-ask) prompting, on Hugging Face PEFT.

Importing the package registers BitFit with PEFT (``PeftType.BITFIT``) and installs the token-classification fix
for prompt tuning, so `peft.get_peft_model` and `peft.PeftModel.from_pretrained` work with both.
"""

from .adapters import load_adapter, save_adapter
from .backbones import BackboneError, load_backbone
from .methods import METHODS, attach, default_config
from .methods.bitfit import BitFitConfig, BitFitModel
from .report import ParameterReport, parameter_report

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BackboneError",
    "BitFitConfig",
    "BitFitModel",
    "ParameterReport",
    "attach",
    "default_config",
    "load_adapter",
    "load_backbone",
    "parameter_report",
    "save_adapter",
]
