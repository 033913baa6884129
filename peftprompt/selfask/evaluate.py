"""Evaluate self-ask on decomposition trees: answer accuracy, form, cost and the compositionality gap.

`evaluate_selfask(trees, runner, approach)` asks the root question of every tree, either by self-ask
(`SelfAskRunner.run_batch`) or directly (`SelfAskRunner.answer_directly`), and scores the answers against the root's
gold answer and aliases (SQuAD exact match and token F1, `peftprompt.metrics`). With
``sub_question_check=True`` it also asks every gold sub-question (the root's children) directly and reports the
**compositionality gap** of Press et al. (2022): among the questions whose sub-questions were all answered
correctly, the share whose final answer is wrong.

`compare_approaches(trees, model, tokenizer, adapter_model=None)` puts side by side: the direct answer (4-shot
`FEW_SHOT_DIRECT`), few-shot self-ask (4-shot `FEW_SHOT_SELF_ASK`) and, given a fine-tuned adapter model, zero-shot
self-ask with it; follow-ups are answered by a retriever over `knowledge_base(trees)`, the gold sub-question facts,
so the score measures the decomposition rather than facts the model memorised.

Metrics (each a rate in [0, 1] over the ``n`` questions unless said otherwise):

- ``em`` / ``f1``: mean exact match / token F1 of the final answer, best over the root's answer and aliases.
- ``well_formed``: share of answers the model reached on its own, with no issue (`SelfAskResult.well_formed`).
- ``mean_follow_ups``, ``mean_generated_tokens``: means per question (deeper model runs included in the tokens).
- ``sub_questions_correct``: share of the gold sub-questions (with a gold answer) answered correctly when asked
  directly (exact match against the sub-answer and its aliases); `None` without the check or sub-questions.
- ``compositionality_gap``: over the questions with at least one gold sub-question, all answered correctly, the
  share whose final answer is wrong (exact match 0); `None` when there are no such questions.
  ``gap_support`` is how many questions that is.
- ``faithfulness``: share of final answers the trace supports (`supported_by_trace`): the last operator answer
  when an operator answered a follow-up, else an intermediate answer that the final answer repeats.
- ``operator_follow_ups`` / ``operator_parsed``: follow-ups (at any depth) that ask for an operator (they open like
  its template, `operator_use`), and those the operator computed; ``operator_unparsed``: every one it could not,
  with why (such a follow-up went on to the next answerer).
- ``issues``: how many times each malformed-output case (`SelfAskResult.issues`) occurred; ``corrections``: how
  many times the runner asked again for a follow-up (`SelfAskResult.corrections`).
- ``examples``: the first 5 questions: question, gold answers, answer, correct (exact match) and trace (a
  ``decomp-tree/v1`` dict).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any, Optional, Sequence

from .. import operators
from ..recursive.tree import Node
from ..metrics import exact_match, token_f1
from .runner import FEW_SHOT_DIRECT, FEW_SHOT_SELF_ASK, SelfAskRunner, normalise_question

APPROACHES = ("direct", "few_shot_self_ask", "fine_tuned_self_ask")
"""The approaches of `compare_approaches`, in order."""

KNOWN_SOURCES = ("gold", "tool", "model", "derived")
"""Answer sources whose answers `knowledge_base` keeps (``none`` means unknown)."""

N_EXAMPLES = 5


def _gold(node: Node) -> list[str]:
    return [node.answer, *[a for a in node.aliases if a]] if node.answer else []


def knowledge_base(trees: Sequence[Node], leaves_only: bool = False) -> list[tuple[str, str]]:
    """The sub-question facts of `trees`: ``(question, answer)`` for every non-root node (at any depth) with an
    answer whose ``answer_source`` is gold, tool, model or derived. De-duplicated by question (lower-cased words,
    `normalise_question`), the first answer kept, in tree order. Roots are left out, so a retriever over these facts
    answers the sub-questions but never the question itself; so are operator steps
    (`peftprompt.recursive.operator_steps`): their answers are the operator's to compute, never a fact to look up.

    With `leaves_only`, only the leaves' facts are kept, and none whose question is also an inner node's (in any
    of `trees`): a follow-up that is itself compositional can then be answered only by decomposing it.
    """
    inner = {normalise_question(node.question) for tree in trees for _, node in tree.iter_nodes() if node.children}
    facts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for tree in trees:
        for path, node in tree.iter_nodes():
            if path == "root" or not node.answer or node.answer_source not in KNOWN_SOURCES or "operator_step" in node.meta:
                continue
            key = normalise_question(node.question)
            if not key or key in seen or (leaves_only and (node.children or key in inner)):
                continue
            seen.add(key)
            facts.append((node.question, node.answer))
    return facts


def supported_by_trace(answer: str, trace: Node) -> bool:
    """Whether the trace supports the final `answer`: when an operator answered one of the question's follow-ups,
    the final answer must repeat the last operator answer; otherwise it must repeat one of the intermediate answers
    (SQuAD-normalised exact match). A direct answer, with no follow-up, is never supported."""
    if not answer:
        return False
    computed = [child.answer for child in trace.children if "operator_answer" in child.meta]
    candidates = computed[-1:] if computed else [child.answer for child in trace.children if child.answer]
    return bool(candidates) and bool(exact_match(answer, candidates))


def operator_use(trace: Node) -> list[dict]:
    """Every follow-up of `trace` (at any depth) that asks for an operator (opens like its template,
    `operators.asked_operator`): its question, operator, and whether the operator computed it (``parsed``) or could
    not (``failure``: why, e.g. not in the template's form; it went to the next answerer)."""
    uses = []
    for path, node in trace.iter_nodes():
        if path == "root":
            continue
        operator = operators.asked_operator(node.question)
        if operator is None:
            continue
        uses.append({"question": node.question, "operator": operator, "parsed": "operator_answer" in node.meta,
                     "failure": node.meta.get("operator_failure")
                     or (None if "operator_answer" in node.meta else "not routed to the operators")})
    return uses


def sample_trees(trees: Sequence[Node], n: Optional[int], seed: Optional[int] = None) -> list[Node]:
    """The first `n` trees, or with `seed` `n` trees drawn at random (in their file order), the same for the same
    seed and file. `n` None keeps them all."""
    trees = list(trees)
    if n is None or n >= len(trees):
        return trees
    if seed is None:
        return trees[:n]
    keep = sorted(random.Random(seed).sample(range(len(trees)), n))
    return [trees[i] for i in keep]


def _sub_questions(tree: Node) -> list[Node]:
    """The gold sub-questions checked for the compositionality gap: the root's children with a question and an
    answer."""
    return [c for c in tree.children if c.question and c.answer and c.answer_source in KNOWN_SOURCES]


def sub_question_answers(trees: Sequence[Node], runner: SelfAskRunner) -> list[list[str]]:
    """Every gold sub-question of every tree asked directly (`runner.answer_directly`, one batch): the answers,
    per tree in child order."""
    questions = [[c.question for c in _sub_questions(t)] for t in trees]
    flat = [q for qs in questions for q in qs]
    answers = iter([r.answer for r in runner.answer_directly(flat)] if flat else [])
    return [[next(answers) for _ in qs] for qs in questions]


def evaluate_selfask(
    trees: Sequence[Node],
    runner: SelfAskRunner,
    approach: str = "self_ask",
    sub_question_check: bool = True,
    return_records: bool = False,
    sub_answers: Optional[list[list[str]]] = None,
) -> dict[str, Any]:
    """Ask the root questions of `trees` with `runner` and score them (see the module docstring for the metrics).

    Args:
        trees (`list[Node]`): Decomposition trees; every root needs a gold answer.
        runner (`SelfAskRunner`): Asks the questions (its `few_shot` / `few_shot_direct` prefixes and answerer).
        approach (`str`): ``"self_ask"`` (`run_batch`) or ``"direct"`` (`answer_directly`).
        sub_question_check (`bool`, defaults to `True`): Also ask the gold sub-questions directly, for
            ``sub_questions_correct`` and ``compositionality_gap``.
        return_records (`bool`, defaults to `False`): Add ``"records"``, one dict per question.
        sub_answers (`list[list[str]]`, *optional*): Precomputed `sub_question_answers(trees, runner)` (reused
            across approaches on the same model).

    Raises:
        ValueError: An unknown approach, no trees, or a root without a gold answer.
    """
    if approach not in ("self_ask", "direct"):
        raise ValueError(f"unknown approach {approach!r}; choose 'self_ask' or 'direct'")
    trees = list(trees)
    if not trees:
        raise ValueError("evaluate_selfask: no trees to evaluate")
    for tree in trees:
        if not tree.answer:
            raise ValueError(f"tree {tree.id or tree.question!r} has no gold answer to score against")
    questions = [t.question for t in trees]
    results = runner.run_batch(questions) if approach == "self_ask" else runner.answer_directly(questions)
    if sub_question_check and sub_answers is None:
        sub_answers = sub_question_answers(trees, runner)
    if not sub_question_check:
        sub_answers = None

    records = []
    issues: Counter = Counter()
    corrections: Counter = Counter()
    subs_total = subs_right = support = gap_wrong = 0
    for index, (tree, result) in enumerate(zip(trees, results)):
        gold = _gold(tree)
        em = exact_match(result.answer, gold)
        record = {
            "id": tree.id, "question": tree.question, "gold": gold, "answer": result.answer, "em": em,
            "f1": token_f1(result.answer, gold), "correct": bool(em), "well_formed": result.well_formed,
            "follow_ups": result.follow_ups, "generated_tokens": result.generated_tokens,
            "issues": list(result.issues), "corrections": list(result.corrections), "text": result.text,
            "trace": result.trace.to_dict(), "faithful": supported_by_trace(result.answer, result.trace),
            "operators": operator_use(result.trace),
        }
        issues.update(result.issues)
        corrections.update(result.corrections)
        if sub_answers is not None:
            subs = _sub_questions(tree)
            checks = [
                {"question": c.question, "gold": _gold(c), "answer": a, "correct": bool(exact_match(a, _gold(c)))}
                for c, a in zip(subs, sub_answers[index])
            ]
            record["sub_questions"] = checks
            subs_total += len(checks)
            subs_right += sum(c["correct"] for c in checks)
            all_right = bool(checks) and all(c["correct"] for c in checks)
            record["sub_questions_all_correct"] = all_right
            if all_right:
                support += 1
                gap_wrong += not em
        records.append(record)

    n = len(records)
    summary: dict[str, Any] = {
        "approach": approach,
        "n": n,
        "em": sum(r["em"] for r in records) / n,
        "f1": sum(r["f1"] for r in records) / n,
        "well_formed": sum(r["well_formed"] for r in records) / n,
        "mean_follow_ups": sum(r["follow_ups"] for r in records) / n,
        "mean_generated_tokens": sum(r["generated_tokens"] for r in records) / n,
        "compositionality_gap": gap_wrong / support if support else None,
        "gap_support": support if sub_answers is not None else None,
        "sub_questions_correct": subs_right / subs_total if subs_total else None,
        "faithfulness": sum(r["faithful"] for r in records) / n,
        "operator_follow_ups": sum(len(r["operators"]) for r in records),
        "operator_parsed": sum(u["parsed"] for r in records for u in r["operators"]),
        "operator_unparsed": [u for r in records for u in r["operators"] if not u["parsed"]],
        "issues": dict(sorted(issues.items())),
        "corrections": dict(sorted(corrections.items())),
        "examples": [{k: r[k] for k in ("question", "gold", "answer", "correct", "trace")}
                     for r in records[:N_EXAMPLES]],
    }
    if return_records:
        summary["records"] = records
    return summary


def compare_approaches(
    trees: Sequence[Node],
    model=None,
    tokenizer=None,
    adapter_model=None,
    kb: bool = True,
    approaches: Optional[Sequence[str]] = None,
    answerer=None,
    sub_question_check: bool = True,
    runner_kwargs: Optional[dict] = None,
    adapter_runner_kwargs: Optional[dict] = None,
    threshold: float = 0.8,
    progress: bool = False,
) -> dict[str, Any]:
    """Direct answering vs few-shot self-ask vs fine-tuned (zero-shot) self-ask, side by side.

    Args:
        trees (`list[Node]`): Evaluation trees (e.g. ``convert("compositional_celebrities")``).
        model, tokenizer: The base causal LM (either may be `None` with a ``generate_fn`` in `runner_kwargs`).
        adapter_model (*optional*): The fine-tuned self-ask model (e.g. `load_adapter(base, dir)`), same tokenizer;
            adds ``"fine_tuned_self_ask"``: zero-shot prompts, no few-shot prefix (also for its sub-question check).
        kb (`bool`, defaults to `True`): Answer follow-ups with a `RetrieverAnswerer` over `knowledge_base(trees)`;
            a follow-up in an operator's template is computed first (``operators+retriever``). Without it the model
            answers them itself (`ModelAnswerer`).
        approaches (`list[str]`, *optional*): A subset of `APPROACHES` (default: all that apply).
        answerer (*optional*): Answers follow-ups instead of the retriever (an answerer, a tool, or a list of them,
            one per layer; overrides `kb`).
        sub_question_check (`bool`): As in `evaluate_selfask`.
        runner_kwargs, adapter_runner_kwargs (`dict`, *optional*): More `SelfAskRunner` arguments for the base /
            adapter model's runners (e.g. ``max_depth``, ``generate_fn``).
        threshold (`float`, defaults to 0.8): The retriever's similarity threshold.
        progress (`bool`, defaults to `False`): A progress bar per approach (questions finished).

    Returns:
        ``{"n": ..., "direct": {...}, "few_shot_self_ask": {...}, "fine_tuned_self_ask": {...}}`` with the
        `evaluate_selfask` summaries of the approaches run, each with its wall-clock ``"seconds"`` (the base
        model's sub-question check counts for the first base approach).
    """
    trees = list(trees)
    if approaches is None:
        approaches = [a for a in APPROACHES if a != "fine_tuned_self_ask" or adapter_model is not None
                      or (adapter_runner_kwargs or {}).get("generate_fn") is not None]
    unknown = [a for a in approaches if a not in APPROACHES]
    if unknown:
        raise ValueError(f"unknown approach {unknown[0]!r}; choose from {', '.join(APPROACHES)}")
    has_adapter = adapter_model is not None or (adapter_runner_kwargs or {}).get("generate_fn") is not None
    if "fine_tuned_self_ask" in approaches and not has_adapter:
        raise ValueError("approach 'fine_tuned_self_ask' needs an adapter model (--adapter)")
    if not trees:
        raise ValueError("compare_approaches: no trees to evaluate")
    if answerer is None and kb and any(a != "direct" for a in approaches):
        from .answerers import AnswererChain, OperatorAnswerer, RetrieverAnswerer

        answerer = AnswererChain([OperatorAnswerer(), RetrieverAnswerer(knowledge_base(trees), threshold=threshold)])
    base = dict(runner_kwargs or {})

    def bar(approach: str) -> Optional[str]:
        return approach if progress else None

    out: dict[str, Any] = {"n": len(trees)}
    shared_subs = None  # the base model's direct sub-question answers: same prompts for both base approaches
    for approach in approaches:
        started = time.perf_counter()
        if approach == "fine_tuned_self_ask":
            runner = SelfAskRunner(adapter_model, tokenizer, answerer=answerer,
                                   **{**(adapter_runner_kwargs or base), "progress": bar(approach)})
            out[approach] = evaluate_selfask(trees, runner, "self_ask", sub_question_check)
        else:
            runner = SelfAskRunner(model, tokenizer, answerer=answerer, few_shot=FEW_SHOT_SELF_ASK,
                                   few_shot_direct=FEW_SHOT_DIRECT, **{**base, "progress": bar(approach)})
            if sub_question_check and shared_subs is None:
                shared_subs = sub_question_answers(trees, runner)
            kind = "direct" if approach == "direct" else "self_ask"
            out[approach] = evaluate_selfask(trees, runner, kind, sub_question_check, sub_answers=shared_subs)
        out[approach]["seconds"] = time.perf_counter() - started
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of `compare_approaches` results: approach, EM, F1, well-formed, faithful, mean follow-ups,
    operator follow-ups computed / written, compositionality gap."""
    header = ("approach", "EM", "F1", "well-formed", "faithful", "follow-ups", "operators", "comp. gap")
    rows = [header]
    for approach in APPROACHES:
        r = results.get(approach)
        if r is None:
            continue
        gap = "-" if r["compositionality_gap"] is None else f"{r['compositionality_gap']:.3f} ({r['gap_support']})"
        rows.append((approach, f"{r['em']:.3f}", f"{r['f1']:.3f}", f"{r['well_formed']:.3f}",
                     f"{r['faithfulness']:.3f}", f"{r['mean_follow_ups']:.2f}",
                     f"{r['operator_parsed']}/{r['operator_follow_ups']}", gap))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


__all__ = ["APPROACHES", "compare_approaches", "evaluate_selfask", "format_table", "knowledge_base",
           "operator_use", "sample_trees", "sub_question_answers", "supported_by_trace"]
