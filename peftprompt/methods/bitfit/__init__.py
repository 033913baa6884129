"""BitFit: bias-only fine-tuning, registered with PEFT as ``PeftType.BITFIT`` (``"bitfit"``)."""

from peft.utils import register_peft_method

from .config import BITFIT, BitFitConfig
from .layer import BitFitLayer
from .model import BitFitModel

__all__ = ["BITFIT", "BitFitConfig", "BitFitLayer", "BitFitModel"]

register_peft_method(name="bitfit", config_cls=BitFitConfig, model_cls=BitFitModel)
