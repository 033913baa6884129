"""`BitFitModel`: the PEFT tuner that injects `BitFitLayer`s into a frozen model."""

from __future__ import annotations

from peft import PeftConfig
from torch import nn

from ...compat import BaseTuner, check_target_module_exists
from ...tasks import task_for_peft_type
from ..targets import inside_head
from .config import BitFitConfig
from .layer import SUPPORTED_LAYERS, BitFitLayer


def _has_own_bias(module: nn.Module) -> bool:
    if isinstance(module, BitFitLayer):
        return module.has_base_bias
    return isinstance(module, SUPPORTED_LAYERS) and module.bias is not None


class BitFitModel(BaseTuner):
    """
    Bias-only fine-tuning (BitFit) as a PEFT tuner. Use it through `peft.get_peft_model` with a [`BitFitConfig`].

    Example:
        ```py
        >>> import peftprompt  # registers "bitfit" with PEFT
        >>> from peft import get_peft_model
        >>> from peftprompt import BitFitConfig
        >>> model = get_peft_model(base_model, BitFitConfig(task_type="SEQ_CLS"))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BitFitLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        # `target_modules=None` is resolved against the model itself in `_prepare_model`, not from a name mapping.
        return peft_config

    def _prepare_model(self, peft_config: BitFitConfig, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            # Heads are trained in full as modules_to_save. PEFT adds the classifier to modules_to_save only after
            # injection for TOKEN_CLS, so name the classification heads here too; they match as PEFT matches
            # modules_to_save (DistilBERT's pre_classifier is part of its "classifier" head).
            heads = list(peft_config.modules_to_save or [])
            task = task_for_peft_type(peft_config.task_type)
            heads += task.saved_head_names if task is not None else ()
            peft_config.target_modules = {
                name
                for name, module in model.named_modules()
                if _has_own_bias(module)
                and not name.endswith(".base_layer")  # already wrapped by an earlier adapter: target the wrapper
                and not inside_head(name, heads)
            }
            if not peft_config.target_modules:
                raise ValueError(
                    "BitFit found no nn.Linear, nn.LayerNorm or Conv1D with a bias in this model; "
                    "name the layers to give a bias delta in target_modules (e.g. ['q_proj', 'v_proj'])"
                )

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str):
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BitFitLayer):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode)
            return
        new_module = BitFitLayer(target, adapter_name, inference_mode=peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
