"""Ship a trained adapter: save it safely from distributed runs, write its model card, export a merged model.

- `save_trained_adapter(model, accelerator, output_dir, tokenizer)`: the save to call at the end of an
  ``accelerate launch`` run, on EVERY process. Under DeepSpeed ZeRO-3 each process holds only a shard of every
  weight (``param.data`` is an empty tensor), so ``model.save_pretrained(dir)`` writes an adapter whose tensors
  are empty: PEFT's known trap. ``accelerator.get_state_dict(model)`` instead gathers the full weights onto the
  main process (ZeRO-3 needs ``zero3_save_16bit_model: true`` in the accelerate config; FSDP gathers a
  ``FULL_STATE_DICT``), and the main process saves that state dict with
  ``save_pretrained(tmp, state_dict=..., safe_serialization=True)`` into a directory written atomically
  (`peftprompt.atomic.write_dir_atomically`, as `peftprompt.adapters.save_adapter` does). An adapter whose weights
  would be empty is refused on every process with `EmptyAdapterError`, and the previous contents of `output_dir`
  are kept; only the layers AdaLoRA's rank allocation pruned to rank 0 (its ``rank_pattern``) may be empty.
- `write_model_card(output_dir, ...)`: a Hugging Face ``README.md`` made with huggingface_hub's `ModelCard` from
  the package's one Jinja template (`MODEL_CARD_TEMPLATE`, shared with the merged export's card): metadata in the
  YAML header through `ModelCardData` (``base_model``, ``library_name: peft``, ``pipeline_tag``, ``tags``,
  ``datasets``, ``metrics``); description, how to load, training command and hyper-parameters, results, trainable
  parameters and adapter size; written atomically. Nothing reaches the Hub.
- `export_merged(adapter_dir, output_dir)`: fold a LoRA / IA3 / BitFit adapter into its base model
  (``merge_and_unload``) and save a plain transformers checkpoint with its tokenizer, which loads with
  ``AutoModelFor...from_pretrained`` and no peftprompt or peft installed. Its card comes from the same template,
  with the adapter card's metadata (``datasets``, ``metrics``) and its training, results and parameter sections
  (read with `ModelCard.load` and `card_sections`). Prompt-learning adapters (prefix, prompt, P-tuning) have no
  weights to fold into and are refused.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir, load_adapter, merge_adapter
from ..atomic import write_dir_atomically, write_file_atomically
from ..backbones import EMBEDDED_ALIASES, MINILM_PACKAGE, SMOLLM2_CACHE_NAME, load_backbone
from ..errors import InputError, RunError
from ..methods import MERGEABLE_METHODS, METHOD_DESCRIPTIONS, METHODS, PROMPT_LEARNING_METHODS, method_name
from ..methods.lora_init import save_as_plain_lora
from ..report import format_bytes
from ..tasks import SAVED_HEAD_NAMES, TASK_NAMES, get_task, task_for_peft_type
from .collective import shared_outcome
from .sharding import gathered_weights, is_sharded

# Embedded backbones by their short name (what `load_backbone` takes) and their Hugging Face Hub id.
EMBEDDED_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# Parts of the local path an embedded backbone is loaded from (recorded as `base_model_name_or_path`).
EMBEDDED_PATH_MARKERS = {MINILM_PACKAGE: "minilm", SMOLLM2_CACHE_NAME: "smollm2-135m"}

# Tasks (auto class, pipeline tag, heads) come from `peftprompt.tasks`; method names and descriptions from
# `peftprompt.methods` (`METHODS`, `METHOD_DESCRIPTIONS`, `MERGEABLE_METHODS`, `method_name`).
HEAD_WEIGHT_SUFFIXES = tuple(f"{head}.weight" for head in SAVED_HEAD_NAMES)
MODEL_CARD = "README.md"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
"""The one Jinja template of every card peftprompt writes (adapters and merged exports), rendered by
`ModelCard.from_template`; shipped as package data (``pyproject.toml``)."""
CARRIED_SECTIONS = ("Training", "Results", "Trainable parameters and adapter size")
"""The sections of an adapter's card that its merged export's card carries over."""

ZERO3_HINT = (
    "ZeRO-3 / FSDP gathering failed: the weights were still sharded when saved. With DeepSpeed ZeRO-3 set "
    "`zero3_save_16bit_model: true` in the accelerate config (stage3_gather_16bit_weights_on_model_save); with FSDP "
    "use `fsdp_state_dict_type: FULL_STATE_DICT`; and call save_trained_adapter on every process"
)


class EmptyAdapterError(RunError):
    """The weights about to be saved are empty (sharded ZeRO-3 / FSDP parameters that were not gathered)."""


# Saving from a distributed run --------------------------------------------------------------------------------------


def _pruned_to_rank_zero(rank_pattern: Optional[dict]) -> tuple[str, ...]:
    """Key prefixes of the layers AdaLoRA's rank allocation pruned to rank 0, whose saved weights are empty by design.

    ``rank_pattern`` is the AdaLoRA config's (keys ``<module>.lora_E[.<adapter>]``, one keep-flag per rank);
    PEFT saves such a layer's ``lora_A`` / ``lora_B`` / ``lora_E`` cut to its kept ranks, under
    ``base_model.model.<module>.lora_*``.
    """
    return tuple(
        f"base_model.model.{key.split('.lora_E')[0]}.lora_"
        for key, keep in (rank_pattern or {}).items()
        if not any(keep)
    )


def _empty_tensors(shapes: dict[str, Sequence[int]], rank_pattern: Optional[dict] = None) -> list[str]:
    pruned = _pruned_to_rank_zero(rank_pattern)
    return [name for name, shape in shapes.items() if 0 in shape and not name.startswith(pruned)]


def _rank_pattern(model) -> Optional[dict]:
    if not isinstance(model, PeftModel):
        return None
    return getattr(model.peft_config[model.active_adapter], "rank_pattern", None)


def _refuse_empty(state_dict: dict, what: str, rank_pattern: Optional[dict] = None) -> None:
    if not state_dict:
        raise EmptyAdapterError(f"{what} has no tensors: {ZERO3_HINT}")
    shapes = {name: tuple(value.shape) for name, value in state_dict.items() if isinstance(value, torch.Tensor)}
    empty = _empty_tensors(shapes, rank_pattern)
    if empty:
        raise EmptyAdapterError(
            f"{what}: {len(empty)} of {len(state_dict)} tensors are empty (e.g. {empty[0]!r}): {ZERO3_HINT}"
        )


def adapter_state_for_saving(model, accelerator, state_dict: Optional[dict] = None) -> Optional[dict]:
    """The adapter weights `save_trained_adapter` writes, gathered through ``accelerator.get_state_dict``.

    Call it on every process (under ZeRO-3 / FSDP gathering is a collective operation). Returns the adapter's
    state dict (keys as in ``adapter_model.safetensors``; the whole model for method ``"full"``) on the main process
    and `None` on the others.

    Args:
        model: The model returned by ``accelerator.prepare`` (a `PeftModel` or a plain model, possibly wrapped).
        accelerator (`accelerate.Accelerator`): The run's accelerator.
        state_dict (`dict`, *optional*): An already gathered ``accelerator.get_state_dict(model)``.
    """
    if state_dict is None:
        state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, PeftModel):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(unwrapped, state_dict=state_dict, adapter_name=unwrapped.active_adapter)
    return state_dict


def _check_saved_weights(directory: Path) -> None:
    # PEFT saves an adapter not named "default" in a folder of its name
    files = sorted([*directory.glob("*.safetensors"), *directory.glob(f"*/{ADAPTER_WEIGHTS}")])
    if not files:
        raise EmptyAdapterError(f"no weights file was written: {ZERO3_HINT}")
    for path in files:
        with safe_open(path, framework="pt") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        config = path.with_name(ADAPTER_CONFIG)
        rank_pattern = json.loads(config.read_text()).get("rank_pattern") if config.is_file() else None
        empty = _empty_tensors(shapes, rank_pattern)
        if not shapes or empty:
            detail = f"(e.g. {empty[0]!r})" if empty else "(no tensors)"
            raise EmptyAdapterError(f"{path.name} would hold {len(empty)} empty tensors {detail}: {ZERO3_HINT}")


def save_trained_adapter(model, accelerator, output_dir: Union[str, Path], tokenizer=None) -> Path:
    """Save the trained adapter (or full model) of a run launched with ``accelerate launch``; call on every process.

    (a) Gathers the full state dict with ``accelerator.get_state_dict(model)`` (ZeRO-3 / FSDP shards are gathered
    onto the main process; a model sharded with ``fully_shard`` through `peftprompt.training.sharding`), (b) unwraps
    the model, (c) on the main process saves with ``save_pretrained(tmp, state_dict=..., safe_serialization=True)``
    (a PiSSA / OLoRA adapter rewritten as the plain LoRA it amounts to on the unchanged base model, as
    `peftprompt.save_adapter` does) plus the tokenizer into a directory renamed into place only when complete,
    (d) refuses (`EmptyAdapterError`, raised on every process) to write weights that are empty, keeping whatever
    `output_dir` held before. Any other failure of the write (disk full, permission
    denied) raises the same `SaveError` on every process, naming `output_dir` and the cause
    (`peftprompt.training.collective.shared_outcome`), and `output_dir` keeps what it held. All processes wait for
    the save before returning.
    """
    output_dir = Path(output_dir)
    # every process: a collective under ZeRO-3 / FSDP, and for a model sharded by `peftprompt.training.sharding`
    state_dict = gathered_weights(model) if is_sharded(model) else accelerator.get_state_dict(model)

    def write(tmp: Path) -> None:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if isinstance(unwrapped, PeftModel):
            save_as_plain_lora(unwrapped, tmp)  # PiSSA / OLoRA: the adapter for the unchanged base model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _check_saved_weights(tmp)

    def save() -> None:  # on the main process
        try:
            what, unwrapped = f"the adapter for {output_dir}", accelerator.unwrap_model(model)
            rank_pattern = _rank_pattern(unwrapped)
            # the trainable weights first: PEFT's cut of AdaLoRA's pruned ranks crashes on empty shards
            trainable = {name for name, parameter in unwrapped.named_parameters() if parameter.requires_grad}
            if trainable_state := {name: value for name, value in state_dict.items() if name in trainable}:
                _refuse_empty(trainable_state, what, rank_pattern)  # (names can differ from the state dict's)
            _refuse_empty(adapter_state_for_saving(model, accelerator, state_dict), what, rank_pattern)
            write_dir_atomically(output_dir, write)
        except EmptyAdapterError as err:
            raise EmptyAdapterError(f"refusing to save {output_dir}: {err}") from err

    shared_outcome(save, what="adapter", target=output_dir, main_only=True)  # the outcome reaches every process
    return output_dir


# Model card --------------------------------------------------------------------------------------------------------


def embedded_name(base_model: str) -> Optional[str]:
    """The embedded backbone (``"minilm"``, ``"smollm2-135m"``) that `base_model` names or was loaded from, if any."""
    name = str(base_model)
    if name.lower() in EMBEDDED_ALIASES:
        return EMBEDDED_ALIASES[name.lower()]
    parts = Path(name).parts
    for marker, embedded in EMBEDDED_PATH_MARKERS.items():
        if marker in parts:
            return embedded
    return None


def hub_id(base_model: str) -> str:
    """The Hub id to name in a model card: the embedded backbones' public ids, anything else unchanged."""
    embedded = embedded_name(base_model)
    return EMBEDDED_HUB_IDS[embedded] if embedded else str(base_model)


def head_num_labels(adapter_dir: Union[str, Path]) -> Optional[int]:
    """Number of classes of the task head saved with an adapter (``classifier`` / ``score``), if it has one."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return None
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            if key.endswith(HEAD_WEIGHT_SUFFIXES):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any, exact: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float) and exact:  # hyper-parameters: 2e-05 stays 2e-05
        text = f"{value:g}"
    elif isinstance(value, float):  # results: four decimals
        text = f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    elif isinstance(value, (list, tuple, set)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows: list[tuple[str, Any]], right: bool = True, exact: bool = False) -> str:
    lines = [f"| {header[0]} | {header[1]} |", f"|---|{'---:' if right else '---'}|"]
    lines += [f"| {_cell(name)} | {_cell(value, exact)} |" for name, value in rows]
    return "\n".join(lines)


def _framework_versions() -> list[tuple[str, str]]:
    import peft
    import transformers

    from .. import __version__

    return [("peftprompt", __version__), ("peft", peft.__version__), ("transformers", transformers.__version__),
            ("torch", torch.__version__)]


def render_model_card(
    card_data: ModelCardData,
    *,
    title: str,
    description: str,
    load_code: str,
    load_note: str,
    training: str,
    results: str,
    parameters: str,
    method: str,
    merged: bool = False,
) -> ModelCard:
    """A `ModelCard` from `MODEL_CARD_TEMPLATE`: `card_data` becomes the YAML header, the other arguments fill the
    template's sections (markdown; `load_code` goes in a Python code block). `merged` says the card is a merged
    export's, whose parameter section describes the adapter merged in."""
    card = ModelCard.from_template(
        card_data, template_path=str(MODEL_CARD_TEMPLATE), title=title, description=description,
        load_code=load_code.strip("\n"), load_note=load_note, training=training, results=results,
        parameters=parameters, method=method, merged=merged,
        framework_versions="\n".join(f"- {name} {version}" for name, version in _framework_versions()),
    )
    return card


def _save_card(card: ModelCard, path: Path) -> Path:
    text = str(card)
    text = text if text.endswith("\n") else text + "\n"
    return write_file_atomically(path, lambda f: f.write(text))


_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def card_sections(text: str) -> dict[str, str]:
    """The ``## `` sections of a model card's markdown (`ModelCard.text`), heading -> body (stripped), in order.

    Deeper headings (``###``) stay inside their section; a ``#`` heading ends the section before it; lines inside
    fenced code blocks (a command or code with ``## `` in it) are never headings; a repeated heading keeps its first
    section; CRLF line ends are read too.
    """
    sections: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    fence: Optional[str] = None
    for line in text.splitlines():
        opening = _FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence) \
                    and not line.strip()[len(opening.group(1)):].strip():
                fence = None
        elif opening:
            fence = opening.group(1)
        else:
            heading = _HEADING.match(line)
            if heading and len(heading.group(1)) <= 2:
                name = re.sub(r"[ \t]+#+$", "", heading.group(2) or "").strip()
                current = sections.setdefault(name, []) if len(heading.group(1)) == 2 and name not in sections \
                    else None
                continue
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def read_model_card(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """The metadata (`ModelCard.load(path).data` as a dict) and the `card_sections` of the model card at `path`;
    ``({}, {})`` when there is none. A card whose YAML header cannot be read still gives its sections. Local files
    only: nothing is fetched from the Hub."""
    path = Path(path)
    if not path.is_file():
        return {}, {}
    try:
        card = ModelCard.load(path, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError):  # a hand-edited header that is not a mapping, or not YAML at all
        return {}, card_sections(path.read_text(encoding="utf-8", errors="replace"))
    return card.data.to_dict(), card_sections(card.text)


def write_model_card(
    output_dir: Union[str, Path],
    *,
    base_model: str,
    method: str,
    task: str,
    trainable_params: int,
    total_params: int,
    adapter_bytes: int,
    metrics: dict,
    command: str,
    config: Optional[dict] = None,
    datasets: Optional[list[str]] = None,
) -> Path:
    """Write ``output_dir/README.md``, a Hugging Face model card for a saved adapter, atomically.

    Rendered with `ModelCard.from_template` from `MODEL_CARD_TEMPLATE` (the template of merged exports' cards too);
    the YAML header is a `ModelCardData`: ``base_model`` (the Hub id), ``library_name`` (``peft``, or
    ``transformers`` for a full checkpoint), ``pipeline_tag``, ``tags`` (``peftprompt`` and the method),
    ``datasets`` and ``metrics`` (the names of the results), so ``ModelCard.load(path).data`` reads them back.

    Args:
        output_dir: The adapter directory (the card replaces the stub README that PEFT writes).
        base_model (`str`): Embedded name, hub id or path of the backbone; embedded backbones are named by their
            Hub id in the front matter and by their short name in the loading code.
        method (`str`): One of `peftprompt.METHODS`: ``lora``, ``prefix``, ``prompt``, ``ptuning``, ``ia3``,
            ``bitfit``, ``osf``, ``dora``, ``vera``... or ``full``.
        task (`str`): A task of `peftprompt.tasks.TASKS`: ``seq_cls``, ``token_cls``, ``causal_lm`` or ``feature``.
        trainable_params / total_params (`int`): From `peftprompt.parameter_report`.
        adapter_bytes (`int`): Size of the saved weights (`peftprompt.adapters.directory_bytes`).
        metrics (`dict`): Results, e.g. ``{"sst2 test accuracy": 0.8195}`` (nested dicts are flattened with dots).
        command (`str`): The command that trained it.
        config (`dict`, *optional*): Hyper-parameters (nested dicts are flattened with dots); ``num_labels`` is
            used in the loading code (else it is read from the saved head).
        datasets (`list[str]`, *optional*): Data sets it was trained on.
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    spec = get_task(task)
    if total_params <= 0 or not 0 <= trainable_params <= total_params:
        raise ValueError(f"trainable_params ({trainable_params}) must be within 0..total_params ({total_params})")
    output_dir = Path(output_dir)
    config = dict(config or {})
    repo = hub_id(base_model)
    results = _flatten(metrics)
    card_data = ModelCardData(
        base_model=repo,
        library_name="transformers" if method == "full" else "peft",
        pipeline_tag=spec.pipeline_tag,
        tags=["peftprompt", method],
        datasets=list(datasets) if datasets else None,
        metrics=[name for name, _ in results] or None,
    )
    load_name = embedded_name(base_model) or str(base_model)
    num_labels = config.get("num_labels") or head_num_labels(output_dir)
    load_args, preamble = f"{load_name!r}, task={task!r}", ""
    if spec.classification:
        load_args += f", num_labels={num_labels if num_labels else 'num_labels'}"
        if not num_labels:
            preamble = "num_labels = ...  # the number of classes it was trained with\n"
    if method == "full":
        load_code = _transformers_load_code(spec.auto_class_name, output_dir.name)
    else:
        load_code = (
            "import peftprompt  # registers BitFit with PEFT\n\n"
            f"{preamble}base, tokenizer = peftprompt.load_backbone({load_args})\n"
            "# checks the directory; aligns prompt-tuned token-classification logits with the input tokens\n"
            f'model = peftprompt.load_adapter(base, "path/to/{output_dir.name}")\n'
        )
    merge_note = (
        f"It merges into the base model: `peftprompt export --adapter {output_dir.name} --out merged --merge` writes "
        f"a plain transformers checkpoint (`{spec.auto_class_name}.from_pretrained(\"merged\")`, no PEFT "
        "needed) that runs at the base model's speed."
        if method in MERGEABLE_METHODS
        else "It does not merge into the base model: ship this directory and load it as above."
        if method != "full"
        else "This is a full checkpoint: it loads with plain transformers."
    )
    pct = 100.0 * trainable_params / total_params
    hyper_parameters = (
        _table(("hyper-parameter", "value"), _flatten(config), right=False, exact=True) if config else "(none given)"
    )
    card = render_model_card(
        card_data,
        title=f"{output_dir.name}: {method} on {repo}",
        description=(
            f"A {METHOD_DESCRIPTIONS[method]} adapter for `{repo}` ({spec.pipeline_tag}), trained with "
            "peftprompt (plugins on Hugging Face PEFT) on a frozen backbone"
            + (f" on {', '.join(datasets)}" if datasets else "")
            + ". The task head, where the task has one, is trained and saved with the adapter."
        ),
        load_code=load_code,
        load_note=merge_note,
        training="```bash\n" + command.strip() + "\n```\n\n" + hyper_parameters,
        results=_table(("metric", "value"), results) if results else "(no results given)",
        parameters=_table(
            ("", "value"),
            [
                ("trainable parameters", trainable_params),
                ("total parameters", total_params),
                ("trainable %", f"{pct:.3f}"),
                ("adapter size on disk", f"{format_bytes(adapter_bytes)} ({adapter_bytes:,} bytes)"),
            ],
        ),
        method=method,
    )
    return _save_card(card, output_dir / MODEL_CARD)


def _transformers_load_code(auto_class_name: str, directory_name: str) -> str:
    return (
        f"from transformers import {auto_class_name}, AutoTokenizer\n\n"
        f'model = {auto_class_name}.from_pretrained("path/to/{directory_name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/{directory_name}")\n'
    )


def merged_model_card(adapter_dir: Union[str, Path], output_dir: Union[str, Path], *, base_model: str, method: str,
                      task: str) -> ModelCard:
    """The card of the merged export of `adapter_dir` into `output_dir`, from the adapters' template
    (`MODEL_CARD_TEMPLATE`): ``library_name: transformers``, the tags ``peftprompt``, the method and ``merged``,
    the ``datasets`` and ``metrics`` of the adapter's card, and its training, results and parameter sections
    (`CARRIED_SECTIONS`; a section the adapter's card lacks says so). The loading code is plain transformers."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    spec = get_task(task)
    repo = hub_id(base_model)
    metadata, sections = read_model_card(adapter_dir / MODEL_CARD)
    card_data = ModelCardData(
        base_model=repo, library_name="transformers", pipeline_tag=spec.pipeline_tag,
        tags=["peftprompt", method, "merged"], datasets=metadata.get("datasets"), metrics=metadata.get("metrics"),
    )

    def carried(name: str) -> str:
        return sections.get(name) or f"(not recorded: the adapter's model card has no \"{name}\" section)"

    return render_model_card(
        card_data,
        title=f"{output_dir.name}: {repo} with a {method} adapter merged in",
        description=(
            f"The {method} adapter `{adapter_dir.name}` folded into its base model `{repo}` ({spec.pipeline_tag}) "
            "with PEFT's `merge_and_unload()`. It is a plain transformers checkpoint: it loads with transformers "
            "alone (no PEFT, no peftprompt) and runs at the base model's speed."
        ),
        load_code=_transformers_load_code(spec.auto_class_name, output_dir.name),
        load_note=f"Written by `peftprompt export --adapter {adapter_dir.name} --out {output_dir.name} --merge`.",
        training=carried("Training"),
        results=carried("Results"),
        parameters=carried("Trainable parameters and adapter size"),
        method=method,
        merged=True,
    )


# Merged export -----------------------------------------------------------------------------------------------------


def _base_model_from_config(config: dict, adapter_dir: Path) -> str:
    recorded = config.get("base_model_name_or_path")
    if not recorded:
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: field 'base_model_name_or_path' is empty: pass base_model")
    embedded = embedded_name(recorded)
    if embedded:  # an embedded backbone's site-packages / cache path: valid on any machine that installs it
        return embedded
    if str(recorded).startswith(("/", ".", "~")) and not Path(recorded).expanduser().exists():
        raise InputError(
            f"{adapter_dir / ADAPTER_CONFIG}: field 'base_model_name_or_path' is {recorded!r}, which does not exist "
            "on this machine: pass base_model (--base-model) naming the backbone"
        )
    return str(recorded)


def _fresh_keys(model_cls, config) -> set[str]:
    with torch.device("meta"):
        return set(model_cls(config).state_dict())


def _make_plain(merged) -> None:
    """Check that `merged` saves as a checkpoint its class rebuilds exactly; turn on bias flags BitFit needs."""
    keys = set(merged.state_dict())
    config = merged.config
    if keys == _fresh_keys(type(merged), config):
        return
    # BitFit on a bias-free (Llama-style) model adds biases to its projections: configs that can declare them.
    extra = keys - _fresh_keys(type(merged), config)
    for flag, part in (("attention_bias", "self_attn."), ("mlp_bias", "mlp.")):
        if hasattr(config, flag) and any(part in key and key.endswith(".bias") for key in extra):
            setattr(config, flag, True)
    fresh = _fresh_keys(type(merged), config)
    if keys != fresh:
        added, missing = sorted(keys - fresh), sorted(fresh - keys)
        example = f"the merged model has {added[0]!r}" if added else f"the checkpoint would lack {missing[0]!r}"
        raise ValueError(
            f"the merged model is not a plain {type(merged).__name__} checkpoint ({example}): transformers would drop "
            "or re-initialise those weights when loading it; ship the adapter instead (export without --merge)"
        )


@dataclass
class MergedAdapter:
    """A saved adapter merged into its base model (`merge_saved_adapter`): the plain `model`, its `tokenizer` (the
    adapter's, else the base model's), and the `base_model`, `method` and `task` it was merged for."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_model: str
    method: str
    task: str


def merge_saved_adapter(
    adapter_dir: Union[str, Path],
    base_model: Optional[str] = None,
    task: Optional[str] = None,
    num_labels: Optional[int] = None,
) -> MergedAdapter:
    """Merge a saved adapter of a method that merges (`peftprompt.methods.MERGEABLE_METHODS`: LoRA, IA3, BitFit...)
    into its base model, in memory: a plain transformers model (`export_merged` saves it; `peftprompt export --merge
    --gguf` writes it as a GGUF model with `peftprompt.gguf_export.export_model_gguf`).

    Args:
        adapter_dir: A directory written by `peftprompt.save_adapter` / `save_trained_adapter`.
        base_model (`str`, *optional*): The backbone; by default the adapter config's ``base_model_name_or_path``
            (the local path of an embedded backbone is mapped back to its name, so adapters move between machines).
        task (`str`, *optional*): A task of `peftprompt.tasks.TASKS`; by default the one whose PEFT task type is the
            adapter config's ``task_type``.
        num_labels (`int`, *optional*): Classes of the head; by default read from the head saved with the adapter.

    Raises:
        `InputError`: for adapters that cannot merge (prompt learning, adaption prompts...) and for an
            unknown base model or task; `InputFileNotFoundError` for a missing or incomplete adapter directory.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() and (adapter_dir / "config.json").is_file():
        raise InputError(f"{adapter_dir} is a full model checkpoint (method 'full'), not an adapter: nothing to merge")
    config = check_adapter_dir(adapter_dir)
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    method = method_name(config)
    if peft_config.is_prompt_learning:
        raise InputError(
            f"{adapter_dir}: {method} adapters ({config['peft_type']}) cannot be merged: prompt-learning methods "
            f"({', '.join(PROMPT_LEARNING_METHODS)}) add virtual tokens or key/value prefixes at run time and change "
            "no weight; ship the adapter directory (peftprompt export without --merge) and load it with "
            "peftprompt.load_adapter"
        )
    if method not in MERGEABLE_METHODS:
        raise InputError(
            f"{adapter_dir}: {method} adapters ({config['peft_type']}) do not merge into the base weights; ship the "
            "adapter directory (peftprompt export without --merge) and load it with peftprompt.load_adapter"
        )
    if task is None:
        task_type = config.get("task_type")
        spec = task_for_peft_type(task_type)
        if spec is None:
            raise InputError(
                f"{adapter_dir / ADAPTER_CONFIG}: field 'task_type' is {task_type!r}: pass task "
                f"({', '.join(TASK_NAMES)})"
            )
    else:
        spec = get_task(task)
    task = spec.name
    if base_model is None:
        base_model = _base_model_from_config(config, adapter_dir)
    if spec.classification and num_labels is None:
        num_labels = head_num_labels(adapter_dir)
        if num_labels is None:
            raise InputError(f"{adapter_dir}: no task head saved with the adapter: pass num_labels (--num-labels)")
    model, tokenizer = load_backbone(base_model, task=task, num_labels=num_labels)
    peft_model = load_adapter(model, adapter_dir)
    merged = merge_adapter(peft_model)
    merged.eval()
    _make_plain(merged)
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return MergedAdapter(merged, tokenizer, base_model, method, task)


def export_merged(
    adapter_dir: Union[str, Path],
    output_dir: Union[str, Path],
    base_model: Optional[str] = None,
    task: Optional[str] = None,
    num_labels: Optional[int] = None,
) -> Path:
    """Merge a saved adapter into its base model (`merge_saved_adapter`, whose arguments these are) and save a plain
    transformers checkpoint, with its tokenizer and a model card, to `output_dir` (atomically)."""
    merged = merge_saved_adapter(adapter_dir, base_model=base_model, task=task, num_labels=num_labels)
    card = merged_model_card(Path(adapter_dir), output_dir, base_model=merged.base_model, method=merged.method,
                             task=merged.task)

    def write(tmp: Path) -> None:
        merged.model.save_pretrained(tmp, safe_serialization=True)
        merged.tokenizer.save_pretrained(tmp)
        _save_card(card, tmp / MODEL_CARD)

    return write_dir_atomically(Path(output_dir), write)


# Export without merging: a checked copy of the adapter ----------------------------------------------------------

# Files of a training output directory that are not part of the adapter (checkpoints, optimizer and RNG states).
NOT_SHIPPED = ("optimizer*", "scheduler*", "rng_state*", "trainer_state.json", "training_args.bin", "*.pt", "*.pth")


def export_adapter(adapter_dir: Union[str, Path], output_dir: Union[str, Path]) -> tuple[Path, list[str]]:
    """Copy a saved adapter to `output_dir` for shipping, after checking it is complete and readable.

    Copies the adapter config and weights, the tokenizer and the model card (top-level files), leaving out training
    state (`NOT_SHIPPED`) and subdirectories (checkpoints). Returns `(output_dir, copied file names)`.
    """
    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    copied = sorted(
        p.name
        for p in adapter_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and not any(p.match(pattern) for pattern in NOT_SHIPPED)
    )

    def write(tmp: Path) -> None:
        for name in copied:
            shutil.copy2(adapter_dir / name, tmp / name)
        check_adapter_dir(tmp)

    return write_dir_atomically(Path(output_dir), write), copied


__all__ = [
    "EmptyAdapterError",
    "MergedAdapter",
    "adapter_state_for_saving",
    "card_sections",
    "export_adapter",
    "export_merged",
    "head_num_labels",
    "hub_id",
    "merge_saved_adapter",
    "merged_model_card",
    "read_model_card",
    "render_model_card",
    "save_trained_adapter",
    "write_model_card",
]
