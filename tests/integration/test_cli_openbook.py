"""`peftprompt eval selfask --index`: open-book self-ask from the command line, scored with the benchmark's metrics
(`peftprompt.selfask.open_book`), on a tiny random Llama with SmolLM2's tokenizer and a six-passage MiniLM index;
`benchmarks/openbook.py` runs and scores with these same functions (no copies of its own); bad inputs are one line
naming the path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from peftprompt.cli import main
from peftprompt.recursive import Node, read_trees
from peftprompt.retrieval.index import PassageIndex
from peftprompt.retrieval.passages import OpenBookQuestion, Passage
from peftprompt.selfask import SelfAskRunner
from peftprompt.selfask.open_book import (
    open_book_faithfulness,
    open_book_record,
    per_kind,
    questions_from_trees,
    run_open_book,
    summarise_open_book,
    trace_passages,
)

from conftest import FILM_PASSAGES, REPO, script_module

QUESTIONS = [
    {"id": "q1", "question": "Where was the director of Jaws born?", "answer": "Cincinnati", "aliases": [],
     "meta": {"type": "compositional", "supporting_titles": ["Jaws (film)", "Steven Spielberg"]}, "children": []},
    {"id": "q2", "question": "Which film came out first, Jaws or Casino Royale?", "answer": "Jaws",
     "aliases": ["Jaws (film)"], "meta": {"type": "comparison",
                                          "supporting_titles": ["Jaws (film)", "Casino Royale (2006 film)"]},
     "children": []},
]
SUMMARY_KEYS = {"n", "em", "f1", "faithfulness", "support_recall", "follow_ups", "well_formed"}
PLANS = {  # the scripted decomposer's follow-ups ({k}: the k-th intermediate answer); the last answer is final
    "Where was the director of Jaws born?": ["Who directed Jaws?", "Where was {0} born?"],
    "Which film came out first, Jaws or Casino Royale?": [
        "When was Jaws released?", "When was Casino Royale released?",
        "Which is earlier: Jaws ({0}) or Casino Royale ({1})?"],  # an operator's template
}
READS = {"Who directed Jaws?": "Steven Spielberg", "Where was Steven Spielberg born?": "Cincinnati",
         "When was Jaws released?": "1975", "When was Casino Royale released?": "2006"}
FINAL = "So the final answer is:"


def scripted(prompts, max_new_tokens, banned=None):
    """A scripted model. Reading (a ``Context:`` prompt) it answers from `READS` only when the answer is in the
    passages it was given; self-asking it follows `PLANS`; asked for a final answer directly it says ``forced``."""
    outs = []
    for prompt in prompts:
        context, _, episode = prompt.rpartition("Question: ")
        question = episode.split("\n")[0]
        if "Context:" in prompt:
            answer = READS.get(question)
            outs.append(f" {answer}\n" if answer and answer in context[context.rfind("Context:"):] else " unknown\n")
            continue
        if prompt.endswith(FINAL):
            outs.append(" forced\n")
            continue
        plan = PLANS.get(question, [])
        answers = re.findall(r"Intermediate answer: (.*)\n", episode)
        if len(answers) < len(plan):
            opening = "" if answers else "Are follow up questions needed here: Yes.\n"
            outs.append(f"{opening}Follow up: {plan[len(answers)].format(*answers)}\nIntermediate answer:")
        else:
            outs.append(f"{FINAL} {answers[-1] if answers else 'unknown'}\n")
    return outs


@pytest.fixture
def scripted_model(monkeypatch):
    """Every `SelfAskRunner` (the decomposer's and the readers') generates with `scripted` instead of the model."""
    original = SelfAskRunner.__init__

    def init(self, model=None, tokenizer=None, *args, **kwargs):
        original(self, model, tokenizer, *args, **{**kwargs, "generate_fn": scripted})

    monkeypatch.setattr(SelfAskRunner, "__init__", init)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_smollm):
    """An index of `FILM_PASSAGES` (MiniLM), the questions as decomp-tree/v1 JSONL and two random LoRA adapters."""
    from transformers import AutoModelForCausalLM

    from peftprompt import attach, save_adapter

    root = tmp_path_factory.mktemp("openbook_cli")
    PassageIndex.build(FILM_PASSAGES, progress=False).save(root / "idx")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for seed, name in enumerate(("decomposer", "reader")):
        import torch

        torch.manual_seed(seed)
        save_adapter(attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora"), root / name)
    return root


def test_eval_selfask_with_an_index_writes_the_benchmarks_metrics(workdir, tiny_smollm, tmp_path, capsys,
                                                                  scripted_model):
    out = tmp_path / "openbook.json"
    argv = ["eval", "selfask", "--trees", str(workdir / "questions.jsonl"), "--index", str(workdir / "idx"),
            "--model", str(tiny_smollm), "--adapter", str(workdir / "decomposer"), "--reader-adapter",
            str(workdir / "reader"), "--k", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "open book" in printed and "support recall" in printed and "s / question" in printed
    results = json.loads(out.read_text())
    approaches = ["direct", "single_step", "few_shot_self_ask", "fine_tuned_self_ask"]  # all that apply
    assert list(results) == ["n", *approaches, "config"] and results["n"] == 2
    assert results["config"]["k"] == 2 and results["config"]["max_depth"] == 1 and not results["config"]["recurse"]
    known = {p.id for p in FILM_PASSAGES}
    for approach in approaches:
        r = results[approach]
        assert set(r["summary"]) == SUMMARY_KEYS and r["summary"]["n"] == 2 and r["ids"] == ["q1", "q2"]
        assert r["seconds_per_question"] > 0 and set(r["per_kind"]) == {"comparison", "compositional"}
        for record in r["records"]:
            assert set(trace_passages(record["trace"]) if record["trace"] else []) <= known
    summary = {approach: results[approach]["summary"] for approach in approaches}
    # fine-tuned: both chains read from retrieved passages, the comparison's last step computed by the operator
    # One gold passage sits at a near-tie of the top-2 cut: in a fresh-clone run under two workers it fell to third
    # (recall 5/6 instead of 1) after other tests in the same process; the other figures are exact.
    recall = summary["fine_tuned_self_ask"].pop("support_recall")
    assert recall == 1.0 or recall == pytest.approx(5 / 6)  # the mean of six recalls is not 5 / 6 to the last bit
    assert summary["fine_tuned_self_ask"] == {"n": 2, "em": 1.0, "f1": 1.0, "faithfulness": 1.0,
                                              "follow_ups": 2.5, "well_formed": 1.0}
    (operator,) = [c for c in results["fine_tuned_self_ask"]["records"][1]["trace"]["children"]
                   if "operator_answer" in c["meta"]]
    assert operator["answer"] == "Jaws" and "passages" not in operator["meta"]  # computed, not retrieved
    # few-shot self-ask retrieves every follow-up (no operators, as the benchmark's): the comparison ends unknown
    assert summary["few_shot_self_ask"]["em"] == 0.5 and summary["few_shot_self_ask"]["follow_ups"] == 2.5
    assert summary["direct"]["em"] == 0 and summary["direct"]["support_recall"] == 0.0  # closed book
    assert summary["direct"]["faithfulness"] is None  # no follow-ups
    single = results["single_step"]["records"]
    assert all(r["passages"] == 2 and r["follow_ups"] == 0 for r in single)  # the top 2 of the whole question


def test_eval_selfask_with_an_index_and_no_adapter_runs_the_base_approaches(workdir, tiny_smollm, capsys):
    argv = ["eval", "selfask", "--trees", str(workdir / "questions.jsonl"), "--index", str(workdir / "idx"),
            "--model", str(tiny_smollm), "--n", "1", "--approaches", "few_shot_self_ask"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 questions" in printed and "few_shot_self_ask" in printed and "fine_tuned" not in printed


def corrupt(index: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "corrupt_idx"
    shutil.copytree(index, copy)
    passages = copy / "passages.jsonl"
    passages.write_text(passages.read_text().replace("Spielberg", "Spielbergo", 1))
    return copy


BAD_INPUTS = {  # case: what the one-line error says ({tmp}: the test's tmp_path)
    "missing index": "passage index {tmp}/nothing does not exist",
    "corrupt index": "{tmp}/corrupt_idx/passages.jsonl does not match the sha256 in the manifest",
    "missing adapter": "adapter directory {tmp}/no_adapter does not exist",
    "missing reader adapter": "adapter directory {tmp}/no_reader does not exist",
    "reader without adapter": "--reader-adapter is a second adapter",
    "k": "--k must be >= 1, got 0",
    "retriever": "--answerers retriever answers from gold sub-question facts",
    "approach": "unknown approach 'cot' with --index",
    "fine-tuned without adapter": "approach 'single_step' needs --adapter",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_open_book_inputs_are_one_line_naming_the_path(workdir, tmp_path, capsys, monkeypatch, case):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("peftprompt.backbones.load_backbone", no_model)
    index = str(workdir / "idx")
    extra = {
        "missing index": ["--index", str(tmp_path / "nothing")],
        "corrupt index": ["--index", str(corrupt(workdir / "idx", tmp_path))],
        "missing adapter": ["--index", index, "--adapter", str(tmp_path / "no_adapter")],
        "missing reader adapter": ["--index", index, "--adapter", str(workdir / "decomposer"), "--reader-adapter",
                                   str(tmp_path / "no_reader")],
        "reader without adapter": ["--index", index, "--reader-adapter", str(workdir / "reader")],
        "k": ["--index", index, "--k", "0"],
        "retriever": ["--index", index, "--answerers", "operators+retriever"],
        "approach": ["--index", index, "--approaches", "cot"],
        "fine-tuned without adapter": ["--index", index, "--approaches", "single_step"],
    }[case]
    assert main(["eval", "selfask", "--trees", str(workdir / "questions.jsonl"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftprompt eval: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert BAD_INPUTS[case].format(tmp=tmp_path) in err


def test_open_book_options_need_an_index(capsys):
    assert main(["eval", "selfask", "--n", "1", "--reader-adapter", "x"]) == 2
    assert "--reader-adapter only applies with --index" in capsys.readouterr().err
    assert main(["eval", "selfask", "--n", "1", "--k", "2"]) == 2
    assert "--k only applies with --index" in capsys.readouterr().err


def test_questions_from_trees_map_supporting_titles_to_the_index_passages():
    trees = [Node.from_dict(q) for q in QUESTIONS]
    trees[1].meta["supporting_titles"].append("Nowhere")
    duplicate = Passage.make("Jaws (film)", "Jaws is a novel by Peter Benchley.")
    first, second = questions_from_trees(trees, [*FILM_PASSAGES, duplicate])
    jaws = [p.id for p in (FILM_PASSAGES[0], duplicate)]
    assert first.supporting == (*jaws, FILM_PASSAGES[1].id) and first.kind == "compositional" and first.answers == [
        "Cincinnati"]
    assert second.supporting == (*jaws, FILM_PASSAGES[2].id, "title:Nowhere")  # a title no passage has is never found
    assert second.answers == ["Jaws", "Jaws (film)"]
    no_titles = questions_from_trees([Node(question="q?", answer="a")])[0]
    assert no_titles.supporting == () and no_titles.kind == "all" and no_titles.id == "1"
    with pytest.raises(ValueError, match="no gold answer"):
        questions_from_trees([Node(question="q?")])
    with pytest.raises(ValueError, match="must be a list of paragraph titles"):
        questions_from_trees([Node(question="q?", answer="a", meta={"supporting_titles": "Jaws"})])


BENCHMARK_COPIES = {  # what benchmarks/openbook.py once defined itself -> the package function it uses now
    "record": "open_book_record", "trace_passages": "trace_passages", "base_model": "without_adapters",
    "faithfulness": "open_book_faithfulness", "summarise": "summarise_open_book", "per_kind": "per_kind",
    "ANSWERERS": "SYSTEM_ANSWERERS", "run_system": "run_open_book",
}


def benchmark_module():
    return script_module(REPO / "benchmarks" / "openbook.py")


def test_the_benchmark_runs_and_scores_with_the_package_functions():
    """``benchmarks/openbook.py`` keeps no copies of the systems and metrics: it imports them from
    `peftprompt.selfask.open_book`, so the benchmark and ``eval selfask --index`` cannot drift apart."""
    import peftprompt.selfask.open_book as package

    bench = benchmark_module()
    source = (REPO / "benchmarks" / "openbook.py").read_text()
    for old, new in BENCHMARK_COPIES.items():
        assert getattr(bench, old, None) in (None, getattr(package, new)), f"benchmarks/openbook.py has its own {old}"
        for name in {old, new}:
            assert not re.search(rf"^(def|class) {name}\b|^{name} *=", source, re.M), f"a copy of {name}"
    for name in ("run_open_book", "summarise_open_book", "per_kind", "SYSTEM_ANSWERERS"):
        assert getattr(bench, name) is getattr(package, name)
    assert set(bench.SYSTEMS) == set(package.OPEN_BOOK_SYSTEMS)


def synthetic_records(record=open_book_record) -> list[dict]:
    """Records made by `record` covering right and wrong answers, operator and retrieved intermediate answers,
    questions with and without supporting passages."""
    q = [OpenBookQuestion(id=f"q{i}", question=f"question {i}?", answer=answer, aliases=aliases, dataset="d",
                          split="dev", kind=kind, passages=(), supporting=supporting)
         for i, (answer, aliases, kind, supporting) in enumerate([
             ("Cincinnati", (), "compositional", ("p1", "p2")),
             ("no", (), "comparison", ("p3", "p5")),
             ("Jaws", ("Jaws (film)",), "comparison", ()),
         ])]
    operator = {"question": "Is 1975 later than 2006?", "answer": "no", "answer_source": "tool", "children": [],
                "meta": {"operator_answer": "no", "passages": ["p3"]}}
    read = {"question": "Who directed Jaws?", "answer": "Steven Spielberg", "answer_source": "tool", "children": [
        {"question": "deeper", "answer": "Cincinnati", "answer_source": "tool", "children": [],
         "meta": {"passages": ["p2", "p9"]}}], "meta": {"passages": ["p1"]}}
    traces = [{"question": "question 0?", "answer": "Cincinnati", "children": [read], "meta": {}},
              {"question": "question 1?", "answer": "no", "children": [operator], "meta": {}},
              None]
    return [record(q[0], "Cincinnati", trace_passages(traces[0]), 2, True, traces[0]),
            record(q[1], "no", trace_passages(traces[1]), 1, False, traces[1]),
            record(q[2], "the film Jaws", ["p4"], 0, True, traces[2])]


def test_the_open_book_metrics_give_these_numbers():
    records = synthetic_records()
    assert [list(r) for r in records] == [["id", "kind", "answer", "em", "f1", "follow_ups", "well_formed",
                                           "support_recall", "passages", "trace"]] * 3  # the cells' record layout
    assert [r["support_recall"] for r in records] == [1.0, 0.5, None] and [r["em"] for r in records] == [1.0, 1.0, 0.0]
    assert [r["f1"] for r in records] == [1.0, 1.0, 1.0]  # "the film Jaws" has every word of "Jaws (film)"
    assert [r["passages"] for r in records] == [3, 1, 1]
    assert trace_passages(records[0]["trace"]) == ["p1", "p2", "p9"]
    # the second answer repeats its operator's; the first repeats no intermediate answer; the third has no trace
    assert open_book_faithfulness(records) == pytest.approx(1 / 3)
    assert open_book_faithfulness([{**r, "follow_ups": 0} for r in records]) is None
    summary = summarise_open_book(records)
    assert list(summary) == ["n", "em", "f1", "faithfulness", "support_recall", "follow_ups", "well_formed"]
    assert summary == pytest.approx({"n": 3, "em": 2 / 3, "f1": 1.0, "faithfulness": 1 / 3, "support_recall": 0.75,
                                     "follow_ups": 1.0, "well_formed": 2 / 3})
    kinds = per_kind(records)
    assert list(kinds) == ["comparison", "compositional"]
    assert kinds["comparison"] == pytest.approx({"n": 2, "em": 0.5, "f1": 1.0, "faithfulness": 0.5,
                                                 "support_recall": 0.5, "follow_ups": 0.5, "well_formed": 0.5})
    assert kinds["compositional"] == pytest.approx({"n": 1, "em": 1.0, "f1": 1.0, "faithfulness": 0.0,
                                                    "support_recall": 1.0, "follow_ups": 2.0, "well_formed": 1.0})


def test_the_benchmarks_fallback_cell_is_scored_by_the_package():
    """``fine_tuned_fallback``: the self-ask records, the single-step answer where self-ask ended unknown, scored by
    `summarise_open_book` and `per_kind`, in the cell layout the results file keeps."""
    bench = benchmark_module()
    records = synthetic_records()
    first = {"ids": ["q0", "q1", "q2"], "k": 3, "dtype": "float32", "answerers": "operators+retrieval", "cpu": "c",
             "seconds": 6.0, "records": [records[0], {**records[1], "answer": "unknown", "em": 0.0, "f1": 0.0},
                                         records[2]]}
    second = {**first, "answerers": None, "seconds": 3.0,
              "records": [{**r, "answer": "x", "em": 0.0, "f1": 0.0, "support_recall": 1.0} for r in records]}
    cell = bench.derived_cell(first, second)
    assert list(cell) == ["ids", "k", "dtype", "answerers", "cpu", "seconds", "fallbacks", "summary", "per_kind",
                          "records"]
    assert cell["fallbacks"] == 1 and cell["seconds"] == 7.0 and cell["answerers"] == "operators+retrieval"
    assert [r["answer"] for r in cell["records"]] == ["Cincinnati", "x", "the film Jaws"]
    assert [r["support_recall"] for r in cell["records"]] == [1.0, 1.0, None]
    assert cell["summary"] == summarise_open_book(cell["records"]) and cell["per_kind"] == per_kind(cell["records"])
    assert cell["summary"]["em"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("system", ["closed_book", "single_step", "few_shot_self_ask", "fine_tuned_self_ask",
                                    "fine_tuned_recursive"])
def test_run_open_book_answers_with_each_system(workdir, tiny_smollm, scripted_model, system):
    """The benchmark's ``two`` variant (decomposer and reader as two adapters on one backbone) as the benchmark
    calls it: each system's exact match, follow-ups and passages read on the two scripted questions."""
    from peftprompt import load_adapter, load_backbone

    index = PassageIndex.load(workdir / "idx")
    questions = questions_from_trees(read_trees(workdir / "questions.jsonl"), index.passages)
    base, tokenizer = load_backbone(str(tiny_smollm), task="causal_lm")
    model = load_adapter(base, workdir / "decomposer", adapter_name="decomposer")
    model.load_adapter(str(workdir / "reader"), adapter_name="reader")
    model.set_adapter("decomposer")
    model.eval()
    fine_tuned = system not in ("closed_book", "few_shot_self_ask")
    records = run_open_book(system, questions, index, model, tokenizer, k=2,
                            reader_adapter="reader" if fine_tuned else None,
                            progress=f"{system} (two)" if fine_tuned else system)
    assert model.active_adapter == "decomposer"  # the reader adapter was switched back
    assert [r["id"] for r in records] == ["q1", "q2"]
    expected = {  # system: (exact match, follow-ups, distinct passages read) per question
        "closed_book": ([0.0, 0.0], [0, 0], [0, 0]),
        "single_step": ([0.0, 0.0], [0, 0], [2, 2]),
        "few_shot_self_ask": ([1.0, 0.0], [2, 3], None),  # no operators: the comparison step is retrieved, unknown
        "fine_tuned_self_ask": ([1.0, 1.0], [2, 3], None),
        "fine_tuned_recursive": ([1.0, 1.0], [2, 3], None),
    }[system]
    assert [r["em"] for r in records] == expected[0] and [r["follow_ups"] for r in records] == expected[1]
    if expected[2] is not None:
        assert [r["passages"] for r in records] == expected[2]
    else:
        assert all(r["passages"] >= 2 for r in records)  # every retrieved follow-up read its top 2
