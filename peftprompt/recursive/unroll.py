"""Unroll decomposition trees into self-ask training episodes: text plus labelled character spans.

An episode teaches one node of a tree:

```
Question: {question}                              question             context, never trained
Are follow up questions needed here: Yes.         decision             trained
Follow up: {child question}                       follow_up            trained, together with the
Intermediate answer:                                                   marker the runner stops at
 {child answer}                                   intermediate_answer  inserted by the runner: masked, or
                                                                       a weight by answer_source (flat mode)
So the final answer is: {answer}                  final_answer         trained (weight by answer_source)
```

A node without children gives the ``No.`` branch (decision, then the final answer), so the model learns when to
stop. Three modes:

- ``"recursive"`` (DecomP / ProbTree style): one episode per node that has an answer. In the parent, each child's
  answer comes from the child's own, deeper episode, so it is always masked there.
- ``"flat"``: one episode per tree whose follow-ups are the tree's leaves in order; their answers are weighted by
  `LossPolicy.intermediate_answer` (by default masked: at inference a retriever or tool supplies them).
- ``"mix"``: the recursive episodes, plus the flat episode of every tree deeper than two levels (where the two
  differ): the model sees both ways of decomposing a deep question, into its leaves or into compositional
  sub-questions that it decomposes again one level deeper.

Subtrees deeper than `max_depth` are folded into their answer (the node at `max_depth` becomes a leaf).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Optional

from .tree import ANSWER_SOURCES, Node

Mode = Literal["recursive", "flat", "mix"]
MODES = ("flat", "recursive", "mix")
SPAN_KINDS = ("context", "question", "decision", "follow_up", "intermediate_answer", "final_answer")
WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Template:
    """The strings an episode is written with. ``{question}`` and ``{answer}`` are filled in; each string is one span.

    The built-ins are `SELF_ASK` (Press et al., 2022) and `LEAST_TO_MOST` (a least-to-most style wording of the
    same structure). Custom templates must keep every string distinct so episodes can be parsed back.
    """

    name: str
    question: str
    follow_ups_needed: str
    no_follow_ups: str
    follow_up: str
    intermediate_answer: str
    final_answer: str

    def __post_init__(self) -> None:
        for name, fields in (
            ("question", {"question"}),
            ("follow_ups_needed", set()),
            ("no_follow_ups", set()),
            ("follow_up", {"question"}),
            ("intermediate_answer", {"answer"}),
            ("final_answer", {"answer"}),
        ):
            found = set(re.findall(r"{(\w*)}", getattr(self, name)))
            if found != fields:
                raise ValueError(
                    f"template {self.name!r}: field {name!r} must contain exactly "
                    f"{', '.join('{' + f + '}' for f in sorted(fields)) or 'no placeholder'}, got {getattr(self, name)!r}"
                )


SELF_ASK = Template(
    name="self-ask",
    question="Question: {question}\n",
    follow_ups_needed="Are follow up questions needed here: Yes.\n",
    no_follow_ups="Are follow up questions needed here: No.\n",
    follow_up="Follow up: {question}\nIntermediate answer:",
    intermediate_answer=" {answer}\n",
    final_answer="So the final answer is: {answer}",
)

LEAST_TO_MOST = Template(
    name="least-to-most",
    question="Q: {question}\n",
    follow_ups_needed="A: To answer this, first solve these subquestions.\n",
    no_follow_ups="A: This can be answered directly.\n",
    follow_up="Subquestion: {question}\nAnswer:",
    intermediate_answer=" {answer}\n",
    final_answer="The answer is: {answer}",
)

TEMPLATES = {t.name: t for t in (SELF_ASK, LEAST_TO_MOST)}


def _weights(value: Mapping[str, float] | float, name: str) -> dict[str, float]:
    table = {s: float(value) for s in ANSWER_SOURCES} if isinstance(value, (int, float)) else dict(value)
    unknown = set(table) - set(ANSWER_SOURCES)
    if unknown:
        raise ValueError(f"LossPolicy.{name}: unknown answer_source {sorted(unknown)}; known: {', '.join(ANSWER_SOURCES)}")
    return table


@dataclass(frozen=True)
class LossPolicy:
    """How much each span counts in the loss: 0 masks it, 1 trains it, anything between is a per-token weight.

    Args:
        question, decision, follow_up (`float`): Weights of those span kinds.
        intermediate_answer (`float` or `dict[str, float]`): Weight by the child's ``answer_source`` (flat mode;
            in recursive mode a child's answer is taught by its own episode and always masked in the parent).
            Sources left out count 0.
        final_answer (`float` or `dict[str, float]`): Weight by the node's ``answer_source``; sources left out
            count 0, so an episode whose answer has weight 0 still trains its decision and follow-ups.
    """

    question: float = 0.0
    decision: float = 1.0
    follow_up: float = 1.0
    intermediate_answer: Mapping[str, float] | float = 0.0
    final_answer: Mapping[str, float] | float = field(
        default_factory=lambda: {"gold": 1.0, "derived": 1.0, "model": 1.0, "tool": 1.0}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediate_answer", _weights(self.intermediate_answer, "intermediate_answer"))
        object.__setattr__(self, "final_answer", _weights(self.final_answer, "final_answer"))
        for name in ("question", "decision", "follow_up"):
            self._check(name, getattr(self, name))
        for name in ("intermediate_answer", "final_answer"):
            for source, weight in getattr(self, name).items():
                self._check(f"{name}[{source!r}]", weight)

    @staticmethod
    def _check(name: str, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"LossPolicy.{name} must be a weight in [0, 1], got {weight}")

    def weight(self, kind: str, source: Optional[str] = None) -> float:
        """The weight of a span of `kind` whose answer came from `source`."""
        if kind in ("intermediate_answer", "final_answer"):
            return getattr(self, kind).get(source or "none", 0.0)
        return getattr(self, kind)


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` of an episode, of `kind`, counting `weight` in the loss."""

    start: int
    end: int
    kind: str
    weight: float
    source: Optional[str] = None


@dataclass(frozen=True)
class Episode:
    """One self-ask training sequence: its text, its spans (covering the text in order) and where it came from."""

    text: str
    spans: tuple[Span, ...]
    tree_id: Optional[str] = None
    dataset: Optional[str] = None
    path: str = "root"

    @property
    def trained_spans(self) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.weight > 0)


@dataclass(frozen=True)
class ParsedEpisode:
    """What `parse_episode` reads back from an episode's text."""

    question: str
    follow_ups: tuple[tuple[str, str], ...]
    answer: str


def clean_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space: one line per span."""
    return WHITESPACE.sub(" ", text).strip()


class Unroller:
    """Turns trees into `Episode`s with `mode`, `template`, `policy` and `max_depth`; counts what it skips.

    Args:
        mode (`str`, defaults to ``"recursive"``): ``"recursive"``, ``"flat"`` or ``"mix"`` (see the module
            docstring).
        template (`Template`, defaults to `SELF_ASK`): The wording.
        policy (`LossPolicy`, *optional*): Span weights; the default trains decisions, follow-ups and final
            answers, and masks questions and intermediate answers.
        max_depth (`int`, *optional*): Fold subtrees below this depth (the root is depth 1) into their answer.
        leaf_episodes (`bool`, defaults to `True`): In recursive mode, also give each answered non-root leaf its
            own ``No.`` episode.

    Attributes:
        skipped (`collections.Counter`): Episodes left out, by reason (e.g. a follow-up without an answer).

    Example:
        ```py
        >>> episodes = Unroller(mode="recursive")(tree)
        >>> print(episodes[0].text)
        ```
    """

    def __init__(
        self,
        mode: Mode = "recursive",
        template: Template = SELF_ASK,
        policy: Optional[LossPolicy] = None,
        max_depth: Optional[int] = None,
        leaf_episodes: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if max_depth is not None and max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.mode = mode
        self.template = template
        self.policy = policy or LossPolicy()
        self.max_depth = max_depth
        self.leaf_episodes = leaf_episodes
        self.skipped: Counter[str] = Counter()

    def __call__(self, tree: Node) -> list[Episode]:
        """All episodes of `tree`, root first (pre-order in recursive mode; in mix mode the flat episode last)."""
        if self.mode == "flat":
            return self._flat(tree)
        episodes = self._recursive(tree)
        if self.mode == "mix" and tree.depth() > 2 and (self.max_depth is None or self.max_depth > 2):
            episodes += [replace(e, path="flat:root") for e in self._flat(tree)]
        return episodes

    def _flat(self, tree: Node) -> list[Episode]:
        episode = self._episode(tree, "root", tree, self._leaves(tree, 1), answers_taught_elsewhere=False)
        return [episode] if episode else []

    def _recursive(self, tree: Node) -> list[Episode]:
        episodes = []
        for path, node, depth in self._walk(tree, "root", 1):
            children = self._children(node, depth)
            if path != "root" and not children and not self.leaf_episodes:
                continue
            episode = self._episode(tree, path, node, children, answers_taught_elsewhere=True)
            if episode:
                episodes.append(episode)
        return episodes

    def _children(self, node: Node, depth: int) -> list[Node]:
        return [] if self.max_depth is not None and depth >= self.max_depth else list(node.children)

    def _walk(self, node: Node, path: str, depth: int):
        yield path, node, depth
        for position, child in enumerate(self._children(node, depth), start=1):
            yield from self._walk(child, f"{path}/{child.id or position}", depth + 1)

    def _leaves(self, node: Node, depth: int) -> list[Node]:
        children = self._children(node, depth)
        if depth > 1 and not children:
            return [node]
        return [leaf for child in children for leaf in self._leaves(child, depth + 1)]

    def _episode(
        self, tree: Node, path: str, node: Node, follow_ups: list[Node], answers_taught_elsewhere: bool
    ) -> Optional[Episode]:
        if node.answer is None:
            self.skipped["node without an answer"] += 1
            return None
        if any(child.answer is None for child in follow_ups):
            self.skipped["follow-up without an answer"] += 1
            return None
        t, policy = self.template, self.policy
        parts: list[tuple[str, str, Optional[str]]] = [(t.question.format(question=clean_text(node.question)), "question", None)]
        parts.append((t.follow_ups_needed if follow_ups else t.no_follow_ups, "decision", None))
        for child in follow_ups:
            parts.append((t.follow_up.format(question=clean_text(child.question)), "follow_up", None))
            parts.append((t.intermediate_answer.format(answer=clean_text(child.answer)), "intermediate_answer", child.answer_source))
        parts.append((t.final_answer.format(answer=clean_text(node.answer)), "final_answer", node.answer_source))
        spans, start = [], 0
        for text, kind, source in parts:
            weight = 0.0 if kind == "intermediate_answer" and answers_taught_elsewhere else policy.weight(kind, source)
            spans.append(Span(start, start + len(text), kind, weight, source))
            start += len(text)
        return Episode("".join(p[0] for p in parts), tuple(spans), tree.id, tree.dataset, path)


def parse_episode(text: str, template: Template = SELF_ASK) -> ParsedEpisode:
    """Read an episode's text back into its question, follow-ups with their answers, and final answer.

    Raises:
        `ValueError`: naming the character offset where the text stops following `template`.
    """
    position = 0

    def take(part: str, last: bool = False) -> Optional[str]:
        nonlocal position
        pattern = re.escape(part).replace(re.escape("{question}"), "(.*?)").replace(re.escape("{answer}"), "(.*?)")
        pattern += r"\Z" if last else ""
        if "(.*?)" in pattern and not last:
            pattern = pattern.replace("(.*?)", "([^\n]*?)")
        match = re.compile(pattern, re.S).match(text, position)
        if not match:
            return None
        position = match.end()
        return match.group(1) if match.groups() else ""

    question = take(template.question)
    if question is None:
        raise ValueError(f"episode does not start with the {template.name!r} question line: {text[:60]!r}")
    follow_ups = []
    if take(template.follow_ups_needed) is not None:
        while (follow_up := take(template.follow_up)) is not None:
            answer = take(template.intermediate_answer)
            if answer is None:
                raise ValueError(f"episode: no intermediate answer after the follow-up at character {position}")
            follow_ups.append((follow_up, answer))
        if not follow_ups:
            raise ValueError(f"episode: follow-ups announced but none found at character {position}")
    elif take(template.no_follow_ups) is None:
        raise ValueError(f"episode: expected the follow-up decision at character {position}")
    answer = take(template.final_answer, last=True)
    if answer is None:
        raise ValueError(f"episode: expected the final answer at character {position}: {text[position:position + 60]!r}")
    return ParsedEpisode(question, tuple(follow_ups), answer)


def tree_from_episodes(episodes: list[Episode], template: Template = SELF_ASK) -> Node:
    """Rebuild the tree that recursive-mode `episodes` of one tree were unrolled from (questions, answers, shape).

    Each episode's path places it; its follow-ups become the node's children, which are filled in further by the
    episodes at their paths. Answer sources are not in the text and come back as ``"gold"``.
    """
    parsed = {e.path: parse_episode(e.text, template) for e in episodes}
    if "root" not in parsed:
        raise ValueError("tree_from_episodes: no episode at path 'root'")
    child_paths: dict[str, list[str]] = {}
    for path in parsed:
        if path != "root":
            child_paths.setdefault(path.rsplit("/", 1)[0], []).append(path)

    def build(path: str, question: str, answer: str) -> Node:
        node = Node(question=question, answer=answer)
        if path in parsed:
            # Follow-ups match the child episodes in order (pre-order keeps siblings in order); a follow-up without
            # an episode of its own (leaf_episodes=False) is matched to none, so equal questions never swap places.
            remaining = child_paths.get(path, [])
            for position, (q, a) in enumerate(parsed[path].follow_ups, start=1):
                match = next((i for i, p in enumerate(remaining) if parsed[p].question == q), None)
                child_path = remaining[match] if match is not None else f"{path}/{position}"
                remaining = remaining[match + 1 :] if match is not None else remaining
                child = build(child_path, q, a)
                child.id = child_path.rsplit("/", 1)[1]
                node.children.append(child)
        return node

    root = parsed["root"]
    return build("root", root.question, root.answer)
