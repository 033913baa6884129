"""Converters from the shared data sets (``peftprompt.data.data_root()``, read in place) to ``decomp-tree/v1`` trees.

Every converter takes ``split`` and ``limit`` (the most trees to return) and returns resolved, validated trees with
`dataset`, `split` and a stable `id` on the root; a tree that fails validation is left out and counted in `report`
(a `SkipReport`). `convert(source, split, limit)` picks one from `SOURCES`.

Sources (file in the data folder, split, answers):

- ``musique``: ``musique/musique_train.json`` (train) and ``musique_context/dev.jsonl`` (dev); gold steps and final
  answer.
- ``2wikimultihopqa``: ``2wikimultihopqa_context/{train,dev}.json``; trees built from the gold ``evidences`` triples
  with relation templates (`twowiki_tree`), bridge comparisons nested two levels deep.
- ``probtree_2wiki``, ``probtree_hotpotqa``, ``probtree_musique``: ProbTree ``released.json`` in
  ``2wikimultihopqa/``, ``hotpotqa/``, ``musique/``, dev; model / tool / derived answers, gold final answer from the
  folder's ``*_test_questions_and_answers.json`` (they hold the DEV questions). A root that compares what its two
  leaf children found gets the operator step (`peftprompt.recursive.operator_steps`).
- ``strategyqa``: ``strategyqa/strategyqa_train.json``, train; steps without answers, final yes/no gold.
- ``break``, ``break_high_level``: ``break/QDMR/dev.csv``, ``break/QDMR-high-level/dev.csv``, dev; no answers.
- ``compositional_celebrities`` (test, evaluation only): gold Q1/A1, Q2/A2.
- ``bamboogle`` (test, evaluation only): ``bamboogle/..._inter.csv``; gold final answer, no sub-questions.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from ..errors import InputError
from .operator_steps import DATE_RELATIONS, add_operator_step, add_parallel_operator_step, mirrored_comparisons
from .tree import Node, SkipReport, TreeError, entity_key, question_key, read_trees, resolve_templates, validate

# ---------------------------------------------------------------------------------------------------------------
# MuSiQue ``X >> relation`` steps (Wikidata-style) become natural questions. The subject X keeps its #k references
# and the relation picks a pattern; relations not listed read "What is the {relation} of {X}?", and the
# relations in `PERSON_RELATIONS` read "Who is the {relation} of {X}?".
# ---------------------------------------------------------------------------------------------------------------
RELATION_PATTERNS = {
    "place of birth": "Where was {x} born?",
    "place of death": "Where did {x} die?",
    "located in the administrative territorial entity": "In which administrative territorial entity is {x} located?",
    "educated at": "Where was {x} educated?",
    "member of sports team": "Which sports team was {x} a member of?",
    "member of political party": "Which political party was {x} a member of?",
    "instance of": "What is {x} an instance of?",
    "part of": "What is {x} part of?",
    "shares border with": "What shares a border with {x}?",
    "located in or next to body of water": "Which body of water is {x} located in or next to?",
    "capital of": "What is {x} the capital of?",
    "applies to jurisdiction": "Which jurisdiction does {x} apply to?",
    "licensed to broadcast to": "Where is {x} licensed to broadcast to?",
    "follows": "What does {x} follow?",
    "followed by": "What is {x} followed by?",
    "conflict": "Which conflict did {x} take part in?",
    "location of formation": "Where was {x} formed?",
    "continent": "On which continent is {x}?",
    "sport": "Which sport does {x} play?",
    "headquarters location": "Where is the headquarters of {x}?",
    "founded by": "Who founded {x}?",
    "owned by": "Who owns {x}?",
    "position held": "What position did {x} hold?",
    "inception": "When was {x} founded?",
    "date of birth": "When was {x} born?",
    "date of death": "When did {x} die?",
}
PERSON_RELATIONS = frozenset({
    "performer", "author", "composer", "producer", "director", "screenwriter", "creator", "father", "mother",
    "spouse", "sibling", "child", "cast member", "lyricist", "head of government", "head of state", "developer",
})


def relation_question(subject: str, relation: str) -> str:
    """The natural question for the MuSiQue step ``"{subject} >> {relation}"`` (see `RELATION_PATTERNS`)."""
    relation = " ".join(relation.split())
    if relation in RELATION_PATTERNS:
        return RELATION_PATTERNS[relation].format(x=subject)
    if relation in PERSON_RELATIONS:
        return f"Who is the {relation} of {subject}?"
    return f"What is the {relation} of {subject}?"


def musique_step_question(raw: str) -> str:
    """Rewrite one MuSiQue decomposition step into a question template.

    ``"#1 >> country"`` -> ``"What is the country of #1?"`` (see `relation_question`); in every step the space the
    source puts after a reference is closed up (``"#1 ?"`` -> ``"#1?"``, ``"#3 's"`` -> ``"#3's"``,
    ``"#2 , #1"`` -> ``"#2, #1"``), the first letter is capitalised and a missing final ``?`` is added.
    """
    text = " ".join(raw.split())
    text = re.sub(r"(#\d+) (?=[?,.!;:)]|'s\b)", r"\1", text)
    if ">>" in text:
        subject, _, relation = text.rpartition(">>")
        text = relation_question(subject.strip(), relation.strip())
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    if text and text[-1] not in "?.!":
        text += "?"
    return text


def _data_root() -> Path:
    from ..data import data_root  # lazy: peftprompt.data imports datasets and transformers

    return data_root()


def _load_json(relative: str) -> Any:
    path = _data_root() / relative
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def _check_split(source: str, split: Optional[str], splits: tuple[str, ...]) -> str:
    if split is None:
        return splits[0]
    if split not in splits:
        raise InputError(f"source {source!r} has split(s) {', '.join(splits)}, got {split!r}", field="split")
    return split


def _finish(trees: Iterable[Node], limit: Optional[int], report: Optional[SkipReport]) -> list[Node]:
    """Resolve and validate `trees` (lazily built), keep the valid ones (at most `limit`), count the others."""
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}", field="limit")
    report = report if report is not None else SkipReport()
    out: list[Node] = []
    if limit == 0:
        return out
    for tree in trees:
        try:
            validate(resolve_templates(tree))
        except TreeError as err:
            report.add(err.reason, str(err))
            continue
        out.append(tree)
        if limit is not None and len(out) >= limit:
            break
    return out


def _first_rest(values: list) -> tuple[Optional[str], list[str]]:
    """First answer and the other distinct ones (as aliases); numbers (Compositional Celebrities' rounded
    latitudes) become their text, empty strings are dropped."""
    texts = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in values]
    cleaned = [v.strip() for v in texts if isinstance(v, str) and v.strip()]
    if not cleaned:
        return None, []
    rest = [v for i, v in enumerate(cleaned) if v != cleaned[0] and v not in cleaned[:i]]
    return cleaned[0], rest


# --------------------------------------------------------------------------------------------------- MuSiQue ---
MUSIQUE_FILES = {"train": "musique/musique_train.json", "dev": "musique_context/dev.jsonl"}


def _load_jsonl(relative: str) -> list[Any]:
    with (_data_root() / relative).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def musique(split: Optional[str] = None, limit: Optional[int] = None,
            report: Optional[SkipReport] = None) -> list[Node]:
    """MuSiQue-Ans examples with their GOLD ``question_decomposition`` (all hop shapes): ``train`` (the default) or
    ``dev`` (answerable dev questions, ``musique_context/dev.jsonl``; evaluation).

    The root is the question (answer and ``answer_aliases`` gold); its children are the steps in order, ids
    ``"1"``, ``"2"``, ... so ``#k`` keeps its meaning, ``question_template`` from `musique_step_question` (the
    ``X >> relation`` rule set) and ``meta`` holding the step id, ``paragraph_support_idx`` and the raw step.
    The 3hop2 / 4hop3 graph shapes stay flat: a step may reference any earlier step (``"#2, #1 >> country"``).
    """
    split = _check_split("musique", split, tuple(MUSIQUE_FILES))
    path = MUSIQUE_FILES[split]
    rows = _load_jsonl(path) if path.endswith(".jsonl") else _load_json(path)
    return _finish((musique_tree(row, split) for row in rows), limit, report)


def musique_tree(row: dict, split: str) -> Node:
    """One MuSiQue row as an unresolved tree (see `musique`)."""
    children = []
    for position, step in enumerate(row["question_decomposition"], start=1):
        children.append(Node(
            question="",
            question_template=musique_step_question(step["question"]),
            answer=step["answer"].strip(),
            answer_source="gold",
            id=str(position),
            meta={"step_id": step["id"], "paragraph_support_idx": step.get("paragraph_support_idx"),
                  "raw_question": step["question"]},
        ))
    answer, aliases = _first_rest([row["answer"], *row.get("answer_aliases", [])])
    return Node(
        question=row["question"].strip(), answer=answer, aliases=aliases, answer_source="gold",
        children=children, id=row["id"], dataset="musique", split=split,
        meta={"hops": row["id"].split("__")[0], "answerable": row.get("answerable", True)},
    )


# --------------------------------------------------------------------------------------------------- ProbTree ---
PROBTREE_FILES = {
    "probtree_2wiki": (
        "2wikimultihopqa/released.json", "2wikimultihopqa/2wikimultihop_test_questions_and_answers.json"
    ),
    "probtree_hotpotqa": ("hotpotqa/released.json", "hotpotqa/hotpotqa_test_questions_and_answers.json"),
    "probtree_musique": ("musique/released.json", "musique/musique_test_questions_and_answers.json"),
}
# The answer ProbTree selected (``answer``) is one of its three candidates; how it was made gives answer_source.
PROBTREE_SOURCES = (("child_answer", "derived"), ("ob_answer", "tool"), ("cb_answer", "model"))


def probtree_answer_source(node: dict) -> str:
    """Where a ProbTree node's selected ``answer`` comes from.

    ``cb_answer`` (closed book: the model alone) -> ``"model"``; ``ob_answer`` (open book: the model reading
    BM25-retrieved paragraphs) -> ``"tool"``; ``child_answer`` (aggregated from the children's answers) ->
    ``"derived"``. The candidate equal to ``answer`` (text and log-prob) wins; if none is (the HotpotQA file
    rescores inner nodes), the one with the same text; ties go child > open book > closed book.
    The root's answer is replaced by the gold one of the data set's question file (matched on the question, ignoring
    case, spacing and punctuation) where there is one; the model's answer and source stay in ``meta``.
    """
    for exact in (True, False):
        for key, source in PROBTREE_SOURCES:
            candidate = node.get(key)
            if candidate and (candidate == node["answer"] if exact else candidate[0] == node["answer"][0]):
                return source
    return "model"


def _probtree(name: str, split: Optional[str], limit: Optional[int], report: Optional[SkipReport]) -> list[Node]:
    split = _check_split(name, split, ("dev",))
    report = report if report is not None else SkipReport()
    tree_file, gold_file = PROBTREE_FILES[name]
    items = _load_json(tree_file)
    gold: dict[str, list[str]] = {}
    for row in _load_json(gold_file):
        gold.setdefault(question_key(row["question"]), []).append(row["answer"])

    def node_from(raw: dict, nodes: dict[int, dict], position: Optional[int], seen: set[int]) -> Node:
        if raw["idx"] in seen:
            raise TreeError(f"ProbTree node {raw['idx']} reached twice", dataset=name, reason="cycle")
        seen.add(raw["idx"])
        children = [node_from(nodes[son], nodes, k, seen) for k, son in enumerate(raw["sons"], start=1)]
        text = raw["question_text"].strip()
        template = re.sub(r"<(\d+)>", r"#\1", text)  # the HotpotQA file writes references as <k>
        # A template only where ProbTree itself substituted something: "#1 hits" in a plain question stays text.
        has_ref = template != raw["question"].strip() and bool(re.search(r"#\d", template))
        answer = raw["answer"][0].strip() if raw["answer"] and isinstance(raw["answer"][0], str) else ""
        candidates = {key: raw[key][0] for key, _ in PROBTREE_SOURCES if raw.get(key)}
        return Node(
            question=raw["question"].strip(),
            question_template=template if has_ref else None,
            answer=answer or None,
            answer_source=probtree_answer_source(raw) if answer else "none",
            children=children,
            id=str(position) if position is not None else None,
            meta={"probtree_idx": raw["idx"], "logprob": raw["answer"][1], "candidates": candidates},
        )

    def build(item: list[dict]) -> Optional[Node]:
        nodes = {raw["idx"]: raw for raw in item}
        roots = [raw for raw in item if "fa" not in raw]
        root_question = roots[0]["question"].strip() if roots else ""
        tree_id = _stable_id(name, root_question)
        if len(roots) != 1:
            raise TreeError(f"expected one root node, found {len(roots)}", dataset=name, tree_id=tree_id,
                            reason="bad source row")
        root = node_from(roots[0], nodes, None, set())
        root.id, root.dataset, root.split = tree_id, name, split
        if question_key(root_question) in gold:
            root.meta.update(model_answer=root.answer, model_answer_source=root.answer_source)
            root.answer, root.aliases = _first_rest(gold[question_key(root_question)])
            root.answer_source = "gold"
        return add_parallel_operator_step(root) if root.answer else root

    def trees() -> Iterable[Node]:
        for item in items:
            try:
                yield build(item)
            except TreeError as err:
                report.add(err.reason, str(err))
            except (KeyError, IndexError, TypeError) as err:
                report.add("bad source row", f"{name}: {err!r}")

    return _finish(trees(), limit, report)


def probtree_2wiki(split: Optional[str] = None, limit: Optional[int] = None,
                   report: Optional[SkipReport] = None) -> list[Node]:
    """ProbTree's MODEL-made trees for 2WikiMultiHopQA dev (see `probtree_answer_source`); root answer gold."""
    return _probtree("probtree_2wiki", split, limit, report)


def probtree_hotpotqa(split: Optional[str] = None, limit: Optional[int] = None,
                      report: Optional[SkipReport] = None) -> list[Node]:
    """ProbTree's MODEL-made trees for HotpotQA dev (``<k>`` references read as ``#k``); root answer gold."""
    return _probtree("probtree_hotpotqa", split, limit, report)


def probtree_musique(split: Optional[str] = None, limit: Optional[int] = None,
                     report: Optional[SkipReport] = None) -> list[Node]:
    """ProbTree's MODEL-made trees for MuSiQue dev (text-davinci-003, up to depth 4); root answer gold."""
    return _probtree("probtree_musique", split, limit, report)


# ------------------------------------------------------------------------------------------ 2WikiMultiHopQA ---
# Wording of the 2WikiMultiHopQA relations, over `RELATION_PATTERNS` (films are "released", not "published").
TWOWIKI_PATTERNS = {
    **RELATION_PATTERNS,
    "publication date": "When was {x} released?",
    "country": "Which country is {x} in?",
    "country of origin": "Which country does {x} come from?",
    "country of citizenship": "Which country is {x} a citizen of?",
    "composer": "Who composed {x}?",
    "cause of death": "What was the cause of death of {x}?",
    "award received": "Which award did {x} receive?",
    "place of burial": "Where was {x} buried?",
    "employer": "Who employed {x}?",
    "publisher": "Who published {x}?",
}
TWOWIKI_FILES = {"train": "2wikimultihopqa_context/train.json", "dev": "2wikimultihopqa_context/dev.json"}


def twowiki_question(subject: str, relation: str) -> str:
    """The question asking for ``relation`` of ``subject`` (``"the director of Jaws", "date of death"`` ->
    ``"When did the director of Jaws die?"``)."""
    relation = " ".join(relation.split())
    if relation in TWOWIKI_PATTERNS:
        return TWOWIKI_PATTERNS[relation].format(x=subject)
    return relation_question(subject, relation)


def _fact(subject: str, relation: str, objects: list[str], position: int, template: Optional[str] = None) -> Node:
    answer, aliases = _first_rest(objects)
    return Node(question="", question_template=template or twowiki_question(subject, relation), answer=answer,
                aliases=aliases, answer_source="gold", id=str(position), meta={"relation": relation})


def _grouped(triples: list[list[str]]) -> list[tuple[str, str, list[str]]]:
    """``(subject, relation, [objects])`` in order of first appearance; several objects of one subject and relation
    (two nationalities) are one fact with aliases."""
    groups: dict[tuple[str, str], tuple[str, str, list[str]]] = {}
    for subject, relation, obj in triples:
        key = (question_key(subject), relation)
        groups.setdefault(key, (subject.strip(), relation, []))[2].append(obj.strip())
    return list(groups.values())


def _by_mention(question: str, facts: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, list[str]]]:
    """`facts` in the order their subjects are named in `question` (unnamed ones last, in evidence order)."""
    text = question_key(question)

    def where(fact: tuple[str, str, list[str]]) -> int:
        at = text.find(question_key(fact[0]))
        return at if at >= 0 else len(text)

    return sorted(facts, key=where)


def twowiki_tree(row: dict, dataset: str = "2wikimultihopqa", split: str = "train") -> Node:
    """One 2WikiMultiHopQA row (``question``, ``type``, ``answer``, ``evidences``) as a gold tree.

    The ``evidences`` triples ``[subject, relation, object]`` are the reasoning path; each becomes a question by
    `twowiki_question`. Chains (``compositional``, ``inference``: A -r1-> B -r2-> C) are two children, the second
    naming the first's answer as ``#1``. ``comparison`` questions get one child per compared entity, in the order
    the question names them. ``bridge_comparison`` questions nest: one child per compared entity, asking for the
    second relation of the first relation's object (``"When did the director of Jaws die?"``), itself decomposed
    into ``"Who is the director of Jaws?"`` and ``"When did #1 die?"``. Both kinds of comparison end with the
    operator step (`peftprompt.recursive.operator_steps.add_operator_step`: ``"Which is later: Jaws (...) or ...?"``,
    ``"Are these the same: ..."``) where it gives the gold answer. ``meta`` keeps ``type`` and the official ``_id``.
    """
    question, kind = " ".join(row["question"].split()), row["type"]
    tree_id = row.get("_id") or row.get("_1") or _stable_id(dataset, question)
    facts = _grouped(row["evidences"])
    if not facts:
        raise TreeError("no evidences", dataset=dataset, tree_id=tree_id, reason="bad source row")
    objects = {entity_key(o) for _, _, objs in facts for o in objs}
    first_hop = [f for f in facts if entity_key(f[0]) not in objects]
    operands: list[tuple[str, str]] = []  # the compared entities and their values (comparisons)
    compared_relation = no_operator = None
    if kind == "bridge_comparison" and first_hop and len(first_hop) < len(facts):
        children = []
        for position, (subject, relation, objs) in enumerate(_by_mention(question, first_hop), start=1):
            second = [f for f in facts if entity_key(f[0]) in {entity_key(o) for o in objs}]
            if not second:
                raise TreeError(f"no second hop after {subject!r}", dataset=dataset, tree_id=tree_id,
                                reason="bad source row")
            _, relation2, objs2 = second[0]
            inner = _fact(f"the {relation} of {subject}", relation2, objs2, position)
            inner.question, inner.question_template = inner.question_template, None
            inner.children = [_fact(subject, relation, objs, 1), _fact("#1", relation2, objs2, 2)]
            children.append(inner)
            operands.append((subject, inner.answer))
            compared_relation = relation2
    elif kind in ("compositional", "inference") and len(facts) == 2:
        (s1, r1, o1), (s2, r2, o2) = facts
        chained = entity_key(s2) in {entity_key(o) for o in o1}
        children = [_fact(s1, r1, o1, 1), _fact("#1" if chained else s2, r2, o2, 2)]
    else:
        children = [_fact(s, r, o, k) for k, (s, r, o) in enumerate(_by_mention(question, facts), start=1)]
        if kind == "comparison" and len({r for _, r, _ in facts}) == 1:
            operands = [(s, c.answer) for (s, _, _), c in zip(_by_mention(question, facts), children)]
            compared_relation = facts[0][1]
        elif kind == "comparison":  # "Who lived longer, A or B?": two dates each, no operator compares lifespans
            no_operator = f"compares {len(facts)} facts ({', '.join(sorted({r for _, r, _ in facts}))}), not two values"
    answer, aliases = _first_rest([row["answer"]])
    tree = Node(question=question, answer=answer, aliases=aliases, answer_source="gold", children=children,
                id=tree_id, dataset=dataset, split=split, meta={"type": kind})
    if operands and answer:
        add_operator_step(tree, operands, "date" if compared_relation in DATE_RELATIONS else "name")
    elif no_operator:
        tree.meta["operator_skipped"] = no_operator
    return tree


def twowiki(split: Optional[str] = None, limit: Optional[int] = None,
            report: Optional[SkipReport] = None) -> list[Node]:
    """2WikiMultiHopQA with GOLD evidence triples (`twowiki_tree`): ``train`` (500 training questions, the default)
    or ``dev`` (a sample of the dev set, evaluation; the ProbTree ``probtree_2wiki`` trees come from the same dev
    set)."""
    split = _check_split("2wikimultihopqa", split, tuple(TWOWIKI_FILES))
    report = report if report is not None else SkipReport()
    rows = _load_json(TWOWIKI_FILES[split])

    def trees() -> Iterable[Node]:
        for row in rows:
            try:
                yield twowiki_tree(row, split=split)
            except TreeError as err:
                report.add(err.reason, str(err))
            except (KeyError, ValueError, TypeError) as err:
                report.add("bad source row", f"2wikimultihopqa: {err!r}")

    return _finish(trees(), limit, report)


# ------------------------------------------------------------------------------------------------- StrategyQA ---
def strategyqa(split: Optional[str] = None, limit: Optional[int] = None,
               report: Optional[SkipReport] = None) -> list[Node]:
    """StrategyQA train: root answer ``"yes"``/``"no"`` (gold), children the ``decomposition`` steps.

    Steps have no answers (``answer=None``, ``answer_source="none"``), so a ``#k`` in a step stays as written in its
    `question` (an open reference). ``term``, ``description`` and ``facts`` go to the root's ``meta``.
    """
    split = _check_split("strategyqa", split, ("train",))
    rows = _load_json("strategyqa/strategyqa_train.json")

    def build(row: dict) -> Node:
        children = [
            Node(question="", question_template=" ".join(step.split()), answer=None, answer_source="none",
                 id=str(position))
            for position, step in enumerate(row["decomposition"], start=1)
        ]
        return Node(
            question=row["question"].strip(), answer="yes" if row["answer"] else "no", answer_source="gold",
            children=children, id=row["qid"], dataset="strategyqa", split=split,
            meta={"term": row.get("term"), "description": row.get("description"), "facts": row.get("facts", [])},
        )

    return _finish((build(row) for row in rows), limit, report)


# ------------------------------------------------------------------------------------------------------ Break ---
def _break(name: str, folder: str, split: Optional[str], limit: Optional[int],
           report: Optional[SkipReport]) -> list[Node]:
    split = _check_split(name, split, ("dev",))
    report = report if report is not None else SkipReport()
    path = _data_root() / "break" / folder / f"{split}.csv"

    def build(row: dict[str, str]) -> Node:
        steps = [" ".join(step.split()) for step in row["decomposition"].split(";")]
        operators = ast.literal_eval(row["operators"]) if row["operators"].strip() else []
        if len(operators) != len(steps):
            raise TreeError(f"{len(steps)} steps but {len(operators)} operators", dataset=name,
                            tree_id=row["question_id"], reason="bad source row")
        children = []
        for position, (step, operator) in enumerate(zip(steps, operators), start=1):
            step = step[len("return "):] if step.startswith("return ") else step
            children.append(Node(
                question="", question_template=step, answer=None, answer_source="none", id=str(position),
                meta={"operator": operator} if operator not in (None, "None") else {},
            ))
        return Node(
            question=" ".join(row["question_text"].split()), answer=None, answer_source="none", children=children,
            id=row["question_id"], dataset=name, split=split, meta={"subset": row["question_id"].split("_")[0]},
        )

    def trees() -> Iterable[Node]:
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    yield build(row)
                except TreeError as err:
                    report.add(err.reason, str(err))

    return _finish(trees(), limit, report)


def break_qdmr(split: Optional[str] = None, limit: Optional[int] = None,
               report: Optional[SkipReport] = None) -> list[Node]:
    """Break QDMR dev (ATIS, CLEVR, COMQA, CWQ, DROP, GEO, NLVR2, SPIDER): GOLD steps, no answers.

    Children are the ``;``-separated steps without their leading ``return``; the step's operator (``select``,
    ``filter``, ``project``, ...) is in ``meta["operator"]``; ``#k`` stays as written (no answers exist).
    """
    return _break("break", "QDMR", split, limit, report)


def break_high_level(split: Optional[str] = None, limit: Optional[int] = None,
                     report: Optional[SkipReport] = None) -> list[Node]:
    """Break QDMR-high-level dev (HOTPOT, DROP, CWQ): coarser, QA-oriented steps; otherwise as `break_qdmr`."""
    return _break("break_high_level", "QDMR-high-level", split, limit, report)


# ------------------------------------------------------------------------------------- Compositional Celebrities ---
def compositional_celebrities(split: Optional[str] = None, limit: Optional[int] = None,
                              report: Optional[SkipReport] = None) -> list[Node]:
    """Compositional Celebrities (EVALUATION ONLY, canary in the file): 2 gold children from Q1/A1 and Q2/A2.

    The second child's template is Q2 with A1 replaced by ``#1`` (as a whole word; Q2 is kept as is when A1 is
    not in it, e.g. "Czech Republic" vs "Czechia"), so resolving it gives Q2 back. Answers are the first of each
    list, the rest aliases; ``meta`` has ``evaluation_only``, ``category``, ``person`` and ``person_id``.
    """
    split = _check_split("compositional_celebrities", split, ("test",))
    rows = _load_json("compositional_celebrities/compositional_celebrities.json")["data"]

    def build(row: dict) -> Node:
        a1, a1_aliases = _first_rest(row["A1"])
        a2, a2_aliases = _first_rest(row["A2"])
        answer, aliases = _first_rest(row["Answer"])
        q2 = row["Q2"].strip()
        template = re.sub(rf"(?<!\w){re.escape(a1)}(?!\w)", "#1", q2, count=1) if a1 else q2
        category = row.get("category", "unknown")
        return Node(
            question=row["Question"].strip(), answer=answer, aliases=aliases, answer_source="gold",
            children=[
                Node(question=row["Q1"].strip(), answer=a1, aliases=a1_aliases, answer_source="gold", id="1"),
                Node(question="", question_template=template, answer=a2, aliases=a2_aliases, answer_source="gold",
                     id="2"),
            ],
            id=_stable_id(category, row["Question"].strip()), dataset="compositional_celebrities", split=split,
            meta={"evaluation_only": True, "category": category, "person": row.get("person"),
                  "person_id": row.get("person_id")},
        )

    report = report if report is not None else SkipReport()

    def answered(rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            if _first_rest(row["Answer"])[0] is None:  # e.g. Bosnia's currency symbol: the data set's answer is ""
                report.add("no gold answer", f"compositional_celebrities: {row['Question']!r} has no answer")
                continue
            yield row

    return _finish((build(row) for row in answered(rows)), limit, report)


# -------------------------------------------------------------------------------------------------- Bamboogle ---
def _bamboogle_cell(cell: str) -> str:
    """A cell read with ``surrogateescape``: the source's mangled curly quotes (bytes ``?\\x80?``) become ``"``."""
    return " ".join(cell.replace("?\udc80?", '"').encode("utf-8", errors="replace").decode("utf-8").split())


def bamboogle(split: Optional[str] = None, limit: Optional[int] = None,
              report: Optional[SkipReport] = None) -> list[Node]:
    """Bamboogle (EVALUATION ONLY): 2-hop questions with no written sub-questions, so each tree is a single node.

    Answer gold (``Answer``; ``Answer 2`` as alias); the ``_inter`` file's hand-annotated bridging entity (the
    answer of hop 1) is kept in ``meta["bridge_answer"]``; ``meta["evaluation_only"]`` is set.
    """
    split = _check_split("bamboogle", split, ("test",))
    path = _data_root() / "bamboogle" / "Bamboogle Prerelease - Sheet1_inter.csv"
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = [[_bamboogle_cell(cell) for cell in row] for row in csv.reader(f)]
    header = rows[0]
    col = {name: header.index(name) for name in ("Question", "Answer", "Answer 2", "sub_a1")}

    def build(row: list[str]) -> Node:
        question = row[col["Question"]]
        answer, aliases = _first_rest([row[col["Answer"]], row[col["Answer 2"]]])
        bridge = row[col["sub_a1"]].strip()
        return Node(
            question=question, answer=answer, aliases=aliases, answer_source="gold" if answer else "none",
            id=_stable_id("bamboogle", question), dataset="bamboogle", split=split,
            meta={"evaluation_only": True, **({"bridge_answer": bridge} if bridge else {})},
        )

    return _finish((build(row) for row in rows[1:] if any(cell.strip() for cell in row)), limit, report)


SOURCES: dict[str, Callable[..., list[Node]]] = {
    "musique": musique,
    "2wikimultihopqa": twowiki,
    "probtree_2wiki": probtree_2wiki,
    "probtree_hotpotqa": probtree_hotpotqa,
    "probtree_musique": probtree_musique,
    "strategyqa": strategyqa,
    "break": break_qdmr,
    "break_high_level": break_high_level,
    "compositional_celebrities": compositional_celebrities,
    "bamboogle": bamboogle,
}


def convert_report(source: str, split: Optional[str] = None,
                   limit: Optional[int] = None) -> tuple[list[Node], SkipReport]:
    """Like `convert`, also returning the `SkipReport` of the trees left out."""
    if source not in SOURCES:
        raise InputError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}", field="source")
    report = SkipReport()
    return SOURCES[source](split=split, limit=limit, report=report), report


def convert(source: str, split: Optional[str] = None, limit: Optional[int] = None) -> list[Node]:
    """Convert `source` (a key of `SOURCES`) to resolved, validated trees.

    Args:
        source (`str`): e.g. ``"musique"``, ``"probtree_hotpotqa"``, ``"compositional_celebrities"``.
        split (`str`, *optional*): Defaults to the source's only split (``train``, ``dev`` or ``test``).
        limit (`int`, *optional*): Return at most this many trees (the first valid ones in file order).
    """
    return convert_report(source, split, limit)[0]


def load_trees(source: str) -> list[Node]:
    """The trees of `source`: a name of `SOURCES` (`convert`, its default split) or the path of a ``decomp-tree/v1``
    JSONL file (`read_trees`, e.g. trees written by `write_trees`); a path must end in ``.jsonl``."""
    if source.endswith(".jsonl"):
        return read_trees(source)
    return convert(source)


def training_trees(sources: Sequence[str], mirror_comparisons: bool = False) -> list[Node]:
    """The trees of every source in `sources` (`load_trees`), with `mirror_comparisons` followed by the date
    comparisons asked the other way round (`operator_steps.mirrored_comparison`): what ``recipes/selfask_sft.py``
    trains on, and what the benchmarks keep out of their evaluation questions."""
    trees = [tree for source in sources for tree in load_trees(source)]
    return trees + mirrored_comparisons(trees) if mirror_comparisons else trees


def drop_overlap(trees: Iterable[Node], others: Iterable[Node]) -> tuple[list[Node], list[Node]]:
    """Split `trees` into those whose root question is asked nowhere in `others` (at any node, compared by
    `question_key`) and those that are: ``(kept, dropped)``. Keeps evaluation questions out of training trees."""
    seen = {question_key(node.question) for tree in others for _, node in tree.iter_nodes()}
    kept, dropped = [], []
    for tree in trees:
        (dropped if question_key(tree.question) in seen else kept).append(tree)
    return kept, dropped


DEEP_EVAL_SETS = {
    "2wikimultihopqa": "bridge-comparison and inference questions of the 2WikiMultiHopQA dev sample (gold evidence)",
    "probtree_2wiki": "ProbTree 2WikiMultiHopQA trees nested two levels or more",
    "musique": "3- and 4-hop MuSiQue dev questions (gold decompositions)",
}


def deep_eval_trees(training: Iterable[Node] = ()) -> tuple[list[Node], dict[str, Any]]:
    """The held-out deep questions (`DEEP_EVAL_SETS`), never trained on: questions asked in `training` (at any node)
    are dropped, and so are repeats across the sets (the 2WikiMultiHopQA dev sample and the ProbTree trees come
    from the same dev set; the first set keeps a shared question). Returns the trees and a report:
    ``{"kept": {set: n}, "dropped_as_training": {set: n}, "dropped_as_repeat": {set: n}}``.
    """
    candidates = {
        "2wikimultihopqa": [t for t in twowiki(split="dev") if t.meta["type"] in ("bridge_comparison", "inference")],
        "probtree_2wiki": [t for t in probtree_2wiki() if t.depth() >= 3],
        "musique": [t for t in musique(split="dev") if t.meta["hops"].startswith(("3hop", "4hop"))],
    }
    training = list(training)
    report: dict[str, Any] = {"kept": {}, "dropped_as_training": {}, "dropped_as_repeat": {}}
    kept: list[Node] = []
    for name, trees in candidates.items():
        fresh, as_training = drop_overlap(trees, training)
        unique, repeats = drop_overlap(fresh, [Node(question=t.question) for t in kept])
        kept += unique
        report["kept"][name], report["dropped_as_training"][name] = len(unique), len(as_training)
        report["dropped_as_repeat"][name] = len(repeats)
    return kept, report
