"""Training configuration: one pydantic model, read from YAML plus ``key=value`` overrides, with precise errors.

```py
>>> config = load_config("recipes/configs/minilm/sst2_lora.yaml", ["learning_rate=5e-4", "method_args.r=16"])
>>> config.data.eval_min_words  # the recipe's typed data section (peftprompt.training.data_config)
>>> config.to_yaml()          # saved next to the results as train_config.yaml
```

`TrainConfig` is a pydantic model (`peftprompt.training.validation` says why pydantic); its ``data`` mapping becomes
the typed section of its recipe (`peftprompt.training.data_config`), validated with the rest, once.
Every error is a `peftprompt.errors.InputError` (a `ValueError`) that names the field and where its value came
from: ``file:line`` for a YAML key, nested keys and list items included (lines from the YAML node marks), or the
override as written; its ``file``, ``line`` and ``field`` (``data.max_depth``) attributes say the same. Unknown keys
get the closest known key as a hint. Values are checked by the field's type: an int is fine for a float field, and
so is a string such as ``"1e-4"`` (YAML 1.1, which PyYAML implements, reads ``1e-4`` without a dot as a string).

`resolve_mixed_precision` picks the precision the hardware does well: on CUDA bf16 where supported, else fp16; on
the CPU bf16 only with native bf16 instructions (``avx512_bf16`` / ``amx_bf16`` in ``/proc/cpuinfo``): without
them bf16 autocast was measured about 18x slower than fp32. With them it pays: on this
project's current 2-core host (AMD EPYC, ``avx512_bf16``, no AMX) a MiniLM LoRA step (batch 16 x 64, one thread)
took 0.89 s in bf16 against 1.59 s in fp32, and a small Llama LoRA step was 1.5-2.5x faster. So ``auto`` means bf16
on that host, and runs there differ numerically from fp32 runs; pass ``mixed_precision: "no"`` to compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationInfo, field_validator, model_validator

from ..errors import InputError, InputFileNotFoundError
from ..methods import METHODS
from ..metrics import metric_script
from ..tasks import TRAINABLE_TASKS, get_task
from .data_config import DataSection, data_section
from .validation import Bool, ConfigModel, FieldError, Float, Int, Names, UnknownKeyError, one_of, suggest

TASKS = TRAINABLE_TASKS  # the tasks the engine trains (`peftprompt.tasks`; ``feature`` has no labels)
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16", "auto")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_NO_BF16_REASON = "CPU without native bf16: bf16 autocast measured ~18x slower here"

CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "method": tuple(METHODS),
    "mixed_precision": MIXED_PRECISION_CHOICES,
    "optimizer": OPTIMIZERS,
    "lr_scheduler": LR_SCHEDULERS,
    "frozen_dtype": ("float32", "bfloat16", "float16", "auto"),
}
MAPPING_FIELDS = ("method_args", "data")
"""The fields a dotted override key sets an entry inside (``method_args.r=16``)."""


def _yaml_no(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads an unquoted `no` as false: ``mixed_precision: no`` means "no"."""
    return "no" if value is False else value


Task = one_of(CHOICES["task"])
Method = one_of(CHOICES["method"])
MixedPrecision = Annotated[one_of(MIXED_PRECISION_CHOICES), BeforeValidator(_yaml_no)]
Optimizer = one_of(OPTIMIZERS)
LrScheduler = one_of(LR_SCHEDULERS)
FrozenDtype = one_of(CHOICES["frozen_dtype"])


class TrainConfig(ConfigModel):
    """Everything a training run needs besides the data pipeline (which the recipes build from `data`).

    Steps are optimiser steps (one per `gradient_accumulation_steps` micro-batches). `max_steps` wins over
    `num_epochs`. Evaluation runs every `eval_every` steps (0: at the end of each epoch) and always at the end.
    `metric_for_best` names a key of the evaluation metrics (``"accuracy"``, ``"loss"``, ...; an ``eval_`` prefix
    is ignored); when it is None the best evaluation is the lowest eval loss. Early stopping stops after
    `early_stopping_patience` evaluations without a strict improvement. Checkpoints are written every
    `save_every` steps (0: at each evaluation) and at the end, the newest `keep_checkpoints` kept (0 keeps all);
    `max_grad_norm` None: no clipping. `resume_from` is None, ``"latest"`` (the newest complete checkpoint in
    ``output_dir/checkpoints``; a fresh start when there is none) or a checkpoint directory.

    Built from keywords (``TrainConfig(task="causal_lm", max_steps=10)``) or by `load_config`; a bad value raises
    `InputError` (a `FieldError` naming the field). `data` takes a mapping, which becomes the task's data section.
    """

    # what to train
    model: str = "minilm"
    task: Task = "seq_cls"
    num_labels: Int | None = Field(None, ge=1)
    method: Method = "lora"
    method_args: dict[str, Any] = Field(default_factory=dict)
    # a saved adapter directory to continue training from (its own config; the method must be the same); null: a
    # fresh adapter from method / method_args
    init_adapter: str | None = None
    load_in_8bit: Bool = False
    load_in_4bit: Bool = False
    gradient_checkpointing: Bool = False
    # the frozen backbone weights' dtype (adapters train in float32 whatever it is); auto: the mixed-precision dtype
    frozen_dtype: FrozenDtype = "float32"
    # data: the recipe's typed section (peftprompt.training.data_config), picked by task and data.strategy
    data: SerializeAsAny[DataSection] = Field(default_factory=dict, validate_default=True)
    max_length: Int = Field(128, ge=2)
    max_train_samples: Int | None = Field(None, ge=1)
    max_eval_samples: Int | None = Field(None, ge=1)
    # optimisation
    optimizer: Optimizer = "adamw"
    learning_rate: Float = Field(1e-4, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    lr_scheduler: LrScheduler = "linear"
    warmup_ratio: Float = Field(0.06, ge=0, lt=1)
    per_device_train_batch_size: Int = Field(16, ge=1)
    per_device_eval_batch_size: Int = Field(64, ge=1)
    # batches of examples of similar length (less padding; tokenised examples only), as Trainer's group_by_length
    group_by_length: Bool = False
    gradient_accumulation_steps: Int = Field(1, ge=1)
    max_steps: Int | None = Field(None, ge=1)
    num_epochs: Float = Field(1.0, gt=0)
    max_grad_norm: Float | None = Field(1.0, gt=0)
    mixed_precision: MixedPrecision = "auto"
    # shard the model over the processes with torch's fully_shard (FSDP2) instead of DDP: for CPU processes, where
    # Accelerate's FSDP plugin does not apply (peftprompt.training.sharding); fp32, no evaluate_fn
    fully_shard: Bool = False
    seed: Int = 0
    # evaluation, checkpoints, logging
    eval_every: Int = Field(0, ge=0)
    # evaluate modules the recipe scores its evaluations with: packaged names (accuracy, seqeval, squad) or paths to
    # your own module (a .py file or a folder holding <folder name>.py); null: the recipe's default
    metrics: Names | None = Field(None, min_length=1)
    metric_for_best: str | None = None
    greater_is_better: Bool = True
    early_stopping_patience: Int | None = Field(None, ge=1)
    save_every: Int = Field(0, ge=0)
    keep_checkpoints: Int = Field(2, ge=0)
    resume_from: str | None = None
    log_every: Int = Field(10, ge=1)
    output_dir: str = "outputs/run"

    @field_validator("data", mode="before")
    @classmethod
    def _data_section(cls, value: Any, info: ValidationInfo) -> Any:
        """A mapping (or another section, as a mapping) becomes the section `data_section` picks, validated."""
        if isinstance(value, DataSection):
            value = value.model_dump()
        if not isinstance(value, Mapping):
            return value  # pydantic refuses it: "field 'data' expects a mapping"
        if "task" not in info.data:
            return DataSection()  # the task is wrong, and that error is the one reported
        value = {str(key): item for key, item in value.items()}
        return data_section(info.data["task"], value)(**value)

    @field_validator("metrics")
    @classmethod
    def _metric_modules(cls, names: list[str] | None) -> list[str] | None:
        for name in names or ():
            metric_script(name)  # a ValueError naming the module that is neither packaged nor found
        return names

    @model_validator(mode="after")
    def _fields_agree(self) -> TrainConfig:
        problem = cross_field_problem(self) or self.data.config_problem(self)
        if problem is not None:
            raise problem
        return self

    def as_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON-serialisable data (``data`` with every key of its section)."""
        return self.model_dump()

    def to_yaml(self) -> str:
        """The config as YAML, in field order; `load_config` reads it back to an equal config."""
        return yaml.safe_dump(self.as_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` (``config.replace(output_dir=...)``), validated like any config."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})


def cross_field_problem(config: TrainConfig) -> InputError | None:
    """An inconsistent combination of top-level fields, as an `InputError` naming the field to change; or None."""
    if get_task(config.task).classification and config.num_labels is None:
        return InputError(
            f"num_labels is required for task {config.task!r} (the size of the classification head): "
            "set num_labels: N in the config or pass num_labels=N",
            field="num_labels",
        )
    if config.load_in_8bit and config.load_in_4bit:
        return InputError("load_in_8bit and load_in_4bit are exclusive: choose one", field="load_in_4bit")
    if config.init_adapter and config.method == "full":
        return InputError(
            "init_adapter continues a saved adapter, but method 'full' trains the whole model: choose its method",
            field="init_adapter",
        )
    if config.frozen_dtype in ("bfloat16", "float16") and config.method == "full":
        return InputError(
            f"frozen_dtype {config.frozen_dtype!r} needs a frozen backbone, but method 'full' trains every weight: "
            "keep frozen_dtype: float32 and use mixed_precision for half-precision compute",
            field="frozen_dtype",
        )
    if config.frozen_dtype in ("bfloat16", "float16") and (config.load_in_8bit or config.load_in_4bit):
        return InputError(
            f"frozen_dtype {config.frozen_dtype!r} is for unquantised backbones; a quantised one already stores its "
            "linear weights in 8 or 4 bits: keep frozen_dtype: float32",
            field="frozen_dtype",
        )
    return None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a `TrainConfig` from a YAML mapping at `path` (or the defaults when None), then apply `overrides`.

    Args:
        path: A YAML file whose top level is a mapping of `TrainConfig` fields, or None.
        overrides: ``key=value`` strings applied in order; the value is parsed with ``yaml.safe_load``
            (``lr=1e-4``, ``data.sources=[musique, probtree_2wiki]``). A dotted key sets an entry inside a
            mapping field (``method_args.r=16``, ``data.packing=true``).

    Raises:
        InputError: unknown key (with the closest known key), wrong type, bad choice or range, missing
            ``num_labels`` for a classification task, a data section that does not go with the rest; each message
            names the field and the file and line or the override.
        InputFileNotFoundError: `path` does not exist.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputFileNotFoundError(f"config file {path} does not exist", file=path)
        values, where = _read_yaml(path)
    for override in overrides:
        _apply_override(values, where, override)
    try:
        return TrainConfig(**values)
    except FieldError as err:
        raise _located(err, where, path) from None


def _located(err: FieldError, where: dict[str, str], path: Path | None) -> InputError:
    """`err` with where its field was set: the YAML ``file:line`` or the override; the file for a problem of
    several fields that names none the config sets."""
    place = _place(where, err.field)
    if place is None:
        return InputError(f"{err.message} ({path})" if path is not None else err.message, file=path, field=err.field)
    if place.startswith("override "):
        message = f"{place}: unknown key{err.hint}" if isinstance(err, UnknownKeyError) else f"{err.message} ({place})"
        return InputError(message, field=err.field)
    file, _, line = place.rpartition(":")
    message = err.message if isinstance(err, UnknownKeyError) else f"{err.message} ({place})"
    return InputError(message, file=file, line=int(line), field=err.field)


def _place(where: dict[str, str], field: str | None) -> str | None:
    """Where `field` (``data.tasks.1``) was set: its own entry, else its closest parent's, else its first child's."""
    if field is None:
        return None
    parts = field.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in where:
            return where[".".join(parts[:end])]
    return next((place for key, place in where.items() if key.startswith(f"{field}.")), None)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The mapping at `path` and where each of its keys and list items is (``{"data.tasks.1": "run.yaml:9"}``)."""
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(
            f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})",
            file=path,
            line=mark.line + 1 if mark is not None else None,
        ) from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        raise InputError(
            "expected a mapping of config keys at the top level", file=path, line=node.start_mark.line + 1
        )
    where: dict[str, str] = {}
    _mark(node, "", path, where)
    return {str(key): value for key, value in data.items()}, where


def _mark(node: yaml.Node, prefix: str, path: Path, where: dict[str, str]) -> None:
    """Record the line of every key and list item under `node` as ``where[<dotted path>]``; refuse a key written
    twice in one mapping (PyYAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        children = [(key_node.value, key_node, value_node) for key_node, value_node in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [(str(i), item, item) for i, item in enumerate(node.value)]
    else:
        return
    for name, marked, child in children:
        key, line = f"{prefix}{name}", marked.start_mark.line + 1
        if key in where:
            raise InputError(f"duplicate key {key!r} (first at {where[key]})", file=path, line=line, field=key)
        where[key] = f"{path}:{line}"
        _mark(child, f"{key}.", path, where)


def _apply_override(values: dict[str, Any], where: dict[str, str], override: str) -> None:
    if "=" not in override:
        raise InputError(f"override {override!r}: expected key=value (e.g. learning_rate=1e-4)")
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    name = parts[0]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise InputError(
            f"override {override!r}: cannot parse the value ({getattr(err, 'problem', err)})", field=name
        ) from None
    place = f"override {override!r}"
    if len(parts) > 1 and name in TrainConfig.model_fields and name not in MAPPING_FIELDS:
        raise InputError(f"override {override!r}: {name!r} is not a mapping, so {key!r} cannot be set", field=name)
    target = values
    for depth, part in enumerate(parts[:-1], start=1):
        inner = target.get(part)
        if not isinstance(inner, dict):  # what was there (if anything) is replaced: the override sets it now
            _forget(where, ".".join(parts[:depth]))
            where[".".join(parts[:depth])] = place
        target[part] = dict(inner) if isinstance(inner, dict) else {}
        target = target[part]
    target[parts[-1]] = value
    _forget(where, key)
    where[key] = place


def _forget(where: dict[str, str], key: str) -> None:
    """Drop where `key` and everything under it were set (a value set again replaces them all)."""
    for known in [k for k in where if k == key or k.startswith(f"{key}.")]:
        del where[known]


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The native-bf16 CPU flags present (``amx_bf16``, ``avx512_bf16``); empty where /proc/cpuinfo is absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return flags & set(CPU_BF16_FLAGS)


def resolve_frozen_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the frozen backbone is loaded in: ``frozen_dtype``, where ``auto`` means the compute dtype of the
    mixed precision `resolve_mixed_precision` picks (bf16 / fp16), or float32 when that is ``no``, when every weight
    trains (method ``full``) or when the backbone is quantised."""
    if config.frozen_dtype != "auto":
        return getattr(torch, config.frozen_dtype)
    if config.method == "full" or config.load_in_8bit or config.load_in_4bit:
        return torch.float32
    mixed_precision = resolve_mixed_precision(config.mixed_precision)[0]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def resolve_mixed_precision(requested: str) -> tuple[str, str]:
    """The mixed precision to use for `requested` (``no``, ``fp16``, ``bf16``, ``auto``) on this machine, and why.

    ``auto``: CUDA -> bf16 where `torch.cuda.is_bf16_supported()`, else fp16; CPU -> bf16 only with native bf16
    instructions, else ``no``. ``fp16`` on the CPU is refused (`InputError`): accelerate would run it through a
    gradient scaler on top of CPU fp16 kernels, which are slow and lose range for no gain; use bf16 or no.
    ``bf16`` on a CPU without native bf16 is honoured, with the expected slow-down as the reason.
    """
    if requested not in MIXED_PRECISION_CHOICES:
        raise InputError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {requested!r}"
            f"{suggest(requested, MIXED_PRECISION_CHOICES)}",
            field="mixed_precision",
        )
    if requested == "no":
        return "no", "mixed precision off (requested)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", f"CUDA GPU {name} supports bf16") if bf16 else ("fp16", f"CUDA GPU {name} has no bf16")
        if requested == "bf16" and not bf16:
            raise InputError(
                f"mixed_precision 'bf16' requested but CUDA GPU {name} does not support it: use fp16",
                field="mixed_precision",
            )
        return requested, f"requested, on CUDA GPU {name}"
    flags = cpu_bf16_flags()
    if requested == "fp16":
        raise InputError(
            "mixed_precision 'fp16' needs a CUDA GPU; on the CPU use 'bf16' (fast with avx512_bf16/amx_bf16) or 'no'",
            field="mixed_precision",
        )
    if requested == "auto":
        if flags:
            return "bf16", f"CPU with native bf16 ({', '.join(sorted(flags))})"
        return "no", CPU_NO_BF16_REASON
    if flags:
        return "bf16", f"requested; CPU with native bf16 ({', '.join(sorted(flags))})"
    return "bf16", f"requested, but {CPU_NO_BF16_REASON}: expect a much slower run"
