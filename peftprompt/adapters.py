"""Save adapters atomically and load them back with clear errors for broken directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .atomic import write_dir_atomically
from .errors import InputError, InputFileNotFoundError
from .methods.prompt_learning import align_token_classification

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(
    model: Union[PeftModel, PreTrainedModel],
    output_dir: Union[str, Path],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Save `model` to `output_dir` as safetensors, replacing any previous save only once the new one is complete.

    A `PeftModel` saves its adapter weights, config and trained head (``adapter_model.safetensors``); a plain model
    (method ``"full"``) saves the full checkpoint. The files are written to a temporary directory next to
    `output_dir` and renamed into place, so an interrupted save never leaves a half-written adapter behind.
    """
    output_dir = Path(output_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_dir_atomically(output_dir, write)
    return output_dir


def directory_bytes(path: Union[str, Path], pattern: str = "*.safetensors") -> int:
    """Total size in bytes of the files matching `pattern` in `path` (the weights of a saved adapter)."""
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def check_adapter_dir(adapter_dir: Union[str, Path]) -> dict:
    """Validate a saved adapter directory and return its config, raising a clear error for what is wrong."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputFileNotFoundError(f"adapter directory {adapter_dir} does not exist", file=adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InputFileNotFoundError(f"{adapter_dir} is not a saved adapter: {ADAPTER_CONFIG} is missing",
                                     file=adapter_dir)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg})", file=config_path, line=err.lineno) from err
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise InputError(
            f"{config_path}: field 'peft_type' is {peft_type!r}, not a known PEFT method "
            "(did you `import peftprompt` before loading a BitFit adapter?)", file=config_path, field="peft_type"
        )
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise InputFileNotFoundError(f"{adapter_dir} is not a complete adapter: {ADAPTER_WEIGHTS} is missing",
                                     file=adapter_dir)
    try:
        with safe_open(weights_path, framework="pt") as weights:
            for key in weights.keys():
                weights.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{weights_path} is corrupt or truncated ({err})", file=weights_path) from err
    return config


def load_adapter(
    model: PreTrainedModel,
    adapter_dir: Union[str, Path],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved adapter onto `model` after checking that the directory is complete and readable.

    As with `peftprompt.attach`, a prompt-tuned or P-tuned token classifier returns logits aligned with the input
    tokens (`peftprompt.methods.prompt_learning.align_token_classification`); plain `PeftModel.from_pretrained`
    does not.
    """
    check_adapter_dir(adapter_dir)
    peft_model = PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable
    )
    return align_token_classification(peft_model)


def merged_for_inference(model: Union[PeftModel, PreTrainedModel]) -> PreTrainedModel:
    """`model` in eval mode, with its adapter folded into the backbone's weights when that gives the same model.

    A `PeftModel` holding one adapter of a method that merges (LoRA, IA3, BitFit...) on a backbone that is not
    quantised comes back as the plain backbone after PEFT's ``merge_and_unload()``: the same outputs up to float
    rounding, without the adapter's extra matmuls at every adapted layer, which is most of the adapter's cost when
    generating a token at a time. Prompt learning (its virtual tokens are not weights), several adapters (switched
    at run time) and quantised backbones (merging would round the update into 4/8-bit weights) come back unmerged.
    The backbone is changed in place: keep no other reference to it.

    ```py
    >>> tuned = merged_for_inference(load_adapter(load_backbone("smollm2-135m", task="causal_lm")[0], "out/adapter"))
    ```
    """
    model.eval()
    if not isinstance(model, PeftModel) or len(model.peft_config) != 1 or model.active_peft_config.is_prompt_learning:
        return model
    if getattr(model.get_base_model(), "hf_quantizer", None) is not None:
        return model
    return model.merge_and_unload().eval()
