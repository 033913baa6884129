"""peftprompt: parameter-efficient fine-tuning with recursive (self-ask) prompting, on Hugging Face PEFT.

Importing the package registers BitFit with PEFT (``PeftType.BITFIT``), so `peft.get_peft_model` and
`peft.PeftModel.from_pretrained` work with it; it changes nothing else in PEFT. The token-classification fix for
prompt tuning / P-tuning applies to the models `attach` and `load_adapter` build, not to PEFT's classes.
It also silences two library messages that are not the user's to act on (`peftprompt.quiet`).
"""

from . import quiet

quiet.install()  # before PEFT imports bitsandbytes

from .adapters import load_adapter, merged_for_inference, save_adapter  # noqa: E402
from .backbones import BackboneError, load_backbone  # noqa: E402
from .errors import InputError  # noqa: E402
from .methods import METHODS, attach, default_config  # noqa: E402
from .methods.bitfit import BitFitConfig, BitFitModel  # noqa: E402
from .report import ParameterReport, parameter_report  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BackboneError",
    "BitFitConfig",
    "BitFitModel",
    "InputError",
    "ParameterReport",
    "attach",
    "default_config",
    "load_adapter",
    "load_backbone",
    "merged_for_inference",
    "parameter_report",
    "save_adapter",
]
