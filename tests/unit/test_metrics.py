"""Metrics on small hand-made examples: accuracy, entity F1 (IOB1 / IOB2, conlleval / strict), SQuAD EM and F1; the
packaged `evaluate` modules loaded offline, combined, and a user's own module by path."""

from __future__ import annotations

import ast
import socket
import sys
from pathlib import Path

import pytest

import peftprompt.metrics
from peftprompt.errors import InputError
from peftprompt.metrics import (
    MODULES_DIR,
    PACKAGED_METRICS,
    accuracy,
    combine_metrics,
    entity_f1,
    exact_match,
    flat_scores,
    iob1_to_iob2,
    load_metric,
    metric_script,
    normalize_answer,
    qa_scores,
    token_f1,
)
from peftprompt.training import load_config

from conftest import REPO, script_module


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no references"):
        accuracy([], [])


def test_entity_f1_iob2():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold: PER, LOC, ORG, MISC; predicted: PER, ORG (wrong type for the LOC), ORG, MISC (too short) -> 2 of 4 right
    scores = entity_f1(pred, gold)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert (scores["gold_entities"], scores["predicted_entities"]) == (4, 4)
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "gold_entities": 1}
    assert scores["per_type"]["ORG"]["precision"] == 0.5 and scores["per_type"]["ORG"]["recall"] == 1.0
    assert scores["per_type"]["LOC"]["f1"] == 0.0 and scores["per_type"]["MISC"]["f1"] == 0.0
    assert entity_f1(gold, gold)["f1"] == 1.0


def test_iob1_to_iob2():
    assert iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"
    ]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC"]
    assert iob1_to_iob2(iob2) == iob2  # IOB2 passes through unchanged


def test_entity_f1_iob1_scheme_changes_the_strict_score():
    # IOB1: an entity starts with I-; B- only separates two adjacent entities of the same type.
    gold = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]  # PER[0:2], PER[2:3], LOC[4:5]
    pred = [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]]  # PER[0:3], LOC[4:5] -> only LOC right
    right = entity_f1(pred, gold, scheme="IOB1", mode="strict")
    assert right["precision"] == 0.5 and right["recall"] == pytest.approx(1 / 3) and right["f1"] == pytest.approx(0.4)
    assert (right["gold_entities"], right["predicted_entities"]) == (3, 2)
    # Read as IOB2, strict matching finds only the B-PER entity in gold and nothing in the prediction.
    wrong = entity_f1(pred, gold, scheme="IOB2", mode="strict")
    assert (wrong["precision"], wrong["recall"], wrong["f1"]) == (0.0, 0.0, 0.0)
    assert (wrong["gold_entities"], wrong["predicted_entities"]) == (1, 0)
    # conlleval (default mode) already reads an I- after O as an entity start: both schemes agree.
    assert entity_f1(pred, gold, scheme="IOB1")["f1"] == pytest.approx(0.4)
    assert entity_f1(pred, gold, scheme="IOB2")["f1"] == pytest.approx(0.4)


def test_entity_f1_ill_formed_iob2_prediction_default_vs_strict():
    gold = [["O", "B-PER", "I-PER"]]
    pred = [["O", "I-PER", "I-PER"]]  # a model's prediction that is not valid IOB2
    assert entity_f1(pred, gold)["f1"] == 1.0  # conlleval: I- after O starts the entity
    assert entity_f1(pred, gold, mode="strict")["f1"] == 0.0


def test_entity_f1_no_entities_anywhere():
    scores = entity_f1([["O", "O"]], [["O", "O"]])
    assert (scores["f1"], scores["gold_entities"], scores["per_type"]) == (0.0, 0, {})


@pytest.mark.parametrize(
    "pred, gold, kwargs, message",
    [
        ([["O"]], [["O"], ["O"]], {}, "1 predicted sentences for 2 gold sentences"),
        ([["O", "O"]], [["O"]], {}, "sentence 0: 2 predicted tags for 1 gold tags"),
        ([["B-PER", "X-PER"]], [["O", "O"]], {}, "predicted sentence 0, token 1: tag must be"),
        ([["O"]], [["O"]], {"scheme": "BIOES"}, "scheme must be one of IOB1, IOB2"),
        ([["O"]], [["O"]], {"mode": "lenient"}, "mode must be one of default, strict"),
    ],
)
def test_entity_f1_errors(pred, gold, kwargs, message):
    with pytest.raises(ValueError, match=message):
        entity_f1(pred, gold, **kwargs)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("An  Apple, a day.", "apple day"),
        ("The theater", "theater"),  # articles are whole words only
        ("Hyomyeong's", "hyomyeongs"),  # punctuation is dropped, not replaced by a space
        ("  the  ", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_with_aliases_and_normalisation():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower", "Paris"]) == 0.0
    assert exact_match("paris", ["Eiffel Tower", "Paris."]) == 1.0  # the best alias counts
    assert exact_match("G. Stanley Hall", "g stanley hall") == 1.0  # one answer as a string
    assert exact_match("the", ["a"]) == 1.0  # both normalise to nothing (SQuAD 2.0)
    with pytest.raises(ValueError, match="at least one gold answer"):
        exact_match("x", [])


def test_token_f1_with_aliases():
    assert token_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)  # P 1, R 1/2
    # "the city of Paris" -> [city, of, paris]; against "Paris": P 1/3, R 1 -> F1 1/2; "Lyon" gives 0
    assert token_f1("the city of Paris", ["Lyon", "Paris"]) == pytest.approx(0.5)
    assert token_f1("paris paris", ["Paris"]) == pytest.approx(2 / 3)  # repeated tokens count once per match
    assert token_f1("London", ["Paris"]) == 0.0
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("an", ["the"]) == 1.0


def test_qa_scores():
    scores = qa_scores(["Paris", "the Eiffel", "x"], [["Paris"], ["Eiffel Tower"], "y"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert scores["count"] == 3


IOB2_GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
IOB2_PRED = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
USER_MODULE = """import datasets
import evaluate


class ErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of wrong labels", citation="", inputs_description="",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"error_rate": sum(p != r for p, r in zip(predictions, references)) / len(references)}
"""


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: the modules must load from their files."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def user_module(tmp_path) -> Path:
    """A user's own evaluate module, as a folder holding <folder name>.py."""
    folder = tmp_path / "error_rate"
    folder.mkdir()
    (folder / "error_rate.py").write_text(USER_MODULE)
    return folder


def test_packaged_modules_load_offline_and_match_the_functions(no_network):
    scores = load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1])
    assert scores == {"accuracy": 0.75} == {"accuracy": accuracy([1, 0, 1, 1], [1, 1, 1, 1])}

    seqeval = load_metric("seqeval")
    scores = seqeval.compute(predictions=IOB2_PRED, references=IOB2_GOLD)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert (scores["gold_entities"], scores["predicted_entities"]) == (4, 4)
    assert scores == entity_f1(IOB2_PRED, IOB2_GOLD)
    # the scheme and mode options reach the module: IOB1 gold PER PER LOC, predicted PER LOC -> only LOC right
    iob1_pred, iob1_gold = [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]], [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    iob1 = seqeval.compute(predictions=iob1_pred, references=iob1_gold, scheme="IOB1", mode="strict")
    assert iob1["precision"] == 0.5 and iob1["recall"] == pytest.approx(1 / 3) and iob1["f1"] == pytest.approx(0.4)
    assert (iob1["gold_entities"], iob1["predicted_entities"]) == (3, 2)
    # read as IOB2, strict matching finds only gold's B-PER entity and nothing in the prediction
    strict = seqeval.compute(predictions=iob1_pred, references=iob1_gold, mode="strict")
    assert (strict["f1"], strict["gold_entities"], strict["predicted_entities"]) == (0.0, 1, 0)
    with pytest.raises(ValueError, match="predicted sentence 0, token 1: tag must be"):
        seqeval.compute(predictions=[["B-PER", "X-PER"]], references=[["O", "O"]])

    predictions, answers = ["Paris", "the Eiffel", "x"], [["Paris"], ["Eiffel Tower"], ["y"]]
    scores = load_metric("squad").compute(predictions=predictions, references=answers)
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert scores == qa_scores(predictions, answers) and scores["count"] == 3
    with pytest.raises(ValueError, match="at least one gold answer"):
        load_metric("squad").compute(predictions=["x"], references=[[]])


def test_each_metric_has_one_implementation():
    """The functions the package exports are the ones the module files call (compute_score.py), not copies."""
    from peftprompt.metrics.modules.accuracy import compute_score as accuracy_score
    from peftprompt.metrics.modules.seqeval import compute_score as seqeval_score
    from peftprompt.metrics.modules.squad import compute_score as squad_score

    assert peftprompt.metrics.accuracy is accuracy_score.accuracy
    assert peftprompt.metrics.entity_f1 is seqeval_score.entity_f1
    assert peftprompt.metrics.iob1_to_iob2 is seqeval_score.iob1_to_iob2
    assert (exact_match, token_f1, normalize_answer, qa_scores) == (
        squad_score.exact_match, squad_score.token_f1, squad_score.normalize_answer, squad_score.qa_scores)
    for name in PACKAGED_METRICS:
        source = (MODULES_DIR / name / f"{name}.py").read_text()
        assert "from .compute_score import" in source


def test_metrics_sit_below_training():
    """Nothing in peftprompt/metrics imports the engine, the data readers or self-ask; a module file imports only
    the standard library, datasets, evaluate, numpy, seqeval and its own compute_score.py (what evaluate's loader
    copies)."""
    allowed = set(sys.stdlib_module_names) | {"datasets", "evaluate", "numpy", "seqeval"}
    for path in sorted((REPO / "peftprompt" / "metrics").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [(0, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.level, node.module or "")]
            else:
                continue
            for level, name in names:
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                assert not name.startswith("peftprompt"), where
                if level == 0:
                    assert name.split(".")[0] in allowed, f"{where}: imports {name}"
                elif path.parent != MODULES_DIR.parent:
                    assert (level, name) == (1, "compute_score"), f"{where}: relative import {name}"


def test_evaluate_combine_packaged_and_user_module(no_network, user_module):
    combined = combine_metrics(["accuracy", user_module])
    assert combined.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1]) == {"accuracy": 0.75,
                                                                                    "error_rate": 0.25}
    # two packaged modules with the same key: evaluate.combine prefixes the module names
    twice = combine_metrics(["accuracy", MODULES_DIR / "accuracy"])
    assert twice.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1]) == {"accuracy_0_accuracy": 0.75,
                                                                                 "accuracy_1_accuracy": 0.75}


def test_user_module_by_file_or_folder(no_network, user_module, tmp_path):
    by_folder = load_metric(user_module)
    assert by_folder.compute(predictions=[0, 0, 0, 1], references=[0, 1, 1, 1]) == {"error_rate": 0.5}
    assert by_folder.compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1]) == {"error_rate": 0.25}
    script = tmp_path / "my_error_rate.py"
    script.write_text(USER_MODULE)
    assert load_metric(str(script)).compute(predictions=[0, 1], references=[1, 1]) == {"error_rate": 0.5}
    assert metric_script(user_module) == (user_module / "error_rate.py").resolve()
    # the packaged folders load by path with plain evaluate too
    import evaluate

    assert evaluate.load(str(MODULES_DIR / "accuracy")).compute(predictions=[1], references=[0]) == {"accuracy": 0.0}


@pytest.mark.parametrize("name, message", [
    ("acuracy", "metric 'acuracy' is neither a packaged metric (accuracy, seqeval, squad) nor an existing"),
    ("no/such/my_metric.py", "metric 'no/such/my_metric.py' is neither a packaged metric"),
    ("", "metric name or path is empty"),
])
def test_bad_metric_name_or_path(name, message):
    with pytest.raises(ValueError) as info:
        load_metric(name)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_metric_path_without_a_module(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metric folder .*empty' holds no empty.py"):
        load_metric(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .py evaluate module"):
        load_metric(tmp_path / "notes.txt")


def test_metrics_config_key(tmp_path, user_module):
    assert load_config(None, ["num_labels=2"]).metrics is None  # the recipe's default
    assert load_config(None, ["num_labels=2", "metrics=accuracy"]).metrics == ["accuracy"]
    config = load_config(None, ["num_labels=2", f"metrics=[seqeval, {user_module}]"])
    assert config.metrics == ["seqeval", str(user_module)]
    assert load_config(None, [f"metrics={config.metrics}", "num_labels=2"]).metrics == config.metrics

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("task: seq_cls\nnum_labels: 2\nmetrics: [accuracy, acuracy]\n")
    with pytest.raises(InputError) as info:
        load_config(yaml_file)
    text = str(info.value)
    assert "\n" not in text and info.value.field == "metrics" and info.value.line == 3
    assert text.startswith("field 'metrics': metric 'acuracy' is neither a packaged metric") and "run.yaml:3" in text
    with pytest.raises(InputError, match="field 'metrics' expects a non-empty list of strings or null, got \\[\\]"):
        load_config(None, ["num_labels=2", "metrics=[]"])
    with pytest.raises(InputError, match="field 'metrics': metric 'nope.py' is neither"):
        load_config(None, ["num_labels=2", "metrics=nope.py"])


def test_flat_scores():
    results = {"f1": 0.5, "count": 3, "per_type": {"PER": {"f1": 1.0}}, "name": "x", "values": [1, 2], "ok": True}
    assert flat_scores(results) == {"f1": 0.5, "count": 3, "per_type.PER.f1": 1.0}
    assert flat_scores(results, rename={"f1": "entity_f1"}, leave_out=("per_type",)) == {"entity_f1": 0.5, "count": 3}


def recipe(name: str):
    return script_module(REPO / "recipes" / f"{name}.py")


def test_recipes_score_through_the_config_metrics(no_network, user_module):
    """The recipes' default metrics give the keys and numbers they gave before evaluate modules; a user module adds
    its own keys."""
    sst2 = recipe("sst2_classification")
    records = [{"prediction": p, "label": l} for p, l in [(1, 1), (0, 1), (1, 1), (1, 1)]]
    assert sst2.label_metrics(sst2.DEFAULT_METRICS)(records, None) == {"accuracy": 0.75}
    assert sst2.label_metrics(["accuracy", str(user_module)])(records, None) == {"accuracy": 0.75, "error_rate": 0.25}

    conll = recipe("conll03_ner")
    label_id = {label: i for i, label in enumerate(conll.CONLL03_LABELS)}
    gold, pred = ["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "O"]  # PER found, LOC missed
    records = [{"predictions": [label_id[t] for t in pred], "labels": [label_id[t] for t in gold]}]
    assert conll.entity_metrics(conll.DEFAULT_METRICS)(records, None) == {
        "entity_precision": 1.0, "entity_recall": 0.5, "entity_f1": pytest.approx(2 / 3)}
