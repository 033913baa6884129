"""The operator step of a comparison tree: its last follow-up, in an operator's template, answered by the operator.

A comparison tree ("Which film has the director who died later, The More The Merrier or Sleep, My Love?") ends
with the two values its follow-ups found. `add_operator_step` appends one more child that asks the comparison in
the template of `peftprompt.operators` with both names and values,

    Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?

whose answer is computed by `peftprompt.operators.apply` itself (``answer_source="tool"``, so it is masked in
training like any tool answer), and the root's final answer repeats it. The model learns to ask that follow-up;
at inference the runner's `peftprompt.selfask.answerers.OperatorAnswerer` answers it the same way, so training and
inference agree by construction.

A step is added only where it is sure: the question's wording names one operator (`operators.operator_for`), both
values parse, and the operator's answer is the tree's gold answer. Otherwise the tree is left as it was and its
root's ``meta["operator_skipped"]`` says why (counted by `operator_step_stats`); a tree with a step has
``meta["operator"]``, and the step itself ``meta["operator_step"]`` (so `knowledge_base` never serves it as a
fact).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import replace
from typing import Iterable, Optional, Sequence

from .. import operators
from .tree import Node, entity_key, question_key

DATE_RELATIONS = frozenset({"date of birth", "date of death", "publication date", "inception", "date of establishment",
                            "point in time", "start time", "end time"})
"""2WikiMultiHopQA relations whose values are dates (compared by ``earlier`` / ``later``)."""


def _same(answer: str, gold: Sequence[str]) -> bool:
    """Whether `answer` names one of `gold`, with or without a disambiguation (`entity_key`)."""
    return entity_key(answer) in {key for g in gold if g for key in (question_key(g), entity_key(g))}


def _all_parse(kind: str, values: Sequence[str]) -> bool:
    try:
        for value in values:
            operators.parse_value(kind, value)
    except operators.OperatorError:
        return False
    return True


def operator_step(question: str, operands: Sequence[tuple[str, str]], kind: Optional[str],
                  gold: Sequence[str]) -> tuple[Optional[Node], str]:
    """The operator child for a comparison `question` over two ``(name, value)`` `operands` whose values are of
    `kind` (``date``, ``quantity``, ``name``, ``yes/no``; `None`: read from the values), with the reason when there
    is none: ``(node, "")`` or ``(None, reason)``."""
    if len(operands) != 2:
        return None, f"{len(operands)} operands, not 2"
    names = tuple(" ".join(n.split()) for n, _ in operands)
    values = tuple(" ".join((v or "").split()) for _, v in operands)
    if any("(" in v or ")" in v for v in values):
        return None, "a value has parentheses"
    wording = question
    for name in names:  # "Crime After Crime" or "The Last Night ..." must not read as "later"
        wording = re.sub(re.escape(name), " ", wording, flags=re.IGNORECASE)
    kinds = [kind] if kind else ["yes/no", "date", "quantity", "name"]  # the first whose wording and values fit
    operator = next((op for k in kinds if (op := operators.operator_for(wording, k)) is not None
                     and (k == "name" or _all_parse(k, values))), None)
    if operator is None:
        return None, "the wording names no operator for these values"
    call = operators.OperatorCall(operator, names, values)
    try:
        result = operators.apply(call)
    except operators.OperatorError as err:
        return None, f"operator {operator}: {err}"
    if not _same(result.answer, gold):
        return None, f"operator {operator} answers {result.answer!r}, gold {gold[0]!r}"
    return Node(question=call.question, answer=result.answer, answer_source="tool",
                meta={"operator_step": operator, **result.to_meta()}), ""


def add_operator_step(root: Node, operands: Sequence[tuple[str, str]], kind: Optional[str] = None) -> Node:
    """Append `operator_step`'s child to `root` (id: the next position), or record in ``root.meta`` why not."""
    node, reason = operator_step(root.question, operands, kind, [root.answer or "", *root.aliases])
    if node is None:
        root.meta["operator_skipped"] = reason
        return root
    node.id = str(len(root.children) + 1)
    root.children.append(node)
    root.meta["operator"] = node.meta["operator_step"]
    return root


def compared_names(first: str, second: str) -> Optional[tuple[str, str]]:
    """The names two parallel follow-ups differ in (``"When was Kwok Kin Pong born?"``, ``"When was Edison Chen
    born?"`` -> ``("Kwok Kin Pong", "Edison Chen")``), or `None` unless they differ in one stretch of words."""
    a, b = first.rstrip("?. ").split(), second.rstrip("?. ").split()
    blocks = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(blocks) != 1:
        return None
    _, i1, i2, j1, j2 = blocks[0]
    while i1 > 1 and j1 > 1 and a[i1 - 1] == b[j1 - 1] and a[i1 - 1][:1].isupper():  # "The White Planet"
        i1, j1 = i1 - 1, j1 - 1
    names = tuple(re.sub(r"'s$", "", " ".join(words).strip(" ,;:")) for words in (a[i1:i2], b[j1:j2]))
    return names if all(names) else None


COMPARISON_WORDING = re.compile(r"\b(?:or|both|same|than)\b", re.IGNORECASE)


def add_parallel_operator_step(root: Node) -> Node:
    """`add_operator_step` for a tree whose root compares what two parallel leaf children found (ProbTree's
    ``"Who was born first, Kwok Kin Pong or Edison Chen?"`` -> ``"When was Kwok Kin Pong born?"``, ``"When was
    Edison Chen born?"``); other trees are returned untouched."""
    if len(root.children) != 2 or not COMPARISON_WORDING.search(root.question):
        return root
    if any(c.children or not c.answer or c.answer_source == "none" for c in root.children):
        return root
    names = compared_names(root.children[0].question, root.children[1].question)
    if names is None:
        return root
    if not all(question_key(n) in question_key(root.question) for n in names):
        return root
    return add_operator_step(root, [(n, c.answer) for n, c in zip(names, root.children)])


MIRRORED_WORDS = {"earlier": "later", "later": "earlier", "earliest": "latest", "latest": "earliest", "first": "later",
                  "last": "first", "more recently": "earlier", "older": "younger", "younger": "older",
                  "oldest": "youngest", "youngest": "oldest"}
"""The direction words `mirrored_comparison` swaps; a question with any other (``before``, ``more recent``) is left."""

_DIRECTION = re.compile(rf"{operators.EARLIER_WORDS.pattern}|{operators.LATER_WORDS.pattern}", re.IGNORECASE)


def mirrored_comparison(tree: Node) -> Optional[Node]:
    """The same date comparison asked the other way round, or `None`: ``"Who was born first, A or B?"`` (operator
    ``earlier``, answer A) -> ``"Who was born later, A or B?"`` (operator ``later``, answer B), the follow-ups
    unchanged and the operator step computed again by `operator_step`.

    Comparison trees ask ``earlier`` far more often than ``later`` (2WikiMultiHopQA's training trees: 70 against
    17, and "younger" is rare), and a model trained on them asks ``earlier`` where a question says "younger" or
    "born later". Only a tree whose question has exactly one direction word outside the compared names, one of
    `MIRRORED_WORDS`, is mirrored; ``meta["mirrored_from"]`` keeps the original question.
    """
    step = tree.children[-1] if tree.children else None
    if step is None or step.meta.get("operator_step") not in ("earlier", "later"):
        return None
    operands = [tuple(pair) for pair in step.meta["operands"]]
    blanked = tree.question
    for name, _ in operands:  # "The Last Night" is a name, not a direction
        blanked = re.sub(re.escape(name), lambda m: " " * len(m.group()), blanked, flags=re.IGNORECASE)
    found = list(_DIRECTION.finditer(blanked))
    if len(found) != 1 or found[0].group().lower() not in MIRRORED_WORDS:
        return None
    start, end = found[0].span()
    word = MIRRORED_WORDS[found[0].group().lower()]
    word = word.capitalize() if tree.question[start].isupper() else word
    question = tree.question[:start] + word + tree.question[end:]
    other = next((name for name, _ in operands if entity_key(name) != entity_key(step.answer)), None)
    if other is None:
        return None
    node, _ = operator_step(question, operands, "date", [other])
    if node is None:
        return None
    node.id = step.id
    meta = {**tree.meta, "operator": node.meta["operator_step"], "mirrored_from": tree.question}
    return replace(tree, question=question, answer=node.answer, aliases=[], children=[*tree.children[:-1], node],
                   id=f"{tree.id}-mirrored" if tree.id else None, meta=meta)


def mirrored_comparisons(trees: Iterable[Node]) -> list[Node]:
    """`mirrored_comparison` of every tree that has one (only the new trees)."""
    return [mirrored for tree in trees if (mirrored := mirrored_comparison(tree)) is not None]


def without_operator_steps(tree: Node) -> Node:
    """A copy of `tree` without its operator steps (a model trained on it compares in words)."""
    kept = [without_operator_steps(c) for c in tree.children if "operator_step" not in c.meta]
    meta = {k: v for k, v in tree.meta.items() if k != "operator"}
    return replace(tree, children=kept, meta=meta)


def operator_step_stats(trees: Iterable[Node]) -> dict:
    """How many trees got an operator step, by operator, and why the others that compare did not (the
    ``meta["operator_skipped"]`` reasons, with their first words as the key)."""
    added: Counter = Counter()
    skipped: Counter = Counter()
    for tree in trees:
        if "operator" in tree.meta:
            added[tree.meta["operator"]] += 1
        elif "operator_skipped" in tree.meta:
            reason = tree.meta["operator_skipped"]
            skipped[re.sub(r"'[^']*'", "'…'", reason)] += 1
    return {"added": dict(sorted(added.items())), "skipped": dict(skipped.most_common())}


__all__ = ["DATE_RELATIONS", "MIRRORED_WORDS", "add_operator_step", "add_parallel_operator_step", "compared_names",
           "mirrored_comparison", "mirrored_comparisons", "operator_step", "operator_step_stats",
           "without_operator_steps"]
