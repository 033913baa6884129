"""Adapter methods by name, with task- and architecture-aware defaults: `attach(model, "lora")`.

Every PEFT 0.21 tuner that applies without inputs `attach` cannot infer, LoRA's variants as named presets, BitFit
(ours) and full fine-tuning; `catalog.METHOD_TABLE` holds them, `catalog.REFUSED_METHODS` the PEFT methods that
`attach` refuses, with the reason. Target modules come from PEFT's per-architecture tables, completed in
`targets.EXTRA_TARGET_MODULES` where they lack an architecture (DistilBERT, Phi-3, ModernBERT...).

| name | PEFT config | what trains |
|---|---|---|
| `lora` | `LoraConfig` | rank-8 updates of the attention query/value projections |
| `lora_all_linear` | `LoraConfig` | rank-8 updates of every linear layer outside the heads |
| `dora` / `rslora` | `LoraConfig` | LoRA with `use_dora` (magnitude + direction) / `use_rslora` (alpha / sqrt(r)) |
| `pissa` / `olora` | `LoraConfig` | LoRA started from the weights' SVD / QR; saved as a plain LoRA of twice the rank |
| `eva` | `LoraConfig` | LoRA started from the SVD of layer inputs: `attach(..., eva_dataloader=batches)` |
| `loraplus` / `lora_fa` | `LoraConfig` | LoRA trained by LoRA+'s / LoRA-FA's optimiser (`optimizers`) |
| `adalora` | `AdaLoraConfig` | SVD-form LoRA with a moving rank budget (`total_step`, default 1000) |
| `prefix` | `PrefixTuningConfig` | 20 key/value vectors per layer, prepended to attention |
| `prompt` | `PromptTuningConfig` | 20 virtual input embeddings |
| `ptuning` | `PromptEncoderConfig` | 20 virtual embeddings produced by a small MLP encoder |
| `cartridge` | `CartridgeConfig` | a 20-token key/value cache prefix, trained directly |
| `adaption_prompt` | `AdaptionPromptConfig` | gated prompts in the attention of every layer (Llama, Mistral, GPT-2) |
| `ia3` | `IA3Config` | scaling vectors on keys, values and feed-forward activations |
| `bitfit` | `BitFitConfig` (ours) | a delta for every bias term |
| `beft` | `BeftConfig` | the value projections' biases |
| `ln_tuning` | `LNTuningConfig` | the layer norms |
| `osf` | `OSFConfig` | the lower half of every linear weight's singular directions |
| `trainable_tokens` | `TrainableTokensConfig` | the embeddings of `token_indices=[...]` |
| `loha`, `vera`, `boft`, `oft`... (29 in `catalog`) | PEFT's config of that name | its method, sized to the layers |
| `full` | none | every parameter (the plain model is returned) |

Refused everywhere: `xlora`, `poly`, `multitask_prompt_tuning`, `cpt` (inputs `attach` cannot infer). Refused on some
models, with the reason: e.g. `prefix` where the model takes no `past_key_values` (DistilBERT), most tuners on
GPT-2's Conv1D layers (`benchmarks/results/architectures.md` has the whole matrix).

The task head (`classifier` / `score`) of a classification model is always trained and saved with the adapter.
Prompt tuning and P-tuning on a token classifier return logits aligned with the input tokens (see
`prompt_learning.align_token_classification`); PEFT's own classes are left as they are.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from peft import PeftConfig, PeftModel, get_peft_model
from transformers import Conv1D, PreTrainedModel

from ..errors import InputError
from ..tasks import Task, get_task, infer_task
from .catalog import METHOD_TABLE, METHODS, REFUSED_METHODS, Method, Site, default_fields, resolve_targets
from .lora_init import initialise_eva, remember_initial_lora
from .optimizers import freeze_lora_a
from .prompt_learning import (
    PREFIX_CHECKPOINTING_ERROR,
    align_token_classification,
    refuse_gradient_checkpointing,
    uses_gradient_checkpointing,
)
from .targets import inside_head, linear_leaf_names

# The methods the recipes, the benchmarks and the per-task tests compare; the architecture matrix
# (`peftprompt.method_matrix`) checks every method of `METHODS`.
CORE_METHODS = ("lora", "prefix", "prompt", "ptuning", "ia3", "bitfit", "osf", "full")
# One line per method, as the model card and the reports describe it.
METHOD_DESCRIPTIONS: dict[str, str] = {name: method.description for name, method in METHOD_TABLE.items()}
# Prompt-learning methods add virtual tokens or key/value prefixes and change no weight.
PROMPT_LEARNING_METHODS = tuple(name for name, method in METHOD_TABLE.items() if method.is_prompt_learning)
# The adapters that `merge_and_unload` folds into the base weights.
MERGEABLE_METHODS = tuple(name for name, method in METHOD_TABLE.items() if method.mergeable)


def get_method(name: str) -> Method:
    """The `Method` called `name`; a one-line `InputError` for a refused or unknown name."""
    if name in REFUSED_METHODS:
        raise InputError(f"method {name!r} is refused: {REFUSED_METHODS[name]}", field="method")
    if name not in METHOD_TABLE:
        raise InputError(f"unknown adapter method {name!r}; choose one of {', '.join(METHODS)}", field="method")
    return METHOD_TABLE[name]


def method_name(peft_type_or_config: Any) -> str:
    """The `METHODS` name of a PEFT type (``"PROMPT_TUNING"`` -> ``"prompt"``) or of a config (a `PeftConfig` or
    a saved ``adapter_config.json`` as a dict: ``use_dora`` -> ``"dora"``; a full checkpoint's ``config.json`` ->
    ``"full"``); the lower-cased type if it is none of ours."""
    config = peft_type_or_config
    if isinstance(config, PeftConfig):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        config = {"peft_type": str(getattr(config, "value", config))}
    if "peft_type" not in config:  # a full checkpoint's config.json
        return "full"
    # presets with a marker first: a DoRA config is also a LoRA config
    for method in sorted(METHOD_TABLE.values(), key=lambda m: not m.marker):
        if method.peft_type is not None and method.matches(config):
            return method.name
    peft_type = config.get("peft_type")
    return str(getattr(peft_type, "value", peft_type)).lower()


def default_config(model: PreTrainedModel, method: str, task: Optional[str] = None, **overrides: Any) -> PeftConfig:
    """The PEFT config `attach` would use for `method` on `model`, with `overrides` applied."""
    spec = get_method(method)
    if spec.config_cls is None:
        raise InputError("method 'full' has no PEFT config", field="method")
    task_spec = get_task(task or infer_task(model))
    unknown = sorted(set(overrides) - spec.config_fields())
    if unknown:
        fields = ", ".join(map(repr, unknown))
        raise InputError(f"{spec.config_cls.__name__} (method {method!r}) has no field {fields}", field="method_args")
    site = Site(model, resolve_targets(spec, model, overrides))
    task_type = task_spec.peft_task_type.value if task_spec.peft_task_type is not None else None
    return spec.config_cls(task_type=task_type, **{**default_fields(spec, site), **overrides})


def attach(
    model: PreTrainedModel,
    method: str,
    task: Optional[str] = None,
    adapter_name: str = "default",
    **overrides: Any,
) -> Union[PeftModel, PreTrainedModel]:
    """Attach an adapter of `method` to a frozen `model` and return the `PeftModel` (the plain model for ``"full"``).

    The returned model is in the training or evaluation mode that `model` was in. A method that cannot apply to
    `model` (no default target modules for its architecture, a layer type it does not support, an input it needs)
    is refused with a one-line `InputError` saying why; where PEFT found that out while injecting its layers,
    `model` may be half-adapted: load it again before trying another method.

    Args:
        model (`PreTrainedModel`): The backbone, e.g. from `load_backbone`.
        method (`str`): One of `METHODS`: ``lora``, ``dora``, ``prefix``, ``prompt``, ``ia3``, ``bitfit``,
            ``vera``, ``full``...
        task (`str`, *optional*): A task of `peftprompt.tasks.TASKS` (``seq_cls``, ``token_cls``, ``causal_lm``,
            ``feature``); inferred from the model class when omitted.
        adapter_name (`str`): Name of the adapter inside the `PeftModel`.
        overrides: Fields of the PEFT config to change, e.g. ``r=16`` or ``target_modules=["query"]``; the
            arguments of an optimiser recipe (``loraplus_lr_ratio``, read by `optimizers.method_optimizer`); and
            ``eva_dataloader`` for ``eva``.

    Example:
        ```py
        >>> model, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=2)
        >>> model = attach(model, "bitfit")
        >>> model.print_trainable_parameters()
        ```
    """
    spec = get_method(method)
    if spec.config_cls is None:
        if overrides:
            raise InputError(f"method 'full' takes no config overrides, got {sorted(overrides)}", field="method_args")
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model
    task_spec = get_task(task or infer_task(model))
    inputs = {k: overrides.pop(k) for k in list(overrides) if k in spec.needs and k not in spec.config_fields()}
    for name in spec.optimizer_args:
        overrides.pop(name, None)
    reason = spec.unsupported(model, task_spec)
    if reason:
        raise InputError(f"method {method!r} cannot apply to {type(model).__name__}: {reason}", field="method")
    missing = [name for name in spec.needs if name not in inputs and name not in overrides]
    if missing:
        raise InputError(f"method {method!r} needs {missing[0]}=...: {spec.needs[missing[0]]}", field=missing[0])
    config = default_config(model, method, task_spec.name, **overrides)
    was_training = model.training
    if config.peft_type == "PREFIX_TUNING" and uses_gradient_checkpointing(model):
        raise ValueError(PREFIX_CHECKPOINTING_ERROR)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    except (ValueError, TypeError, NotImplementedError, AttributeError, KeyError, RuntimeError) as err:
        raise _refusal(method, model, config, err) from err
    if config.peft_type == "PREFIX_TUNING":
        refuse_gradient_checkpointing(peft_model)
    _after_attach(spec, peft_model, task_spec, adapter_name, inputs)
    if not _trains_outside_heads(peft_model):
        raise InputError(f"method {method!r} adapted no layer of {type(model).__name__}{_conv1d_hint(model, method)}",
                         field="method")
    # Prompt / P-tuning token classifiers: logits aligned with the input tokens, for this model only.
    align_token_classification(peft_model)
    # New adapter layers are created in training mode; keep the whole model in the mode the backbone was in.
    return peft_model.train(was_training)


def _after_attach(spec: Method, model: PeftModel, task: Task, adapter_name: str, inputs: dict[str, Any]) -> None:
    """What a preset does beyond its config: EVA's initialisation, PiSSA's / OLoRA's initial weights, LoRA-FA's
    frozen ``A``."""
    if spec.name == "eva":
        initialise_eva(model, inputs["eva_dataloader"], task, adapter_name)
    elif spec.name in ("pissa", "olora"):
        remember_initial_lora(model, adapter_name)
    elif spec.name == "lora_fa":
        freeze_lora_a(model)


def _trains_outside_heads(model: PeftModel) -> bool:
    """Whether some trainable parameter of `model` lies outside the task heads (which train with every adapter)."""
    return any(p.requires_grad and not inside_head(n) for n, p in model.named_parameters())


def _conv1d_hint(model: PreTrainedModel, method: str) -> str:
    if any(isinstance(m, Conv1D) for m in model.modules()):
        return f": its linear layers are transformers Conv1D layers, which {method} does not adapt"
    return ""


# Fragments of PEFT's errors for target modules that match nothing.
TARGET_MISMATCH_HINTS = ("not found in the base model", "specify `target_modules`", "No modules were targeted")


def _refusal(method: str, model: PreTrainedModel, config: PeftConfig, err: Exception) -> InputError:
    """One line that says why PEFT could not build `method` on `model`."""
    text = str(err).strip()
    targets = getattr(config, "target_modules", None)
    if any(hint in text for hint in TARGET_MISMATCH_HINTS):
        layers = ", ".join(linear_leaf_names(model)[:12])
        if targets is None:
            return InputError(f"{method}: no default target modules for model type {model.config.model_type!r}; "
                              f"pass target_modules=[...] naming some of its layers (linear layers: {layers})",
                              field="target_modules")
        return InputError(f"{method}: target_modules={targets!r} matches no module of {type(model).__name__}; pass "
                          f"target_modules=[...] naming some of its layers (linear layers: {layers})",
                          field="target_modules")
    first = text.splitlines()[0] if text else type(err).__name__
    if len(first) > 240:  # PEFT's long messages: their first sentence
        end = first.find(". ")
        first = first[: end + 1] if 0 < end < 240 else first[:240] + "..."
    return InputError(f"method {method!r} cannot apply to {type(model).__name__}: {first}", field="method")


__all__ = [
    "CORE_METHODS",
    "MERGEABLE_METHODS",
    "METHODS",
    "METHOD_DESCRIPTIONS",
    "PROMPT_LEARNING_METHODS",
    "REFUSED_METHODS",
    "attach",
    "default_config",
    "get_method",
    "infer_task",
    "method_name",
]
