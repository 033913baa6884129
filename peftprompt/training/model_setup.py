"""Getting a model ready to train: the process layout, the backbone (k-bit preparation, gradient checkpointing),
the adapter, and the optimizer."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from peft.utils import cast_mixed_precision_params

from ..adapters import check_adapter_dir, load_adapter
from ..backbones import load_backbone
from ..errors import InputError
from ..methods import attach, get_method, method_name
from ..methods.optimizers import method_optimizer
from .config import TrainConfig, resolve_frozen_dtype


def distributed_state() -> PartialState:
    """The process layout, created the way `Trainer` creates it (``cpu=True`` without CUDA; see `peftprompt.training.trainer`).

    Recipes that need the process index before `train` (to print once, or to build data on the main process
    first) should use this rather than a bare ``PartialState()``: on a CPU-only machine that one would make every
    launched process a world of 1.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def prepare_backbone(model, config: TrainConfig):
    """Get a loaded backbone ready for adapter training: k-bit preparation and gradient checkpointing.

    Call it before `attach`. A quantised (8-bit / 4-bit) backbone goes through PEFT's
    ``prepare_model_for_kbit_training``; gradient checkpointing uses the non-reentrant implementation (it works
    with frozen inputs). Prefix tuning refuses gradient checkpointing: `attach` raises the ValueError that says so.
    The KV cache is switched off by `train` itself while it trains (packed rows need that).
    """
    quantised = config.load_in_8bit or config.load_in_4bit or getattr(model, "is_loaded_in_8bit", False) or getattr(
        model, "is_loaded_in_4bit", False
    )
    checkpointing_kwargs = {"use_reentrant": False}
    if quantised:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    return model


def build_model(config: TrainConfig, adapter_name: str = "default"):
    """`load_backbone` + `prepare_backbone` + `attach` as the config says, the adapter named `adapter_name`; returns
    ``(model, tokenizer)``.

    Seeds the RNGs with ``config.seed`` first, so the new head and adapter weights repeat from run to run. With
    ``frozen_dtype`` bfloat16 / float16 (or ``auto`` under bf16 / fp16 mixed precision; see `resolve_frozen_dtype`)
    the backbone is loaded in that dtype and stays there while the trainable parameters (adapter, new head) are
    float32, as PEFT's ``cast_mixed_precision_params`` leaves them: half the memory of the frozen weights, and no
    float32 -> half cast of every weight at every step under mixed precision.
    """
    set_seed(config.seed)
    frozen_dtype = resolve_frozen_dtype(config)
    model, tokenizer = load_backbone(
        config.model,
        task=config.task,
        num_labels=config.num_labels,
        load_in_8bit=config.load_in_8bit,
        load_in_4bit=config.load_in_4bit,
        dtype=frozen_dtype,
    )
    model = prepare_backbone(model, config)
    if config.init_adapter:
        model = continue_adapter(model, config, adapter_name)
    else:
        model = attach(model, config.method, task=config.task, adapter_name=adapter_name, **config.method_args)
    if frozen_dtype != torch.float32:
        cast_mixed_precision_params(model, frozen_dtype)
    return model, tokenizer


def continue_adapter(model, config: TrainConfig, adapter_name: str = "default"):
    """The saved adapter ``config.init_adapter`` on `model`, trainable: its weights and its own PEFT config (rank,
    targets...) go on training; ``method_args`` are not applied. A saved adapter of another method than
    ``config.method`` is refused (`InputError` naming ``init_adapter``)."""
    saved = check_adapter_dir(config.init_adapter)
    method = get_method(config.method)
    if not method.matches(saved):
        raise InputError(f"{config.init_adapter} holds a {method_name(saved)} adapter, but method is "
                         f"{config.method!r}: set method to the adapter's", field="init_adapter")
    was_training = model.training
    return load_adapter(model, config.init_adapter, adapter_name=adapter_name, is_trainable=True).train(was_training)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) over the trainable parameters only; no weight decay on 1-d tensors
    (biases, norms, BitFit deltas, IA3 vectors).

    Methods that are optimiser recipes get theirs (`peftprompt.methods.optimizers`): ``loraplus`` LoRA+'s groups
    (``B`` at ``loraplus_lr_ratio`` times the learning rate, from ``method_args``, default 16) on AdamW or
    AdamW8bit, ``lora_fa`` PEFT's LoRA-FA optimiser (its own AdamW: ``optimizer: adamw8bit`` is refused).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: attach an adapter (or method 'full') first")
    if config.method in ("loraplus", "lora_fa"):
        if config.method == "lora_fa" and config.optimizer == "adamw8bit":
            raise InputError("method 'lora_fa' brings its own AdamW; use optimizer: adamw", field="optimizer")
        optimizer_cls = torch.optim.AdamW
        if config.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            optimizer_cls = bnb.optim.AdamW8bit
        return method_optimizer(model, config.method, lr=config.learning_rate, weight_decay=config.weight_decay,
                                optimizer_cls=optimizer_cls, **config.method_args)
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate)
    # torch's fused kernel (CPU and CUDA) updates every tensor in one pass instead of a Python loop over them
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in named)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)


@contextmanager
def training_layout_kept(model: torch.nn.Module):
    """Keep bitsandbytes' 4-bit weights in their training layout for the duration.

    On a CPU with avx512_bf16, a 4-bit layer's first forward in eval mode without gradients (an evaluation)
    repacks its weight in place for bitsandbytes' CPU inference kernel, a layout its training path does not read
    (on a tiny model the next training step then failed). Each layer's ``support_avx512bf16_for_cpu`` switch is
    turned off while training and set back afterwards.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False) is True]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
