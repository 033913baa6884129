"""Continual learning: the tasks and their splits, the accuracy-matrix scores, replay, routing, adapters per task, and
every strategy end to end on a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch

from peftprompt import attach, load_backbone
from peftprompt.continual import (
    TASK_NAMES,
    CentroidRouter,
    ContinualData,
    LinearRouter,
    OrthogonalLoRAPenalty,
    ReplayMemory,
    average_accuracy,
    backward_transfer,
    continual_scores,
    forgetting,
    label_space,
    load_router,
    load_task,
)
from peftprompt.continual.learner import predict, trained_labels_only
from peftprompt.errors import InputError

from conftest import REPO


def test_label_space_shares_the_star_labels_and_keeps_sst2_apart():
    space = label_space()
    assert len(space) == 25 and len(set(space)) == 25
    amazon, yelp, sst2 = (load_task(name, train_size=5, test_size=5) for name in ("amazon", "yelp", "sst2"))
    assert amazon.label_ids == yelp.label_ids == [space.index(f"stars/{label}") for label in
                                                  ("very negative", "negative", "neutral", "positive", "very positive")]
    assert [space[i] for i in sst2.label_ids] == ["sst2/negative", "sst2/positive"]
    assert not set(sst2.label_ids) & set(amazon.label_ids)


@pytest.mark.parametrize(("name", "rows"), [("yelp", 5000), ("dbpedia", 7600)])
def test_single_file_tasks_split_disjointly_and_always_the_same(name, rows):
    task, again = load_task(name), load_task(name, seed=123)  # the run's seed does not move the split
    assert len(task.test) == round(0.2 * rows) and len(task.train) + len(task.test) == rows
    assert task.test == again.test and task.train == again.train
    assert not {text for text, _ in task.train} & {text for text, _ in task.test}
    assert task.test_dropped_as_training == 0  # measured: no test text repeats a training text


def test_sampling_is_seeded_and_keeps_labels_of_the_task():
    first, same, other = (load_task("agnews", 50, 20, seed=s) for s in (0, 0, 1))
    assert first.train == same.train and first.train != other.train
    assert len(first.train) == 50 and len(first.test) == 20
    assert {label for _, label in first.train + first.test} <= set(first.label_ids)


def test_a_bad_row_is_named_and_a_test_row_seen_in_training_is_dropped(tmp_path, monkeypatch):
    from peftprompt.data import data_root

    folder = tmp_path / "cl_benchmark"
    folder.mkdir()
    for name in ("agnews_labels.json", "agnews_test.json"):
        (folder / name).write_text((data_root() / "cl_benchmark" / name).read_text())
    rows = [{"label": "World", "sentence": "fine"}, {"label": "Weather", "sentence": "not a label"}]
    (folder / "agnews_train.json").write_text(json.dumps(rows))
    monkeypatch.setenv("PEFTPROMPT_DATA", str(tmp_path))
    with pytest.raises(InputError, match=r"agnews_train\.json: .*row 2: field 'label' must be one of .*'Weather'"):
        load_task("agnews")
    test_rows = [{"label": "World", "sentence": "Fine!"}, {"label": "Sports", "sentence": "new"}]
    (folder / "agnews_test.json").write_text(json.dumps(test_rows))
    (folder / "agnews_train.json").write_text(json.dumps(rows[:1]))
    task = load_task("agnews")
    assert task.test == [("new", 1)] and task.test_dropped_as_training == 1  # "Fine!" is the training row "fine"
    (folder / "agnews_train.json").write_text('[{"label": "World", "sentence": "a"},\n{"label": }]')
    with pytest.raises(InputError, match=r"agnews_train\.json:2: not valid JSON"):
        load_task("agnews")


def test_options_name_the_data_key_they_refuse():
    with pytest.raises(InputError, match=r"data\.strategy.*one of sequential"):
        ContinualData(strategy="ewc", tasks=["agnews"])
    with pytest.raises(InputError, match=r"data\.tasks.*each task once"):
        ContinualData(strategy="replay", tasks=["agnews", "agnews"])
    with pytest.raises(InputError, match=r"data\.tasks\.1.*got 'agnwes' \(did you mean 'agnews'\?\)"):
        ContinualData(strategy="replay", tasks=["agnews", "agnwes"])
    with pytest.raises(InputError, match=r"data\.replay_fraction' must be in \[0, 1\], got 1\.5"):
        ContinualData(strategy="replay", tasks=["agnews"], replay_fraction=1.5)
    with pytest.raises(InputError, match=r"unknown key 'data\.replay_fractoin' \(did you mean 'data\.replay_frac"):
        ContinualData(strategy="replay", tasks=["agnews"], replay_fractoin=0.1)
    with pytest.raises(InputError, match=r"data\.router_layers.*one of all, last"):
        ContinualData(strategy="adapter_per_task", tasks=["agnews"], router_layers="middle")
    with pytest.raises(InputError, match=r"data\.orthogonal_weight.*>= 0"):
        ContinualData(strategy="orthogonal_lora", tasks=["agnews"], orthogonal_weight=-1)
    options = ContinualData(strategy="osf", tasks=["agnews", "yelp", "sst2"])
    assert [options.osf_rank(i) for i in range(3)] == pytest.approx([0.3, 0.5, 0.7])
    five = ContinualData(strategy="osf", tasks=["dbpedia", "amazon", "agnews", "yelp", "sst2"])
    assert [five.osf_rank(i) for i in range(5)] == [0.3, 0.4, 0.5, 0.6, 0.7]  # as recorded: no 0.39999999999999997


def test_the_data_section_knows_the_tasks_and_the_config_it_needs():
    from peftprompt.training import load_config
    from peftprompt.training.data_config import CONTINUAL_TASKS

    assert CONTINUAL_TASKS == TASK_NAMES  # the config layer cannot import peftprompt.continual: kept equal here
    config = REPO / "recipes/configs/minilm/continual_osf.yaml"
    with pytest.raises(InputError, match=r"'orthogonal_lora' trains LoRA adapters: set method: lora .*osf\.yaml:6\)$"):
        load_config(config, ["data.strategy=orthogonal_lora"])  # the method's line: that is what to change
    for overrides, field in ((["task=token_cls"], "task"), (["resume_from=latest"], "resume_from"),
                             (["data.strategy=adapter_per_task", "method=full"], "method")):
        with pytest.raises(InputError) as refused:
            load_config(config, overrides)
        assert refused.value.field == field


# after task 0: 0.9 on task 0; after 1: 0.8, 0.7; after 2: 0.6, 0.75, 0.85
MATRIX = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.75, 0.85]]


def test_scores_of_a_hand_made_matrix():
    assert average_accuracy(MATRIX) == pytest.approx((0.6 + 0.75 + 0.85) / 3)
    assert backward_transfer(MATRIX) == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    # task 0: best before the last task 0.9 -> 0.6; task 1: best 0.7 -> 0.75 (a gain: -0.05)
    assert forgetting(MATRIX) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.75)) / 2)
    assert continual_scores([[0.5, 0.7]]) == {"average_accuracy": pytest.approx(0.6), "backward_transfer": None,
                                              "forgetting": None}
    with pytest.raises(ValueError, match=r"entry \[1\]\[1\]"):
        backward_transfer([[0.9, None, None], [0.8, None, None], [0.6, 0.7, 0.8]])


def test_replay_keeps_the_stated_fraction_of_each_task_and_mixes_all_of_it():
    memory = ReplayMemory(fraction=0.05, seed=0)
    first = [("a", i) for i in range(200)]
    second = [("b", i) for i in range(100)]
    kept = memory.add(first)
    assert len(kept) == 10 and set(kept) <= set(first)
    mixed = memory.mix(second)
    assert len(mixed) == 110 and sorted(mixed) == sorted(second + kept)
    memory.add(second)
    assert len(memory) == 15 and sum(example[0] == "b" for example in memory.kept) == 5
    assert ReplayMemory(0.05, seed=0).add(first) == kept and ReplayMemory(0.05, seed=1).add(first) != kept
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ReplayMemory(1.2)


@pytest.mark.parametrize("kind", [LinearRouter, CentroidRouter])
def test_router_picks_the_task_of_separable_clusters_and_survives_a_round_trip(kind, tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5
    clusters = {name: centres[i] + 0.5 * torch.randn(40, 8, generator=generator)
                for i, name in enumerate(("news", "reviews", "films"))}
    router = kind()
    for name, points in clusters.items():
        router.add_task(name, points[:20])
    for name, points in clusters.items():
        assert router.route(points[20:]) == [name] * 20
    loaded = load_router(router.save(tmp_path / "router.safetensors"))
    assert type(loaded) is kind and loaded.tasks == ["news", "reviews", "films"]
    for name in kind.STATE:
        assert torch.equal(getattr(loaded, name), getattr(router, name))
    assert loaded.route(clusters["films"][20:]) == ["films"] * 20
    with pytest.raises(ValueError, match="already added"):
        router.add_task("news", clusters["news"])
    with pytest.raises(ValueError, match="dimension 4, the router's are 8"):
        router.add_task("forum", torch.ones(3, 4))
    other = LinearRouter if kind is CentroidRouter else CentroidRouter
    with pytest.raises(ValueError, match=f"holds a {kind.__name__}, not a {other.__name__}"):
        other.load(tmp_path / "router.safetensors")


def test_the_linear_router_follows_a_task_spread_over_opposite_topics():
    """A task whose texts sit at two opposite topics has a meaningless centroid; a linear router still finds it."""
    generator = torch.Generator().manual_seed(0)
    noise = lambda n: 0.3 * torch.randn(n, 6, generator=generator)  # noqa: E731
    axis = torch.eye(6)
    spread = torch.cat([3 * axis[0] + noise(40), -3 * axis[0] + noise(40)])[torch.randperm(80, generator=generator)]
    focused = 3 * axis[1] + noise(80)
    scores = {}
    for kind in (LinearRouter, CentroidRouter):
        router = kind()
        router.add_task("spread", spread[:40])
        router.add_task("focused", focused[:40])
        picked = router.route(torch.cat([spread[40:], focused[40:]]))
        scores[kind] = sum(p == want for p, want in zip(picked, ["spread"] * 40 + ["focused"] * 40)) / 80
    assert scores[LinearRouter] == 1.0
    assert scores[CentroidRouter] < 0.9


def test_switching_the_adapter_switches_the_predictions(tiny_bert):

    model, tokenizer = load_backbone(str(tiny_bert), task="seq_cls", num_labels=25)
    model = attach(model, "lora", task="seq_cls", adapter_name="first")
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]))
    with torch.no_grad():  # make the two adapters (and their heads) different
        for name, parameter in model.named_parameters():
            if ".second" in name:
                parameter.add_(torch.randn_like(parameter))
    texts = [f"sentence number {i} about {topic}" for i in range(16) for topic in ("news", "stars")]
    model.set_adapter("first")
    first = predict(model, tokenizer, texts, max_length=16, batch_size=8)
    model.set_adapter("second")
    second = predict(model, tokenizer, texts, max_length=16, batch_size=8)
    model.set_adapter("first")
    assert predict(model, tokenizer, texts, max_length=16, batch_size=8) == first
    assert first != second
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".first" in n for n in trainable), "only the active adapter (and its head) trains"


def test_routed_accuracy_uses_the_picked_adapter_and_predicts_each_row_once(monkeypatch):
    from types import SimpleNamespace

    from peftprompt.continual import learner

    tasks = [SimpleNamespace(name="news", label_ids=[0, 1], test=[("news 0", 0), ("news 1", 1), ("news 2", 0),
                                                                  ("news 3", 1)]),
             SimpleNamespace(name="stars", label_ids=[2, 3], test=[("stars 0", 2), ("stars 1", 3)])]
    truth = {text: label for task in tasks for text, label in task.test}
    calls = []

    def fake_predict(model, tokenizer, texts, max_length, batch_size, labels=None):
        calls.extend((model.active, text) for text in texts)  # right with the text's own adapter, else labels[0]
        return [truth[text] if text.startswith(model.active) else labels[0] for text in texts]

    class Model:
        active = None

        def set_adapter(self, name):
            self.active = name

    class FixedRouter:  # picks the adapters of `picks[task]`, one per test row
        def __init__(self, picks):
            self.picks = picks

        def route(self, embeddings):
            return self.picks[int(embeddings[0])]

    monkeypatch.setattr(learner, "predict", fake_predict)
    run = learner.ContinualLearner.__new__(learner.ContinualLearner)
    run.tokenizer, run.config = None, SimpleNamespace(max_length=8, per_device_eval_batch_size=4)
    run._test_embeddings = {"news": torch.zeros(4, 1), "stars": torch.ones(2, 1)}
    routers = {"one_miss": FixedRouter({0: ["news", "stars", "news", "news"], 1: ["stars", "stars"]}),
               "two_misses": FixedRouter({0: ["news", "news", "stars", "stars"], 1: ["stars", "news"]})}
    measured = run._evaluate_adapters(Model(), routers, None, tasks)
    assert measured["given"] == [1.0, 1.0]
    assert measured["routing:one_miss"] == [0.75, 1.0] and measured["routing:two_misses"] == [0.5, 0.5]
    # a row sent to the other task's adapter is predicted among that task's labels: wrong
    assert measured["routed:one_miss"] == [0.75, 1.0] and measured["routed:two_misses"] == [0.5, 0.5]
    assert len(calls) == len(set(calls)), "no row is predicted twice with the same adapter"
    assert ("stars", "news 1") in calls and ("news", "stars 1") in calls


def test_training_can_range_over_some_labels_and_predictions_too(tiny_bert):
    model, tokenizer = load_backbone(str(tiny_bert), task="seq_cls", num_labels=25)
    model = attach(model, "lora", task="seq_cls")
    batch = tokenizer(["a review", "a longer news story"], padding=True, return_tensors="pt")
    with trained_labels_only(model, [4, 5, 6]):
        model.train()
        logits = model(**batch).logits
        assert torch.isfinite(logits[:, 4:7]).all() and torch.isinf(logits[:, :4]).all()
        assert torch.isinf(logits[:, 7:]).all()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([4, 6]))
        assert torch.isfinite(loss)
        model.eval()
        assert torch.isfinite(model(**batch).logits).all()  # evaluation is never masked
    model.train()
    assert torch.isfinite(model(**batch).logits).all()  # the mask is gone after the block
    texts = [f"text {i}" for i in range(12)]
    assert set(predict(model, tokenizer, texts, max_length=8, batch_size=4, labels=[7, 9])) <= {7, 9}


def test_a_single_head_trains_over_the_labels_seen_so_far():
    from peftprompt.continual import ContinualLearner
    from peftprompt.training import load_config

    config = load_config(REPO / "recipes/configs/minilm/continual_sequential.yaml", ["data.tasks=[agnews,sst2]"])
    tasks = [load_task(name, 5, 5) for name in ("agnews", "sst2")]
    learner = ContinualLearner(config, tasks)
    assert learner._trained_labels(0) == [0, 1, 2, 3]
    assert learner._trained_labels(1) == [0, 1, 2, 3, 23, 24]
    for strategy, expected in (("adapter_per_task", [23, 24]), ("joint", [0, 1, 2, 3, 23, 24])):
        other = config.replace(data={**config.data.model_dump(), "strategy": strategy})
        assert ContinualLearner(other, tasks)._trained_labels(1) == expected


class LoraLayer(torch.nn.Module):
    """Stands in for a PEFT LoRA layer: its down-projection is ``<path>.lora_A.default.weight``."""

    def __init__(self, weight: list[list[float]], trainable: bool = True):
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(len(weight[0]), len(weight), bias=False)})
        self.lora_A["default"].weight = torch.nn.Parameter(torch.tensor(weight), requires_grad=trainable)


def lora_stand_in(query: list[list[float]], value: list[list[float]]) -> torch.nn.Module:
    model = torch.nn.Module()
    model.query, model.value = LoraLayer(query), LoraLayer(value)
    model.frozen = LoraLayer([[5.0, 5.0, 5.0]], trainable=False)  # not this task's: never penalised or remembered
    return model


def test_the_penalty_is_the_weighted_overlap_with_every_earlier_task():
    penalty = OrthogonalLoRAPenalty(weight=0.5)
    first = lora_stand_in([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]])
    assert float(penalty(first).detach()) == 0.0  # nothing earlier yet
    penalty.remember(first)
    assert sorted(penalty.earlier) == ["query", "value"] and penalty.earlier["query"].shape == (2, 3)
    orthogonal = lora_stand_in([[0.0, 0.0, 3.0], [0.0, 0.0, -2.0]], [[1.0, -1.0, 0.0]])
    assert float(penalty(orthogonal).detach()) == 0.0
    overlapping = lora_stand_in([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 2.0, -3.0]])
    # query: [[1, 0], [1, 0]] -> 2; value: [[-3]] -> 3; weight 0.5
    value = penalty(overlapping)
    assert float(value.detach()) == pytest.approx(2.5)
    value.backward()
    assert overlapping.query.lora_A["default"].weight.grad.abs().sum() > 0
    assert overlapping.frozen.lora_A["default"].weight.grad is None
    penalty.remember(overlapping)  # stacked onto the first task's rows
    assert penalty.earlier["query"].shape == (4, 3) and not penalty.earlier["query"].requires_grad
    # against itself too: query 2 + 1, value 13
    assert float(penalty(overlapping).detach()) == pytest.approx(2.5 + 0.5 * (3 + 13))
