"""The typed config layer: each recipe's ``data`` section (picked by the config, validated once in `load_config`) and
the errors it gives: the field path, the file and line of the key (nested keys and list items too) or the override,
the constraint, and a did-you-mean for an unknown key."""

from __future__ import annotations

import pytest
import yaml

from peftprompt.errors import InputError
from peftprompt.training import TrainConfig, load_config
from peftprompt.training.data_config import ClassificationData, ContinualData, NerData, SelfAskData
from peftprompt.training.recipe import parse_recipe_args

from conftest import REPO, write

SELFASK = """\
task: causal_lm
method: lora
data:
  sources: [musique]
  mode: {mode}
  eval_max_depth: {depth}
  eval_answerers:
    - retriever
    - {answerer}
max_steps: 10
"""
CONTINUAL = """\
task: seq_cls
num_labels: 25
method: lora
data:
  strategy: replay
  tasks:
    - agnews
    - {task}
  replay_fraction: {fraction}
"""


def selfask(tmp_path, mode="flat", depth=2, answerer="model"):
    return write(tmp_path, SELFASK.format(mode=mode, depth=depth, answerer=answerer))


def refused(path, overrides=()) -> InputError:
    with pytest.raises(InputError) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "config, section",
    [
        ("smollm2/selfask_lora.yaml", SelfAskData),
        ("smollm2/reader_lora.yaml", SelfAskData),
        ("smollm2/selfask_openbook_lora.yaml", SelfAskData),
        ("minilm/sst2_lora.yaml", ClassificationData),
        ("minilm/conll03_lora.yaml", NerData),
        ("minilm/continual_osf.yaml", ContinualData),
        ("minilm/continual_adapter_per_task.yaml", ContinualData),
    ],
)
def test_every_shipped_config_gets_its_recipes_section(config, section, tmp_path):
    loaded = load_config(REPO / "recipes/configs" / config)
    assert type(loaded.data) is section
    saved = loaded.save(tmp_path / "train_config.yaml")
    assert set(yaml.safe_load(saved.read_text())["data"]) == set(section.model_fields)  # every key, defaults too
    assert load_config(saved) == loaded


def test_selfask_section_defaults_and_typed_values(tmp_path):
    data = load_config(None, ["task=causal_lm"]).data
    assert isinstance(data, SelfAskData)
    assert (data.mode, data.leaf_episodes, data.packing, data.eval_answerers, data.eval_max_depth) == (
        "recursive",
        True,
        "auto",
        ["operators+retriever"],
        2,
    )
    data = load_config(
        selfask(tmp_path), ["data.generate_eval=1e1", "data.eval_answerers=retriever", "data.reader_unanswerable=0"]
    ).data
    assert (data.generate_eval, data.eval_answerers, data.reader_unanswerable) == (10, ["retriever"], 0.0)
    assert isinstance(data.reader_unanswerable, float)


def test_a_wrong_type_names_the_field_file_and_line(tmp_path):
    path = selfask(tmp_path, depth="deep")
    err = refused(path)
    assert str(err) == f"field 'data.eval_max_depth' expects int, got 'deep' ({path}:6)"
    assert (err.file, err.line, err.field) == (str(path), 6, "data.eval_max_depth")
    err = refused(selfask(tmp_path), ["data.leaf_episodes=yes please"])
    assert (
        str(err) == "field 'data.leaf_episodes' expects bool, got 'yes please' (override 'data.leaf_episodes=yes "
        "please')"
    )
    assert err.field == "data.leaf_episodes" and err.line is None
    assert "field 'data.generate_eval' expects int, got True" in str(refused(path, ["data.generate_eval=true"]))


def test_an_out_of_range_value_names_the_constraint_file_and_line(tmp_path):
    path = selfask(tmp_path, depth=-1)
    err = refused(path)
    assert str(err) == f"field 'data.eval_max_depth' must be >= 0, got -1 ({path}:6)"
    path = write(tmp_path, CONTINUAL.format(task="yelp", fraction=1.5))
    err = refused(path)
    assert str(err) == f"field 'data.replay_fraction' must be in [0, 1], got 1.5 ({path}:9)"
    assert (err.line, err.field) == (9, "data.replay_fraction")


def test_a_bad_choice_in_a_list_names_the_item_and_its_line(tmp_path):
    path = write(tmp_path, CONTINUAL.format(task="agnwes", fraction=0.1))
    err = refused(path)
    assert str(err) == (
        f"field 'data.tasks.1' must be one of agnews, amazon, yelp, dbpedia, sst2, got 'agnwes' "
        f"(did you mean 'agnews'?) ({path}:8)"
    )
    assert (err.line, err.field) == (8, "data.tasks.1")
    path = selfask(tmp_path, mode="deep")
    assert str(refused(path)) == f"field 'data.mode' must be one of flat, recursive, mix, got 'deep' ({path}:5)"
    path = selfask(tmp_path, answerer="''")
    assert str(refused(path)) == f"field 'data.eval_answerers.1' expects str, got '' ({path}:9)"


def test_an_unknown_key_gets_a_hint_file_and_line(tmp_path):
    path = write(tmp_path, "task: causal_lm\ndata:\n  sources: [musique]\n  generate_evals: 5\n")
    err = refused(path)
    assert str(err) == f"{path}:4: unknown key 'data.generate_evals' (did you mean 'data.generate_eval'?)"
    assert (err.file, err.line, err.field) == (str(path), 4, "data.generate_evals")
    err = refused(path, ["data.eval_knowlege=all", "data.mode=deep"])
    assert str(err).startswith(f"{path}:4: unknown key 'data.generate_evals'")  # unknown keys first, in given order
    err = refused(None, ["num_labels=2", "data.stratgy=replay"])  # no close key: the section says what it takes
    assert str(err) == (
        "override 'data.stratgy=replay': unknown key (a classification data section, picked by task "
        "seq_cls without data.strategy; its keys: eval_min_words)"
    )
    assert "a NER data section, picked by task token_cls; its keys: none" in str(
        refused(None, ["task=token_cls", "num_labels=9", "data.eval_min_words=3"])
    )


def test_a_missing_key_and_a_whole_section_of_the_wrong_type(tmp_path):
    path = write(tmp_path, "task: seq_cls\nnum_labels: 25\ndata:\n  strategy: joint\n")
    err = refused(path)
    assert str(err) == (
        f"field 'data.tasks' is required (a non-empty list of names from agnews, amazon, yelp, "
        f"dbpedia, sst2) ({path}:3)"
    )
    err = refused(write(tmp_path, "task: causal_lm\ndata: [musique]\n"))
    assert str(err).startswith("field 'data' expects a mapping, got ['musique'] (") and err.line == 2


def test_sections_refuse_what_does_not_go_with_the_rest_of_the_config(tmp_path):
    path = selfask(tmp_path)
    err = refused(path, ["method=prefix", "method_args={}", "data.packing=true"])
    assert str(err).startswith("data.packing=true with method prefix: its packed episodes would attend to each other")
    assert str(err).endswith("(override 'data.packing=true')") and err.field == "data.packing"
    path = write(tmp_path, CONTINUAL.format(task="yelp", fraction=0.1).replace("strategy: replay", "strategy: osf"))
    err = refused(path)
    assert str(err) == f"strategy 'osf' trains PEFT's OSF adapters: set method: osf (got 'lora') ({path}:3)"
    err = refused(selfask(tmp_path), ["data.sources=[]"])
    assert err.field == "data.sources" and "nothing to train on" in str(err)
    assert (
        load_config(selfask(tmp_path), ["data.sources=[]", "data.reader_sources=[musique_context]"]).data.sources == []
    )


def test_direct_construction_and_replace_validate_the_same_way():
    config = TrainConfig(task="seq_cls", num_labels=25, data={"strategy": "joint", "tasks": ["sst2"]})
    assert isinstance(config.data, ContinualData) and config.data.train_per_task == 2000
    with pytest.raises(InputError, match=r"^field 'data.test_per_task' must be >= 1, got 0$"):
        config.replace(data={"strategy": "joint", "tasks": ["sst2"], "test_per_task": 0})
    with pytest.raises(InputError, match=r"^unknown key 'data.eval_min_words'"):
        TrainConfig(task="causal_lm", data=ClassificationData(eval_min_words=3))  # a section the task does not pick
    assert config.replace(output_dir="elsewhere").data == config.data
    assert set(TrainConfig.model_json_schema()["properties"]) == set(TrainConfig.model_fields)


def test_a_recipe_refuses_a_config_of_another_recipe(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_recipe_args(
            "continual", ["--config", str(REPO / "recipes/configs/minilm/sst2_lora.yaml")], data=ContinualData
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert (
        "this recipe reads a continual data section (picked by data.strategy, with task seq_cls), but the "
        "config's is a classification one (task seq_cls)"
        in err
        and "sst2_lora.yaml" in err
    )
    config = parse_recipe_args(
        "sst2",
        ["--config", str(REPO / "recipes/configs/minilm/sst2_lora.yaml"), "data.eval_min_words=10"],
        data=ClassificationData,
    )
    assert config.data.eval_min_words == 10
