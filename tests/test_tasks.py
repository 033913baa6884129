"""One task table and one name per method: the CLI, the config, backbones, methods, reports and shipping agree."""

from __future__ import annotations

import pytest

from conftest import tiny_llama
from peftprompt import METHODS, attach, default_config, parameter_report
from peftprompt.cli import build_parser
from peftprompt.errors import InputError
from peftprompt.methods import MERGEABLE_METHODS, METHOD_DESCRIPTIONS, PROMPT_LEARNING_METHODS, method_name
from peftprompt.tasks import HEAD_NAMES, TASK_NAMES, TASKS, TRAINABLE_TASKS, get_task, infer_task, task_for_peft_type
from peftprompt.training.config import load_config
from peftprompt.training.shipping import write_model_card

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


def test_one_name_per_method():
    assert tuple(METHOD_DESCRIPTIONS) == METHODS
    assert set(MERGEABLE_METHODS) | set(PROMPT_LEARNING_METHODS) | {"full"} == set(METHODS)
    assert PROMPT_LEARNING_METHODS == ("prefix", "prompt", "ptuning")
    for method in METHODS[:-1]:
        config = default_config(tiny_llama(), method, task="causal_lm")
        assert method_name(config.peft_type) == method  # an enum member (or BitFit's registered string)
        assert method_name(str(getattr(config.peft_type, "value", config.peft_type))) == method  # as saved on disk


@pytest.mark.parametrize("method", METHODS)
def test_the_report_names_methods_as_methods_does(method):
    report = parameter_report(attach(tiny_llama(), method, task="causal_lm"), measure_size=False)
    assert report.method == method
