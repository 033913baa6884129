"""The library internals peftprompt relies on, in one module.

Everything else in the package reaches transformers, PEFT, accelerate and bitsandbytes through their public API:
names the top-level packages (or ``peft.utils``) export, transformers' `Cache` and attention / mask interfaces,
`peft.utils.register_peft_method`. What has no public equivalent is here, each with the reason it is needed, and
``tests/unit/test_compat.py`` checks every one against the installed releases, failing with the library and the
name when a release changes it. When a pin in ``pyproject.toml`` is widened, that test is the first to run.

- `extend_peft_type`: `register_peft_method` accepts only names that are already members of PEFT's closed
  `PeftType` enum, so an out-of-tree method (BitFit) adds its member through the enum's private tables.
- `BaseTuner`, `BaseTunerLayer`, `check_target_module_exists`, `check_adapters_to_merge`: the base classes and
  helpers PEFT's own tuners are built from (``peft.tuners.tuners_utils``; not exported at the top level).
  `move_adapter_to_base_device` calls the private helper every PEFT layer uses to place a new adapter.
- `ADAPTION_PROMPT_MODELS`: the model types adaption prompts support (``peft.tuners.adaption_prompt.config``).
- `auto_class_names`: the model type -> class name tables behind transformers' auto classes
  (``transformers.models.auto.modeling_auto``), which say what a checkpoint's auto class builds without importing it.
- `LengthGroupedSampler`: transformers' length-grouped sampler (``transformers.trainer_pt_utils``), which the
  `Trainer` uses and does not export.
- `drop_pre_quantization_dtype`: a config loaded from GGUF keeps the private ``_pre_quantization_dtype``, which
  `save_pretrained` refuses to write once the model is no longer quantised.
"""

from __future__ import annotations

from collections.abc import Mapping

from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG as ADAPTION_PROMPT_MODELS
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils import PeftType
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.trainer_pt_utils import LengthGroupedSampler

# transformers' table (model_type -> class name) behind each auto class
_AUTO_CLASS_TABLES = {
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it as a new member (value == name) if it does not exist yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def move_adapter_to_base_device(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Put `layer`'s new adapter `adapter_name` on its base layer's device and dtype, as PEFT's own layers do."""
    layer._move_adapter_to_device_of_base_layer(adapter_name)


def drop_pre_quantization_dtype(config: PretrainedConfig) -> None:
    """Forget that `config` came from a quantised (GGUF) checkpoint, so a dequantised model saves as a plain one."""
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype


def auto_class_names(auto_class_name: str) -> Mapping[str, str]:
    """What an auto class (``"AutoModelForCausalLM"``, one of four) builds: model type -> model class name."""
    return getattr(modeling_auto, _AUTO_CLASS_TABLES[auto_class_name])


__all__ = [
    "ADAPTION_PROMPT_MODELS",
    "BaseTuner",
    "BaseTunerLayer",
    "LengthGroupedSampler",
    "auto_class_names",
    "check_adapters_to_merge",
    "check_target_module_exists",
    "drop_pre_quantization_dtype",
    "extend_peft_type",
    "move_adapter_to_base_device",
]
