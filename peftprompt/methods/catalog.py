"""The adapter methods `attach` knows: one `Method` per name, with its PEFT type and its defaults for a model.

Every tuner of PEFT 0.21 that applies to a model without inputs `attach` cannot infer is here under its PEFT name
(``vera``, ``loha``, ``boft``...), and LoRA's variants are named presets of ``LoraConfig`` (``dora``, ``pissa``...).
The PEFT methods that need such inputs are in `REFUSED_METHODS` with the reason. Defaults are sized from the layers
a method adapts (a block size that divides their widths, a frequency count that fits them), so that they hold on a
384-wide MiniLM as on a 32-wide test model; PEFT's own defaults are kept wherever they fit.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, EvaConfig, PeftConfig, PromptLearningConfig
from transformers import Conv1D, PreTrainedModel

from ..compat import ADAPTION_PROMPT_MODELS
from ..tasks import Task
from .bitfit.layer import SUPPORTED_LAYERS  # importing BitFit registers it with PEFT
from .optimizers import OPTIMIZER_ARGS
from .prompt_learning import prompt_learning_sizes
from .targets import (
    common_divisor,
    default_feedforward_modules,
    default_target_modules,
    inside_head,
    linear_module_names,
    target_shapes,
)


@dataclass(frozen=True)
class Site:
    """Where an adapter goes: the model and the target modules it will adapt (None: the method's own choice)."""

    model: PreTrainedModel
    target_modules: Any

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """``(in, out)`` of the linear layers the target modules name."""
        return target_shapes(self.model, self.target_modules)

    @property
    def inputs(self) -> list[int]:
        return [n_in for n_in, _ in self.shapes]

    @property
    def outputs(self) -> list[int]:
        return [n_out for _, n_out in self.shapes]


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        name: Its name in `METHODS`, the CLI and the recipes.
        peft_type: The PEFT type of its config (None for ``full``).
        description: One line, as the model card and the reports say it.
        defaults: The config fields it sets for a `Site`, before the caller's overrides.
        marker: Fields of a config that tell this preset apart from the other methods of its PEFT type
            (``{"use_dora": True}``); `method_name` reads them. A PiSSA / OLoRA adapter is saved as the plain LoRA
            it amounts to, so it reads ``lora`` once saved.
        mergeable: ``merge_and_unload`` folds it into the base weights.
        needs: Inputs that `attach` cannot infer -> what they are; without them `attach` refuses the method.
        unsupported: The reason it cannot apply to a model for a task, or None where it can.
    """

    name: str
    peft_type: Optional[str]
    description: str
    defaults: Callable[[Site], dict[str, Any]] = lambda site: {}
    marker: Mapping[str, Any] = field(default_factory=dict)
    mergeable: bool = True
    needs: Mapping[str, str] = field(default_factory=dict)
    unsupported: Callable[[PreTrainedModel, Task], Optional[str]] = lambda model, task: None

    @property
    def config_cls(self) -> Optional[type[PeftConfig]]:
        return PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type] if self.peft_type else None

    @property
    def is_prompt_learning(self) -> bool:
        return self.config_cls is not None and issubclass(self.config_cls, PromptLearningConfig)

    @property
    def optimizer_args(self) -> dict[str, Any]:
        """Arguments of its optimiser recipe (`peftprompt.methods.optimizers`), accepted by `attach`."""
        return OPTIMIZER_ARGS.get(self.name, {})

    def config_fields(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_cls)} if self.config_cls else set()

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether a saved config (``adapter_config.json`` as a dict) is of this method."""
        peft_type = config.get("peft_type")
        return str(getattr(peft_type, "value", peft_type)) == self.peft_type and all(
            config.get(k) == v for k, v in self.marker.items()
        )


# --- defaults -------------------------------------------------------------------------------------------------------


def _lora(**fields: Any) -> Callable[[Site], dict[str, Any]]:
    return lambda site: {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, **fields}


def _lora_all_linear(site: Site) -> dict[str, Any]:
    return {**_lora()(site), "target_modules": linear_module_names(site.model)}


def _eva(site: Site) -> dict[str, Any]:
    # rho 2: a layer's rank may grow to twice r, taken from layers whose activations need less
    return {**_lora(init_lora_weights="eva")(site), "lora_dropout": 0.0, "eva_config": EvaConfig(rho=2.0)}


def _prompt_sizes(peft_type: str, **fields: Any) -> Callable[[Site], dict[str, Any]]:
    return lambda site: {"num_virtual_tokens": 20, **prompt_learning_sizes(site.model, peft_type), **fields}


def _ia3(site: Site) -> dict[str, Any]:
    feedforward = default_feedforward_modules(site.model)
    if feedforward is None or not isinstance(site.target_modules, (list, set)):
        return {}
    return {"feedforward_modules": [m for m in feedforward if m in site.target_modules]}


def _bitfit(site: Site) -> dict[str, Any]:
    # BERT-style models: every existing bias. Llama-style models have none, so their projections get one.
    has_bias = any(
        isinstance(m, SUPPORTED_LAYERS) and m.bias is not None and not inside_head(n)
        for n, m in site.model.named_modules()
    )
    return {"target_modules": None if has_bias else _bias_free_linear_leaves(site.model)}


def _bias_free_linear_leaves(model: PreTrainedModel) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n in linear_module_names(model) if model.get_submodule(n).bias is None}
    )


def _adaption_prompt_unsupported(model: PreTrainedModel, task: Task) -> Optional[str]:
    if model.config.model_type not in ADAPTION_PROMPT_MODELS:
        return (f"adaption prompts are defined for {', '.join(sorted(ADAPTION_PROMPT_MODELS))} attention only, "
                f"not {model.config.model_type}")
    return None


def _prefix_unsupported(model: PreTrainedModel, task: Task) -> Optional[str]:
    # PEFT feeds key/value prefixes as past_key_values, to the model or to its backbone
    if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, model.base_model)):
        return f"{model.config.model_type} takes no past_key_values, through which key/value prefixes are fed"
    return None


def _conv1d_unsupported(model: PreTrainedModel, task: Task) -> Optional[str]:
    if any(isinstance(m, Conv1D) for m in model.modules()):
        return "its QR initialisation does not handle transformers Conv1D layers (GPT-2's linear layers)"
    return None


def _classifier_unsupported(model: PreTrainedModel, task: Task) -> Optional[str]:
    if task.classification:
        return (f"it trains token embeddings only, so the new {task.name} head would stay untrained; use it for "
                "causal_lm or with another method")
    return None


def _smallest(values: list[int], default: int) -> int:
    return min(values, default=default)


# --- the table ------------------------------------------------------------------------------------------------------

_METHODS = (
    # the methods the recipes and benchmarks compare (`CORE_METHODS`)
    Method("lora", "LORA", "LoRA (low-rank updates of the attention projections)", _lora()),
    Method("prefix", "PREFIX_TUNING", "prefix tuning (trained key/value prefixes in every layer)",
           _prompt_sizes("PREFIX_TUNING"), mergeable=False, unsupported=_prefix_unsupported),
    Method("prompt", "PROMPT_TUNING", "prompt tuning (trained virtual input-token embeddings)",
           _prompt_sizes("PROMPT_TUNING"), mergeable=False),
    Method("ptuning", "P_TUNING", "P-tuning (virtual tokens produced by a small prompt encoder)",
           _prompt_sizes("P_TUNING", encoder_hidden_size=128), mergeable=False),
    Method("ia3", "IA3", "IA3 (rescaling vectors on keys, values and feed-forward activations)", _ia3),
    Method("bitfit", "BITFIT",
           "BitFit (a trained delta on every bias term; registered with PEFT by `import peftprompt`)", _bitfit),
    Method("osf", "OSF", "OSF (orthogonal subspace fine-tuning: each weight's top singular directions frozen, the "
           "rest trained)"),
    # LoRA's presets and AdaLoRA
    Method("lora_all_linear", "LORA", "LoRA on every linear layer outside the heads (QLoRA's choice)",
           _lora_all_linear),
    Method("dora", "LORA", "DoRA (LoRA on the direction of each weight, plus a trained magnitude per output)",
           _lora(use_dora=True), marker={"use_dora": True}),
    Method("rslora", "LORA", "rsLoRA (LoRA scaled by alpha / sqrt(r), stable at high ranks)", _lora(use_rslora=True),
           marker={"use_rslora": True}),
    Method("pissa", "LORA", "PiSSA (LoRA started from each weight's principal singular directions)",
           _lora(init_lora_weights="pissa_niter_4", lora_dropout=0.0), marker={"init_lora_weights": "pissa_niter_4"}),
    Method("olora", "LORA", "OLoRA (LoRA started from an orthonormal QR basis of each weight)",
           _lora(init_lora_weights="olora", lora_dropout=0.0), marker={"init_lora_weights": "olora"},
           unsupported=_conv1d_unsupported),
    Method("eva", "LORA", "EVA (LoRA started from the singular vectors of the layer inputs, ranks redistributed)",
           _eva, marker={"init_lora_weights": "eva"},
           needs={"eva_dataloader": "batches of training inputs (dicts of tensors) for its activation SVD"}),
    Method("loraplus", "LORA", "LoRA+ (LoRA whose B matrices learn 16 times faster than A)", _lora()),
    Method("lora_fa", "LORA", "LoRA-FA (LoRA with A frozen at random, B trained with a projected gradient)",
           _lora()),
    Method("adalora", "ADALORA", "AdaLoRA (SVD-form LoRA whose rank budget moves to the layers that need it)",
           lambda site: {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "total_step": 1000}),
    # the other PEFT tuners
    Method("cartridge", "CARTRIDGE", "Cartridges (a trained key/value cache prefix, its first token frozen)",
           _prompt_sizes("CARTRIDGE"), mergeable=False, unsupported=_prefix_unsupported),
    Method("adaption_prompt", "ADAPTION_PROMPT",
           "LLaMA-Adapter (gated adaption prompts in the attention of the top layers)",
           lambda site: {"adapter_len": 10, "adapter_layers": site.model.config.num_hidden_layers},
           mergeable=False, unsupported=_adaption_prompt_unsupported),
    # PEFT merges BEFT only into layers that have a bias (not Llama's projections): shipped unmerged
    Method("beft", "BEFT", "BEFT (trained biases of the value projections only)", mergeable=False),
    Method("ln_tuning", "LN_TUNING", "LN tuning (the layer norms trained in full)"),
    Method("loha", "LOHA", "LoHa (low-rank Hadamard product update)"),
    Method("lokr", "LOKR", "LoKr (low-rank Kronecker product update)"),
    Method("vera", "VERA", "VeRA (frozen random low-rank matrices shared by all layers, trained scaling vectors)"),
    Method("pvera", "PVERA", "PVeRA (VeRA with probabilistic scaling vectors)"),
    Method("randlora", "RANDLORA", "RandLoRA (full-rank update from frozen random bases, trained diagonal scalings)"),
    Method("vblora", "VBLORA", "VB-LoRA (low-rank factors composed from a shared trained vector bank)",
           lambda site: {"vector_length": common_divisor(site.shapes, 256)}),
    Method("fourierft", "FOURIERFT", "FourierFT (trained coefficients of a few random 2-D Fourier frequencies)",
           lambda site: {"n_frequency": min(1000, _smallest([a * b for a, b in site.shapes], 1000))}),
    Method("waveft", "WAVEFT", "WaveFT (trained coefficients of a sparse 2-D wavelet transform)",
           lambda site: {"n_frequency": min(2592, _smallest([a * b for a, b in site.shapes], 2592))}),
    Method("boft", "BOFT", "BOFT (butterfly-factorised orthogonal rotation of each weight)",
           lambda site: {"boft_block_size": common_divisor([(n, n) for n in site.inputs], 4)}),
    Method("oft", "OFT", "OFT (block-diagonal orthogonal rotation of each weight)",
           lambda site: {"oft_block_size": common_divisor([(n, n) for n in site.inputs], 32)}),
    Method("hra", "HRA", "HRA (a chain of trained Householder reflections of each weight)"),
    Method("miss", "MISS", "MiSS (a trained shard shared across each weight's rows)",
           lambda site: {"r": common_divisor([(n, n) for n in site.inputs], 64)}),
    Method("road", "ROAD", "RoAd (trained 2-D rotations of each output pair)",
           lambda site: {"group_size": common_divisor([(n, n) for n in site.outputs], 64)}),
    Method("shira", "SHIRA", "SHiRA (a sparse random set of weight entries trained)",
           lambda site: {"r": min(32, _smallest([a * b // (a + b) for a, b in site.shapes], 32))}),
    Method("c3a", "C3A", "C3A (circular-convolution update in trained blocks)",
           lambda site: {"block_size": common_divisor(site.shapes, 256)}),
    Method("psoft", "PSOFT", "PSOFT (a trained orthogonal r x r rotation inside each weight's principal subspace)",
           lambda site: {"r": min(32, _smallest([min(a, b) for a, b in site.shapes], 32))}),
    Method("hira", "HIRA", "HiRA (Hadamard product of the weight and a low-rank update: a high-rank change)"),
    Method("lily", "LILY", "Lily (low-rank adapters whose up-projections are shared across layers)",
           mergeable=False),
    Method("delora", "DELORA", "DeLoRA (LoRA with a bounded, normalised update)"),
    Method("gralora", "GRALORA", "GraLoRA (LoRA split into k x k blocks of sub-adapters)"),
    Method("glora", "GLORA", "GLoRA (generalised LoRA: trained scaling and shift of weights and biases)"),
    Method("unilora", "UNILORA", "Uni-LoRA (every layer's LoRA drawn from one trained vector by a fixed projection)"),
    Method("tinylora", "TINYLORA", "TinyLoRA (a tiny trained vector through fixed random tensors on SVD factors)"),
    Method("frod", "FROD", "FRoD (a joint decomposition of same-role weights, with trained sparse factors)",
           lambda site: {"progressbar": False}),
    Method("adamss", "ADAMSS", "AdaMSS (low-rank updates inside clusters of each weight's SVD subspaces)"),
    Method("peanut", "PEANUT", "PEANuT (a small non-linear network of the frozen weight as the update)"),
    Method("deft", "DEFT", "DEFT (a residual projection update of each weight)"),
    Method("supertuning", "SUPERTUNING", "Super-Tuning (a sparse set of large-magnitude weight entries trained)"),
    Method("shadow", "SHADOW", "ShadowPEFT (a small trained shadow network beside the frozen decoder layers)",
           mergeable=False),
    Method("trainable_tokens", "TRAINABLE_TOKENS", "trainable tokens (the embeddings of chosen token ids trained)",
           needs={"token_indices": "the ids of the tokens whose embeddings train (e.g. new special tokens)"},
           unsupported=_classifier_unsupported),
    Method("full", None, "full fine-tuning (every weight)", mergeable=False),
)
METHOD_TABLE: dict[str, Method] = {method.name: method for method in _METHODS}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)

# PEFT methods that `attach` cannot build: they need inputs it cannot infer. `attach` names the reason.
REFUSED_METHODS: dict[str, str] = {
    "xlora": "X-LoRA mixes LoRA adapters that are already trained: build it with peft.XLoraConfig(adapters={...}) "
             "from saved LoRA adapters",
    "poly": "Poly routes between LoRA skills by task: every forward needs task_ids, which peftprompt's tasks do not "
            "carry",
    "multitask_prompt_tuning": "multitask prompt tuning selects its prompt by task: every forward needs task_ids, "
                               "which peftprompt's tasks do not carry",
    "cpt": "CPT (context-aware prompt tuning) needs the token ids, mask and token types of its in-context examples "
           "(cpt_token_ids, cpt_mask, cpt_tokens_type_mask)",
}


def default_fields(method: Method, site: Site) -> dict[str, Any]:
    """`method`'s config fields for `site`: the target modules it adapts there, then its own defaults."""
    fields: dict[str, Any] = {}
    if "target_modules" in method.config_fields() and site.target_modules is not None:
        fields["target_modules"] = site.target_modules
    return {**fields, **method.defaults(site)}


def resolve_targets(method: Method, model: PreTrainedModel, overrides: Mapping[str, Any]) -> Any:
    """The target modules `method` adapts on `model`: the caller's, else the default for its architecture."""
    if "target_modules" in overrides:
        return overrides["target_modules"]
    if "target_modules" not in method.config_fields() or method.name in ("bitfit", "lora_all_linear"):
        return None
    return default_target_modules(model, method.peft_type)


__all__ = ["METHODS", "METHOD_TABLE", "Method", "REFUSED_METHODS", "Site", "default_fields", "resolve_targets"]
