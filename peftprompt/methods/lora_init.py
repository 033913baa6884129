"""LoRA initialisations that need more than a config: EVA (activations) and PiSSA / OLoRA (moved base weights).

- EVA initialises each LoRA ``A`` from the singular vectors of the layer's input activations, so it needs batches
  of the training inputs: `initialise_eva` runs PEFT's ``initialize_lora_eva_weights`` over them.
- PiSSA and OLoRA start ``A`` and ``B`` from the base weight's principal directions and subtract them from the base
  weight, so the adapter alone no longer applies to the original model. `remember_initial_lora` keeps the initial
  ``A``/``B`` at attach time; `save_as_plain_lora` then writes what PEFT's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes, a plain LoRA of twice the rank
  (``[A | A0]``, ``[B | -B0]``) for the unchanged base model, keeping the trained head that PEFT's conversion drops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from peft import PeftModel, initialize_lora_eva_weights
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..tasks import Task

# The attribute of a PiSSA / OLoRA `PeftModel` holding its initial LoRA weights per adapter.
INITIAL_LORA = "peftprompt_initial_lora"


# PEFT cycles through the batches until every layer's components converge: a batch with fewer tokens than
# components is skipped, forever. `initialise_eva` stops after this many forward passes instead.
EVA_MAX_BATCHES = 200


class _EvaDidNotConverge(Exception):
    pass


def initialise_eva(model: PeftModel, dataloader: Iterable[dict], task: Task, adapter_name: str) -> None:
    """Initialise `model`'s EVA adapter from the activations of `dataloader`'s batches (dicts of model inputs).

    Sequence-classification labels are one per example, not per token, so they mask no token. Raises an
    `InputError` when the components do not converge within `EVA_MAX_BATCHES` forward passes (each batch must hold
    at least ``r * rho`` unpadded tokens).
    """
    config = model.peft_config[adapter_name]
    config.eva_config.use_label_mask = task.labels in ("token", "next_token")
    passes = 0

    def forward(model, inputs):
        nonlocal passes
        passes += 1
        if passes > EVA_MAX_BATCHES:
            raise _EvaDidNotConverge
        return model(**inputs)

    try:
        with torch.no_grad():
            initialize_lora_eva_weights(model, dataloader, forward_fn=forward, adapter_name=adapter_name,
                                        show_progress_bar=False)
    except _EvaDidNotConverge:
        needed = int(config.r * config.eva_config.rho)
        raise InputError(f"eva: the activation SVD did not converge within {EVA_MAX_BATCHES} batches; give "
                         f"eva_dataloader batches of at least r * rho = {needed} unpadded tokens each",
                         field="eva_dataloader") from None


def remember_initial_lora(model: PeftModel, adapter_name: str) -> None:
    """Keep a copy of `adapter_name`'s freshly initialised LoRA weights on `model` for `save_as_plain_lora`."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    initial = getattr(model, INITIAL_LORA, {})
    initial[adapter_name] = {k: v.detach().clone() for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    setattr(model, INITIAL_LORA, initial)


def save_as_plain_lora(model: PeftModel, save_dir: Path) -> None:
    """Rewrite the PiSSA / OLoRA adapters that `model.save_pretrained(save_dir)` wrote as plain LoRA adapters."""
    for adapter_name, initial in getattr(model, INITIAL_LORA, {}).items():
        adapter_dir = save_dir if adapter_name == "default" else save_dir / adapter_name
        weights_path, config_path = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
        weights = load_file(weights_path)
        for key, value in weights.items():
            if ".lora_A." in key:
                weights[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
            elif ".lora_B." in key:
                weights[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
        save_file(weights, weights_path, metadata={"format": "pt"})
        config = json.loads(config_path.read_text())
        # twice the rank at the same scale (alpha / r, or alpha / sqrt(r) with rsLoRA), as PEFT's conversion does
        factor = 2**0.5 if config.get("use_rslora") else 2
        config.update(init_lora_weights=True, r=2 * config["r"], lora_alpha=factor * config["lora_alpha"])
        for pattern in ("rank_pattern", "alpha_pattern"):
            config[pattern] = {k: 2 * v for k, v in (config.get(pattern) or {}).items()}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
