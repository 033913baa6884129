"""Training configuration: one dataclass, read from YAML plus ``key=value`` overrides, with precise errors.

```py
>>> config = load_config("recipes/configs/minilm/sst2_lora.yaml", ["learning_rate=5e-4", "method_args.r=16"])
>>> config.to_yaml()          # saved next to the results as train_config.yaml
```

Every error is a `peftprompt.errors.InputError` (a `ValueError`) that names the field and where its value came
from: ``file:line`` for a YAML key (lines from the YAML node marks) or the override as written; its ``file``,
``line`` and ``field`` attributes say the same. Unknown keys get the closest known key as a hint.
Values are checked by the field's type: an int is fine for a float field, and so is a string such as ``"1e-4"``
(YAML 1.1, which PyYAML implements, reads ``1e-4`` without a dot as a string).

`resolve_mixed_precision` picks the precision the hardware does well: on CUDA bf16 where supported, else fp16; on
the CPU bf16 only with native bf16 instructions (``avx512_bf16`` / ``amx_bf16`` in ``/proc/cpuinfo``): without
them bf16 autocast was measured about 18x slower than fp32. With them it pays: on this
project's current 2-core host (AMD EPYC, ``avx512_bf16``, no AMX) a MiniLM LoRA step (batch 16 x 64, one thread)
took 0.89 s in bf16 against 1.59 s in fp32, and a small Llama LoRA step was 1.5-2.5x faster. So ``auto`` means bf16
on that host, and runs there differ numerically from fp32 runs; pass ``mixed_precision: "no"`` to compare.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import yaml

from ..errors import InputError, InputFileNotFoundError
from ..metrics import metric_script
from ..methods import METHODS
from ..tasks import TRAINABLE_TASKS, get_task

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

# name -> (predicate, wording of the constraint); None values of optional fields are not checked.
RANGES: dict[str, tuple[Any, str]] = {
    "num_labels": (lambda v: v >= 1, ">= 1"),
    "max_length": (lambda v: v >= 2, ">= 2"),
    "max_train_samples": (lambda v: v >= 1, ">= 1"),
    "max_eval_samples": (lambda v: v >= 1, ">= 1"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "num_epochs": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v > 0, "> 0 (or null for no clipping)"),
    "eval_every": (lambda v: v >= 0, ">= 0"),
    "early_stopping_patience": (lambda v: v >= 1, ">= 1"),
    "save_every": (lambda v: v >= 0, ">= 0"),
    "keep_checkpoints": (lambda v: v >= 0, ">= 0 (0 keeps every checkpoint)"),
    "log_every": (lambda v: v >= 1, ">= 1"),
}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data pipeline (which the recipes build from `data`).

    Steps are optimiser steps (one per `gradient_accumulation_steps` micro-batches). `max_steps` wins over
    `num_epochs`. Evaluation runs every `eval_every` steps (0: at the end of each epoch) and always at the end.
    `metric_for_best` names a key of the evaluation metrics (``"accuracy"``, ``"loss"``, ...; an ``eval_`` prefix
    is ignored); when it is None the best evaluation is the lowest eval loss. Early stopping stops after
    `early_stopping_patience` evaluations without a strict improvement. Checkpoints are written every
    `save_every` steps (0: at each evaluation) and at the end, the newest `keep_checkpoints` kept (0 keeps all).
    `resume_from` is None, ``"latest"`` (the newest complete checkpoint in ``output_dir/checkpoints``; a fresh
    start when there is none) or a checkpoint directory.
    """

    # what to train
    model: str = "minilm"
    task: str = "seq_cls"
    num_labels: Optional[int] = None
    method: str = "lora"
    method_args: dict = field(default_factory=dict)
    # a saved adapter directory to continue training from (its own config; the method must be the same); null: a
    # fresh adapter from method / method_args
    init_adapter: Optional[str] = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    # the frozen backbone weights' dtype (adapters train in float32 whatever it is); auto: the mixed-precision dtype
    frozen_dtype: str = "float32"
    # data (recipes interpret these)
    data: dict = field(default_factory=dict)
    max_length: int = 128
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.06
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 64
    # batches of examples of similar length (less padding; tokenised examples only), as Trainer's group_by_length
    group_by_length: bool = False
    gradient_accumulation_steps: int = 1
    max_steps: Optional[int] = None
    num_epochs: float = 1.0
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "auto"
    # shard the model over the processes with torch's fully_shard (FSDP2) instead of DDP: for CPU processes, where
    # Accelerate's FSDP plugin does not apply (peftprompt.training.sharding); fp32, no evaluate_fn
    fully_shard: bool = False
    seed: int = 0
    # evaluation, checkpoints, logging
    eval_every: int = 0
    # evaluate modules the recipe scores its evaluations with: packaged names (accuracy, seqeval, squad) or paths to
    # your own module (a .py file or a folder holding <folder name>.py); null: the recipe's default
    metrics: Optional[list[str]] = None
    metric_for_best: Optional[str] = None
    greater_is_better: bool = True
    early_stopping_patience: Optional[int] = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume_from: Optional[str] = None
    log_every: int = 10
    output_dir: str = "outputs/run"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
            except FieldError as err:
                raise InputError(str(err), field=f.name) from None
        problem = cross_field_problem(self)
        if problem:
            raise InputError(problem)

    def as_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON-serialisable data."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML, in field order; `load_config` reads it back to an equal config."""
        return yaml.safe_dump(self.as_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPE_HINTS = typing.get_type_hints(TrainConfig)


class FieldError(InputError):
    """A field's value is wrong; the message has no location yet (the caller adds file:line or the override)."""


def _base_type(name: str) -> tuple[type, bool]:
    """The field's type and whether it is optional (``Optional[int]`` -> ``(int, True)``)."""
    hint = _TYPE_HINTS[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_field(name: str, value: Any) -> Any:
    """Return `value` converted to field `name`'s type, or raise `FieldError` saying what is wrong."""
    kind, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise FieldError(f"field {name!r} expects {kind.__name__}, got null")
    expected = kind.__name__ + (" or null" if optional else "")
    if kind is bool:
        if not isinstance(value, bool):
            raise FieldError(f"field {name!r} expects {expected}, got {value!r}")
    elif kind is int:
        converted = _as_int(value)
        if converted is None:
            raise FieldError(f"field {name!r} expects {expected}, got {value!r}")
        value = converted
    elif kind is float:
        converted = _as_float(value)
        if converted is None:
            raise FieldError(f"field {name!r} expects {expected}, got {value!r}")
        value = converted
    elif kind is str:
        if value is False and "no" in CHOICES.get(name, ()):
            value = "no"  # YAML 1.1 (PyYAML) reads an unquoted `no` as false: `mixed_precision: no` means "no"
        if not isinstance(value, str):
            raise FieldError(f"field {name!r} expects {expected}, got {value!r}")
    elif kind is dict:
        if not isinstance(value, dict):
            raise FieldError(f"field {name!r} expects a mapping, got {value!r}")
        value = dict(value)
    elif typing.get_origin(kind) is list:
        value = [value] if isinstance(value, str) else value  # `metrics: accuracy` means [accuracy]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise FieldError(f"field {name!r} expects a non-empty list of strings{' or null' if optional else ''}, "
                             f"got {value!r}")
    if name == "metrics":
        for entry in value:
            try:
                metric_script(entry)
            except ValueError as err:
                raise FieldError(f"field 'metrics': {err}") from None
    if name in CHOICES and value not in CHOICES[name]:
        raise FieldError(
            f"field {name!r} must be one of {', '.join(CHOICES[name])}, got {value!r}{_suggest(value, CHOICES[name])}"
        )
    if name in RANGES:
        ok, wording = RANGES[name]
        if not ok(value):
            raise FieldError(f"field {name!r} must be {wording}, got {value!r}")
    return value


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        number = _as_float(value)
        if number is not None and number.is_integer():
            return int(number)
    return None


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def cross_field_problem(config: TrainConfig) -> Optional[str]:
    """A message for an inconsistent combination of fields, or None."""
    if get_task(config.task).classification and config.num_labels is None:
        return (
            f"num_labels is required for task {config.task!r} (the size of the classification head): "
            "set num_labels: N in the config or pass num_labels=N"
        )
    if config.load_in_8bit and config.load_in_4bit:
        return "load_in_8bit and load_in_4bit are exclusive: choose one"
    if config.init_adapter and config.method == "full":
        return "init_adapter continues a saved adapter, but method 'full' trains the whole model: choose its method"
    if config.frozen_dtype in ("bfloat16", "float16") and config.method == "full":
        return (
            f"frozen_dtype {config.frozen_dtype!r} needs a frozen backbone, but method 'full' trains every weight: "
            "keep frozen_dtype: float32 and use mixed_precision for half-precision compute"
        )
    if config.frozen_dtype in ("bfloat16", "float16") and (config.load_in_8bit or config.load_in_4bit):
        return (
            f"frozen_dtype {config.frozen_dtype!r} is for unquantised backbones; a quantised one already stores its "
            "linear weights in 8 or 4 bits: keep frozen_dtype: float32"
        )
    return None


def load_config(path: Union[str, Path, None], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a `TrainConfig` from a YAML mapping at `path` (or the defaults when None), then apply `overrides`.

    Args:
        path: A YAML file whose top level is a mapping of `TrainConfig` fields, or None.
        overrides: ``key=value`` strings applied in order; the value is parsed with ``yaml.safe_load``
            (``lr=1e-4``, ``data.sources=[musique, probtree_2wiki]``). A dotted key sets an entry inside a
            mapping field (``method_args.r=16``, ``data.packing=true``).

    Raises:
        InputError: unknown key (with the closest known key), wrong type, bad choice or range, missing
            ``num_labels`` for a classification task; each message names the file and line or the override.
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
    for name, value in list(values.items()):
        try:
            values[name] = check_field(name, value)
        except FieldError as err:
            raise InputError(f"{err} ({where[name]})", field=name, **_located(where[name])) from None
    try:
        return TrainConfig(**values)
    except InputError as err:
        source = f" ({path})" if path is not None and "num_labels" in str(err) else ""
        raise InputError(f"{err}{source}", file=path, field=err.field) from None


def _located(where: str) -> dict[str, Any]:
    """``file`` and ``line`` of a ``where`` entry (``"path:line"``); nothing for an override."""
    if where.startswith("override "):
        return {}
    file, _, line = where.rpartition(":")
    return {"file": file, "line": int(line)}


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})", file=path,
                         line=mark.line + 1 if mark is not None else None) from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        raise InputError("expected a mapping of config keys at the top level", file=path,
                         line=node.start_mark.line + 1)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key_node, _ in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key not in FIELDS:
            raise InputError(f"unknown key {key!r}{_suggest(key, list(FIELDS))}", file=path, line=line, field=key)
        if key in where:
            raise InputError(f"duplicate key {key!r} (first at {where[key]})", file=path, line=line, field=key)
        where[key] = f"{path}:{line}"
        values[key] = data[key]
    return values, where


def _apply_override(values: dict[str, Any], where: dict[str, str], override: str) -> None:
    if "=" not in override:
        raise InputError(f"override {override!r}: expected key=value (e.g. learning_rate=1e-4)")
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    name = parts[0]
    if name not in FIELDS:
        raise InputError(f"override {override!r}: unknown key{_suggest(name, list(FIELDS))}", field=name)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise InputError(f"override {override!r}: cannot parse the value ({getattr(err, 'problem', err)})",
                         field=name) from None
    if len(parts) > 1:
        if _base_type(name)[0] is not dict:
            raise InputError(f"override {override!r}: {name!r} is not a mapping, so {key!r} cannot be set",
                         field=name)
        current = values.get(name)
        target = dict(current) if isinstance(current, dict) else dict(FIELDS[name].default_factory())
        values[name] = target
        for part in parts[1:-1]:
            inner = target.get(part)
            target[part] = dict(inner) if isinstance(inner, dict) else {}
            target = target[part]
        target[parts[-1]] = value
    else:
        values[name] = value
    where[name] = f"override {override!r}"


def cpu_bf16_flags(cpuinfo: Union[str, Path] = "/proc/cpuinfo") -> set[str]:
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
            f"{_suggest(requested, MIXED_PRECISION_CHOICES)}", field="mixed_precision"
        )
    if requested == "no":
        return "no", "mixed precision off (requested)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", f"CUDA GPU {name} supports bf16") if bf16 else ("fp16", f"CUDA GPU {name} has no bf16")
        if requested == "bf16" and not bf16:
            raise InputError(f"mixed_precision 'bf16' requested but CUDA GPU {name} does not support it: use fp16",
                             field="mixed_precision")
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
