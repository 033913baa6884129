"""Self-ask evaluation: exact metrics on hand-made trees with a scripted model, the knowledge base, the side-by-side
comparison, and `peftprompt eval selfask` on a tiny random Llama."""

from __future__ import annotations

import json

from peftprompt.recursive import convert
from peftprompt.selfask.evaluate import (
    sample_trees,
)


def test_eval_command_writes_json(tiny_smollm, tmp_path, capsys):
    """`peftprompt eval selfask` end to end on a tiny random Llama with SmolLM2's tokenizer (retriever kb)."""
    from peftprompt.cli import main

    out = tmp_path / "results.json"
    argv = ["eval", "selfask", "--source", "compositional_celebrities", "--n", "2", "--sample-seed", "0", "--model",
            str(tiny_smollm), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "direct" in printed and "few_shot_self_ask" in printed and "EM" in printed
    assert "few_shot_self_ask: 100%" in captured.err and "direct: direct answers: 100%" in captured.err  # progress
    results = json.loads(out.read_text())
    assert results["n"] == 2 and set(results) == {"n", "direct", "few_shot_self_ask", "config"}
    assert results["config"]["sample_seed"] == 0
    expected = [t.question for t in sample_trees(convert("compositional_celebrities"), 2, seed=0)]
    assert [e["question"] for e in results["direct"]["examples"]] == expected
    for approach in ("direct", "few_shot_self_ask"):
        r = results[approach]
        assert {"n", "em", "f1", "well_formed", "mean_follow_ups", "mean_generated_tokens", "compositionality_gap",
                "sub_questions_correct", "issues", "examples"} <= set(r)
        assert r["n"] == 2 and len(r["examples"]) == 2 and 0 <= r["em"] <= 1 and 0 <= r["well_formed"] <= 1
        assert r["seconds"] > 0


def test_eval_command_leaf_knowledge_and_answerers_per_layer(tiny_smollm, tmp_path):
    from peftprompt.cli import main

    out = tmp_path / "results.json"
    argv = ["eval", "selfask", "--source", "2wikimultihopqa", "--split", "dev", "--n", "2", "--model",
            str(tiny_smollm), "--approaches", "few_shot_self_ask", "--no-sub-question-check", "--knowledge", "leaves",
            "--answerers", "retriever", "model", "--max-depth", "1", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["knowledge"], config["answerers"], config["max_depth"], config["recurse"]) == (
        "leaves", ["retriever", "model"], 1, True)
