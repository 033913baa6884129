"""One task table and one name per method: the CLI, the config, backbones, methods, reports and shipping agree."""

from __future__ import annotations

import pytest

from peftprompt import METHODS, attach, default_config
from peftprompt.cli import build_parser
from peftprompt.errors import InputError
from peftprompt.method_matrix import tiny_model
from peftprompt.methods import (
    CORE_METHODS,
    MERGEABLE_METHODS,
    METHOD_DESCRIPTIONS,
    PROMPT_LEARNING_METHODS,
    REFUSED_METHODS,
    method_name,
)
from peftprompt.tasks import HEAD_NAMES, TASK_NAMES, TASKS, TRAINABLE_TASKS, get_task, infer_task, task_for_peft_type
from peftprompt.training.config import load_config
from peftprompt.training.shipping import write_model_card

from conftest import tiny_llama

VALID = "seq_cls, token_cls, causal_lm, feature"


def test_the_table_knows_each_task_once():
    assert TASK_NAMES == ("seq_cls", "token_cls", "causal_lm", "feature")
    assert TRAINABLE_TASKS == ("seq_cls", "token_cls", "causal_lm")
    assert HEAD_NAMES == ("classifier", "score", "lm_head")
    for name, task in TASKS.items():
        assert get_task(name) is task and task.auto_class.__name__ == task.auto_class_name
        assert task_for_peft_type(task.peft_task_type) is task
        assert task_for_peft_type(task.peft_task_type.value) is task
    assert task_for_peft_type("QUESTION_ANS") is None
    assert infer_task(tiny_llama()) == "causal_lm"
    # GPT-2's causal LM is no ...ForCausalLM: its auto class tells (as feature, prompt tuning lost its labels' shift)
    assert infer_task(tiny_model("gpt2")) == "causal_lm"
    assert infer_task(tiny_model("gpt2").transformer) == "feature"


def test_unknown_task_is_one_line_listing_the_valid_names():
    with pytest.raises(InputError, match=rf"^unknown task 'ner'; choose one of {VALID}$"):  # a ValueError
        get_task("ner")
    with pytest.raises(ValueError, match=rf"^unknown task 'ner'; choose one of {VALID}$"):
        default_config(tiny_llama(), "lora", task="ner")
    with pytest.raises(ValueError, match=rf"^unknown task 'ner'; choose one of {VALID}$"):
        write_model_card("unused", base_model="minilm", method="lora", task="ner", trainable_params=1,
                         total_params=2, adapter_bytes=1, metrics={}, command="x")


def test_config_accepts_the_trainable_tasks_of_the_table():
    with pytest.raises(ValueError) as err:
        load_config(None, ["task=ner"])
    message = str(err.value)
    assert "\n" not in message and "field 'task' must be one of seq_cls, token_cls, causal_lm, got 'ner'" in message
    assert load_config(None, ["task=token_cls", "num_labels=9"]).task == "token_cls"
    with pytest.raises(ValueError, match="num_labels is required for task 'token_cls'"):
        load_config(None, ["task=token_cls"])


@pytest.mark.parametrize("command", [["info"], ["export", "--adapter", "a", "--out", "b"]])
def test_cli_task_choices_come_from_the_table(command, capsys):
    parser = build_parser()
    assert parser.parse_args([*command, "--task", "feature"]).task == "feature"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*command, "--task", "ner"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'ner'" in error and all(f"'{name}'" in error for name in TASK_NAMES)


# LoRA presets that differ from LoRA only in their targets or their optimiser: their configs read "lora"
READ_AS_LORA = ("lora_all_linear", "loraplus", "lora_fa")


def test_one_name_per_method():
    assert tuple(METHOD_DESCRIPTIONS) == METHODS and all(METHOD_DESCRIPTIONS.values())
    assert METHODS[: len(CORE_METHODS) - 1] == CORE_METHODS[:-1] and METHODS[-1] == "full"
    assert not set(METHODS) & set(REFUSED_METHODS)
    assert PROMPT_LEARNING_METHODS == ("prefix", "prompt", "ptuning", "cartridge")
    assert not set(MERGEABLE_METHODS) & {*PROMPT_LEARNING_METHODS, "adaption_prompt", "full"}
    for method in METHODS[:-1]:
        config = default_config(tiny_llama(), method, task="causal_lm")
        expected = "lora" if method in READ_AS_LORA else method
        assert method_name(config) == method_name(config.to_dict()) == expected  # in memory and as saved on disk
        if config.peft_type != "LORA":  # the PEFT type alone names every method but LoRA's presets
            assert method_name(config.peft_type) == method_name(str(config.peft_type.value)) == method


@pytest.mark.parametrize("method", REFUSED_METHODS)
def test_refused_methods_say_why(method):
    with pytest.raises(InputError, match=rf"^method '{method}' is refused: .*(task_ids|adapters|cpt_)") as refused:
        attach(tiny_llama(), method, task="causal_lm")
    assert refused.value.field == "method"
