"""Save adapters atomically and load them back with clear errors for broken directories.

An adapter directory holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``; a full fine-tune
(method ``"full"``) is a transformers checkpoint (``config.json`` and ``model.safetensors``, or its shards and
their index). Both go through `save_adapter`, `check_adapter_dir` and `load_adapter` alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftModel
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .atomic import write_dir_atomically
from .errors import InputError, InputFileNotFoundError
from .methods import MERGEABLE_METHODS, method_name
from .methods.lora_init import save_as_plain_lora
from .methods.prompt_learning import align_token_classification

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# what a full checkpoint (method "full") holds instead
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_WEIGHTS_INDEX = "model.safetensors.index.json"


def save_adapter(
    model: Union[PeftModel, PreTrainedModel],
    output_dir: Union[str, Path],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Save `model` to `output_dir` as safetensors, replacing any previous save only once the new one is complete.

    A `PeftModel` saves its adapter weights, config and trained head (``adapter_model.safetensors``); a plain model
    (method ``"full"``) saves the full checkpoint. A PiSSA or OLoRA adapter, which moved part of the base weights
    into itself, is saved as the plain LoRA adapter it amounts to on the unchanged base model
    (`peftprompt.methods.lora_init`). The files are written to a temporary directory next to `output_dir` and
    renamed into place, so an interrupted save never leaves a half-written adapter behind.
    """
    output_dir = Path(output_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(model, PeftModel):
            save_as_plain_lora(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_dir_atomically(output_dir, write)
    return output_dir


def directory_bytes(path: Union[str, Path], pattern: str = "*.safetensors") -> int:
    """Total size in bytes of the files matching `pattern` in `path` (the weights of a saved adapter)."""
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def is_full_checkpoint(adapter_dir: Union[str, Path]) -> bool:
    """Whether `adapter_dir` holds a full model checkpoint (method ``"full"``) rather than a PEFT adapter."""
    adapter_dir = Path(adapter_dir)
    return not (adapter_dir / ADAPTER_CONFIG).is_file() and (adapter_dir / MODEL_CONFIG).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg})", file=path, line=err.lineno) from err


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():
                weights.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path} is corrupt or truncated ({err})", file=path) from err


def full_checkpoint_files(adapter_dir: Path) -> list[Path]:
    """The weight files of a full checkpoint: ``model.safetensors``, or the shards its index names."""
    index = adapter_dir / MODEL_WEIGHTS_INDEX
    if index.is_file():
        return [adapter_dir / name for name in sorted(set(_read_json(index).get("weight_map", {}).values()))]
    return [adapter_dir / MODEL_WEIGHTS]


def check_adapter_dir(adapter_dir: Union[str, Path]) -> dict:
    """Validate a saved adapter directory and return its config, raising a clear error for what is wrong.

    For a full checkpoint (method ``"full"``) the config is the model's ``config.json``, which has no
    ``peft_type``.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputFileNotFoundError(f"adapter directory {adapter_dir} does not exist", file=adapter_dir)
    if is_full_checkpoint(adapter_dir):
        config = _read_json(adapter_dir / MODEL_CONFIG)
        for weights_path in full_checkpoint_files(adapter_dir):
            if not weights_path.is_file():
                raise InputFileNotFoundError(f"{adapter_dir} is not a complete checkpoint: {weights_path.name} is "
                                             "missing", file=adapter_dir)
            _check_safetensors(weights_path)
        return config
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InputFileNotFoundError(f"{adapter_dir} is not a saved adapter: {ADAPTER_CONFIG} is missing",
                                     file=adapter_dir)
    config = _read_json(config_path)
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
    _check_safetensors(weights_path)
    return config


def load_adapter(
    model: PreTrainedModel,
    adapter_dir: Union[str, Path],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> Union[PeftModel, PreTrainedModel]:
    """Load a saved adapter onto `model` after checking that the directory is complete and readable.

    As with `peftprompt.attach`, a prompt-tuned or P-tuned token classifier returns logits aligned with the input
    tokens (`peftprompt.methods.prompt_learning.align_token_classification`); plain `PeftModel.from_pretrained`
    does not. A full checkpoint (method ``"full"``) is loaded into `model` itself, which is returned, its
    parameters trainable if `is_trainable`.
    """
    config = check_adapter_dir(adapter_dir)
    if is_full_checkpoint(adapter_dir):
        return _load_full_checkpoint(model, Path(adapter_dir), config, is_trainable)
    peft_model = PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable
    )
    return align_token_classification(peft_model)


def _load_full_checkpoint(model: PreTrainedModel, adapter_dir: Path, config: dict, is_trainable: bool):
    model_type = getattr(model.config, "model_type", None)
    if config.get("model_type") != model_type:
        raise InputError(f"{adapter_dir} is a full checkpoint of a {config.get('model_type')!r} model, not of "
                         f"{model_type!r}", file=adapter_dir / MODEL_CONFIG, field="model_type")
    # transformers' loader knows the checkpoint's layout (shards, tied weights, renamed legacy keys)
    saved = type(model).from_pretrained(adapter_dir, dtype=model.dtype)
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as err:  # e.g. a head of another num_labels
        reason = str(err).strip().splitlines()[-1].strip()
        raise InputError(f"{adapter_dir} does not fit {type(model).__name__}: {reason}", file=adapter_dir) from err
    model.requires_grad_(is_trainable)
    return model


def merged_for_inference(model: Union[PeftModel, PreTrainedModel]) -> PreTrainedModel:
    """`model` in eval mode, with its adapter folded into the backbone's weights when that gives the same model.

    A `PeftModel` holding one adapter of a method that merges (`MERGEABLE_METHODS`: LoRA, IA3, BitFit...) on a
    backbone that is not
    quantised comes back as the plain backbone after PEFT's ``merge_and_unload()`` (`merge_adapter`): the same
    outputs up to float rounding, without the adapter's extra matmuls at every adapted layer, which is most of the
    adapter's cost when generating a token at a time. Methods that do not merge (prompt learning, whose virtual
    tokens are not weights; adaption prompts...), several adapters (switched at run time) and quantised backbones
    (merging would round the update into 4/8-bit weights) come back unmerged.
    The backbone is changed in place: keep no other reference to it.

    ```py
    >>> tuned = merged_for_inference(load_adapter(load_backbone("smollm2-135m", task="causal_lm")[0], "out/adapter"))
    ```
    """
    model.eval()
    if not isinstance(model, PeftModel) or len(model.peft_config) != 1:
        return model
    if method_name(model.active_peft_config) not in MERGEABLE_METHODS:
        return model
    if getattr(model.get_base_model(), "hf_quantizer", None) is not None:
        return model
    return merge_adapter(model).eval()


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """PEFT's ``merge_and_unload()``, for heads of every shape.

    The trained copy of each task head (PEFT's ``modules_to_save``) is put in place first: PEFT's generic unloading
    (every method but LoRA) copies the head's ``weight`` across, which a head module such as RoBERTa's or ELECTRA's
    ``classifier`` (dense + out_proj) does not have.
    """
    for name, module in list(model.base_model.model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = model.base_model.model.get_submodule(parent_name)
            setattr(parent, child, module.modules_to_save[module.active_adapters[0]])
    return model.merge_and_unload()
