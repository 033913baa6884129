"""One task table and one name per method: the CLI, the config, backbones, methods, reports and shipping agree."""

from __future__ import annotations

import pytest

from peftprompt import METHODS, attach, parameter_report
from peftprompt.method_matrix import method_inputs, tiny_batch

from conftest import tiny_llama

# LoRA presets that differ from LoRA only in their targets or their optimiser: their configs read "lora"
READ_AS_LORA = ("lora_all_linear", "loraplus", "lora_fa")


@pytest.mark.parametrize("method", METHODS)
def test_the_report_names_methods_as_methods_does(method):
    model = attach(tiny_llama(), method, task="causal_lm", **method_inputs(method, tiny_batch("llama")))
    report = parameter_report(model, measure_size=False)
    assert report.method == ("lora" if method in READ_AS_LORA else method)
