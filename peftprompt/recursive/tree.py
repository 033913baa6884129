"""Decomposition trees (``decomp-tree/v1``): the node model, ``#k`` resolution, validation and JSONL files.

A tree is a question with its answer and, as children, the sub-questions it decomposes into. A child's
`question_template` may name the answer of the k-th earlier sibling as ``#k``; `resolve_templates` writes the
self-contained `question` from it. Every error names the tree and the node: ``"musique/2hop__1_2 at root/2: ..."``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from ..atomic import write_file_atomically
from ..errors import InputError, InputFileNotFoundError

logger = logging.getLogger(__name__)

SCHEMA = "decomp-tree/v1"
ANSWER_SOURCES = ("gold", "tool", "model", "derived", "none")
EVALUATION_ONLY_DATASETS = frozenset({"compositional_celebrities", "bamboogle"})
DEFAULT_MAX_DEPTH = 8
# ``#k`` names the k-th earlier sibling; ``#12`` is one reference, not ``#1`` followed by ``2``.
REF_PATTERN = re.compile(r"#(\d+)(?!\d)")
_NON_WORD = re.compile(r"[\W_]+")
MAX_REPORTED_MESSAGES = 5

PathLike = Union[str, os.PathLike]


class TreeError(InputError):
    """An invalid tree. The message is ``"{dataset}/{id} at {path}: {problem}"``, prefixed ``"{file}:{line}: "``
    when the tree was read from a file (then also its `file` and `line`); `path` is the node's path in the tree;
    `reason` is a short category (e.g. ``"forward reference"``) for counting."""

    def __init__(
        self,
        problem: str,
        *,
        dataset: Optional[str] = None,
        tree_id: Optional[str] = None,
        path: str = "root",
        reason: str = "invalid tree",
        file: Optional[PathLike] = None,
        line: Optional[int] = None,
    ):
        super().__init__(f"{dataset or '?'}/{tree_id or '?'} at {path}: {problem}", file=file, line=line)
        self.problem, self.dataset, self.tree_id, self.path = problem, dataset, tree_id, path
        self.reason = reason

    def at(self, file: PathLike, line: int) -> "TreeError":
        """The same error, found at `line` of `file`."""
        return TreeError(
            self.problem, dataset=self.dataset, tree_id=self.tree_id, path=self.path, reason=self.reason,
            file=file, line=line,
        )


@dataclass(eq=True)
class Node:
    """One question of a decomposition tree.

    Args:
        question (`str`): The resolved, self-contained question.
        answer (`str`, *optional*): Its answer; `None` when unknown (then `answer_source` should be ``"none"``).
        aliases (`list[str]`): Other accepted answers.
        answer_source (`str`, defaults to ``"gold"``): One of `ANSWER_SOURCES`: ``gold``, ``tool`` (retrieved),
            ``model`` (written by a model), ``derived`` (computed from the children) or ``none`` (unknown).
        children (`list[Node]`): The sub-questions, in order.
        id (`str`, *optional*): The example id on a root; ``"1"``, ``"2"``, ... (the k of ``#k``) on children.
        question_template (`str`, *optional*): The question with ``#k`` references, e.g.
            ``"Who was the first president of #1?"``; authoritative: `resolve_templates` rewrites `question` from it.
        dataset (`str`, *optional*), split (`str`, *optional*): Set on roots.
        meta (`dict`): Anything else, JSON-serialisable (``{"operator": "filter"}``, ``{"evaluation_only": True}``).
    """

    question: str
    answer: Optional[str] = None
    aliases: list[str] = field(default_factory=list)
    answer_source: str = "gold"
    children: list["Node"] = field(default_factory=list)
    id: Optional[str] = None
    question_template: Optional[str] = None
    dataset: Optional[str] = None
    split: Optional[str] = None
    meta: dict = field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def depth(self) -> int:
        """Number of levels: a leaf has depth 1."""
        return 1 + max((child.depth() for child in self.children), default=0)

    def size(self) -> int:
        """Number of nodes, this one included."""
        return 1 + sum(child.size() for child in self.children)

    def iter_nodes(self, path: str = "root") -> Iterator[tuple[str, "Node"]]:
        """Yield ``(path, node)`` in pre-order; paths are ``root``, ``root/1``, ``root/2/1`` (child ids, or 1-based
        positions for children without an id)."""
        yield path, self
        for position, child in enumerate(self.children, start=1):
            yield from child.iter_nodes(_child_path(path, child, position))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (empty or `None` optional fields left out); the top level carries ``"schema"``."""
        return {"schema": SCHEMA, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("id", "dataset", "split", "question", "question_template", "answer"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.aliases:
            out["aliases"] = list(self.aliases)
        out["answer_source"] = self.answer_source
        if self.meta:
            out["meta"] = dict(self.meta)
        if self.children:
            out["children"] = [child._fields() for child in self.children]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        """Build a tree from `to_dict` output (or a hand-written dict; a child may give only `question_template`).

        Strict: an unknown key or a field of the wrong type raises `TreeError` naming the field. Templates are not
        resolved and nothing else is checked here: `read_trees` calls `resolve_templates` and `validate`.
        """
        if not isinstance(d, dict):
            raise TreeError(f"a tree must be a JSON object, got {type(d).__name__}", reason="wrong type")
        context = (_str_or_none(d.get("dataset")), _str_or_none(d.get("id")))
        if "schema" in d and d["schema"] != SCHEMA:
            raise _error(context, "root", f"unsupported schema {d['schema']!r} (expected {SCHEMA!r})", "schema")
        return cls._parse({k: v for k, v in d.items() if k != "schema"}, context, "root")

    @classmethod
    def _parse(cls, d: Any, context: tuple[Optional[str], Optional[str]], path: str) -> "Node":
        if not isinstance(d, dict):
            raise _error(context, path, f"a node must be an object, got {type(d).__name__}", "wrong type")
        unknown = sorted(set(d) - _FIELD_TYPES.keys())
        if unknown:
            raise _error(context, path, f"unknown field {unknown[0]!r}", "unknown field")
        for key, value in d.items():
            expected = _FIELD_TYPES[key]
            optional = key not in ("aliases", "children", "meta", "answer_source", "question")
            if (value is None and optional) or isinstance(value, expected):
                continue
            wanted = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise _error(context, path, f"field {key!r} must be {wanted}, got {type(value).__name__}", "wrong type")
        for key in ("aliases",):
            for item in d.get(key, []):
                if not isinstance(item, str):
                    raise _error(context, path, f"field {key!r} must hold strings, got {type(item).__name__}",
                                 "wrong type")
        if "question" not in d and d.get("question_template") is None:
            raise _error(context, path, "field 'question' is missing (give 'question' or 'question_template')",
                         "missing field")
        children = []
        for position, child in enumerate(d.get("children", []), start=1):
            child_id = child.get("id") if isinstance(child, dict) else None
            segment = child_id if isinstance(child_id, str) else str(position)
            children.append(cls._parse(child, context, f"{path}/{segment}"))
        kwargs = {k: v for k, v in d.items() if k != "children"}
        kwargs.setdefault("question", "")
        return cls(**{**kwargs, "aliases": list(d.get("aliases", [])), "meta": dict(d.get("meta", {}))},
                   children=children)


_FIELD_TYPES: dict[str, Any] = {
    "question": str,
    "answer": str,
    "aliases": list,
    "answer_source": str,
    "children": list,
    "id": str,
    "question_template": str,
    "dataset": str,
    "split": str,
    "meta": dict,
}


@dataclass
class SkipReport:
    """What was left out while reading or converting: `skipped` rows, a `Counter` of `reasons`, the first
    few `messages`."""

    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1
        if len(self.messages) < MAX_REPORTED_MESSAGES:
            self.messages.append(message)

    def __str__(self) -> str:
        if not self.skipped:
            return "skipped 0"
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.reasons.most_common())
        return f"skipped {self.skipped} ({reasons})"


def question_key(question: str) -> str:
    """A question's lower-cased words, how questions are compared across files and sets (``"City ?"`` and
    ``"city?"`` match): for repeats, for matching gold answers and for keeping evaluation questions out of training."""
    return " ".join(_NON_WORD.sub(" ", question.lower()).split())


def entity_key(name: str) -> str:
    """An entity's name without its disambiguation (``"George King (film director)"`` -> ``"george king"``), as
    `question_key` compares it."""
    return question_key(re.sub(r"\s*\([^)]*\)", "", name)) or question_key(name)


def _str_or_none(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _error(context: tuple[Optional[str], Optional[str]], path: str, problem: str, reason: str) -> TreeError:
    return TreeError(problem, dataset=context[0], tree_id=context[1], path=path, reason=reason)


def _child_path(path: str, child: Node, position: int) -> str:
    return f"{path}/{child.id if child.id is not None else position}"


def _find_sibling(siblings: list[Node], k: int) -> Optional[int]:
    """Index of the sibling named by ``#k``: the one whose id is ``str(k)``, else the k-th one if it has no id."""
    for index, sibling in enumerate(siblings):
        if sibling.id == str(k):
            return index
    if 1 <= k <= len(siblings) and siblings[k - 1].id is None:
        return k - 1
    return None


def _resolve_one(node: Node, siblings: list[Node], index: int, context, path: str) -> str:
    """The question `node.question_template` resolves to, `node` being ``siblings[index]``.

    A reference to an earlier sibling with ``answer_source="none"`` (no answer exists, e.g. StrategyQA and Break)
    is kept verbatim as ``#k``; any other sibling without an answer is an error.
    """

    def substitute(match: re.Match) -> str:
        k = int(match.group(1))
        target = _find_sibling(siblings, k)
        if target is None:
            raise _error(context, path, f"#{k} is dangling: no sibling {k}", "dangling reference")
        if target == index:
            raise _error(context, path, f"#{k} refers to the node itself (a cycle)", "self reference")
        if target > index:
            raise _error(context, path, f"#{k} is a forward reference (sibling {k} comes later)", "forward reference")
        sibling = siblings[target]
        if sibling.answer is None:
            if sibling.answer_source == "none":
                return match.group(0)
            raise _error(context, path, f"#{k} refers to sibling {k}, which has no answer", "unanswered reference")
        return sibling.answer.strip()

    return REF_PATTERN.sub(substitute, node.question_template or "")


def _context(root: Node) -> tuple[Optional[str], Optional[str]]:
    return (_str_or_none(root.dataset), _str_or_none(root.id))


def resolve_templates(root: Node) -> Node:
    """Fill `question` of every node with a `question_template`, replacing ``#k`` by the answer of the k-th earlier
    sibling (by id, or 1-based position). Modifies `root` in place and returns it.

    Raises:
        `TreeError`: for a forward reference, a self reference (a cycle), a dangling reference, or a reference to a
            sibling that has no answer (unless that sibling's `answer_source` is ``"none"``: then ``#k`` is kept).
    """
    context = _context(root)
    _check_no_cycle(root, context)

    def visit(node: Node, siblings: list[Node], index: int, path: str) -> None:
        if node.question_template is not None:
            node.question = _resolve_one(node, siblings, index, context, path)
        for position, child in enumerate(node.children, start=1):
            visit(child, node.children, position - 1, _child_path(path, child, position))

    visit(root, [], 0, "root")  # a root has no siblings: any #k in its template is dangling
    return root


def _check_no_cycle(root: Node, context) -> None:
    seen: set[int] = set()
    stack = [(root, "root")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            raise _error(context, path, "node reached twice (a cycle or a shared subtree)", "cycle")
        seen.add(id(node))
        if not isinstance(node, Node):
            raise _error(context, path, f"a child must be a Node, got {type(node).__name__}", "wrong type")
        for position, child in enumerate(node.children, start=1):
            segment = child.id if isinstance(child, Node) and child.id is not None else position
            stack.append((child, f"{path}/{segment}"))


def validate(root: Node, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Check a tree; raise `TreeError` naming the dataset, id and node path of the first problem.

    Refused: a node reached twice (cycle), depth over `max_depth`, an empty or whitespace question, an
    `answer_source` not in `ANSWER_SOURCES`, fields of the wrong type, duplicate sibling ids, and a `question` that
    is not its resolved `question_template` (an unresolved, forward, self or dangling ``#k``).
    """
    context = _context(root)
    _check_no_cycle(root, context)

    def visit(node: Node, siblings: list[Node], index: int, path: str, level: int) -> None:
        if level > max_depth:
            raise _error(context, path, f"depth {level} exceeds max_depth {max_depth}", "too deep")
        for key in ("question", "answer_source"):
            if not isinstance(getattr(node, key), str):
                raise _error(context, path, f"field {key!r} must be str", "wrong type")
        for key in ("answer", "id", "question_template", "dataset", "split"):
            if getattr(node, key) is not None and not isinstance(getattr(node, key), str):
                raise _error(context, path, f"field {key!r} must be str or null", "wrong type")
        if not isinstance(node.aliases, list) or not all(isinstance(a, str) for a in node.aliases):
            raise _error(context, path, "field 'aliases' must be a list of str", "wrong type")
        if not isinstance(node.meta, dict):
            raise _error(context, path, "field 'meta' must be a dict", "wrong type")
        if not node.question.strip():
            raise _error(context, path, "question is empty", "empty question")
        if node.answer_source not in ANSWER_SOURCES:
            raise _error(context, path, f"unknown answer_source {node.answer_source!r} (expected one of "
                         f"{', '.join(ANSWER_SOURCES)})", "unknown answer_source")
        if node.question_template is not None:
            expected = _resolve_one(node, siblings, index, context, path)
            if node.question != expected:
                raise _error(context, path, f"question {node.question!r} is not its resolved template "
                             f"{expected!r} (unresolved #k? call resolve_templates)", "unresolved reference")
        ids = Counter(child.id for child in node.children if child.id is not None)
        duplicates = sorted(child_id for child_id, count in ids.items() if count > 1)
        if duplicates:
            raise _error(context, path, f"duplicate child id {duplicates[0]!r}", "duplicate id")
        for position, child in enumerate(node.children, start=1):
            visit(child, node.children, position - 1, _child_path(path, child, position), level + 1)

    visit(root, [], 0, "root", 1)


def _open_trees(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputFileNotFoundError(f"{path}: No such file or directory", file=path) from None


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open_trees(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"not valid UTF-8 ({err.reason} at byte {err.start})", file=path,
                                 line=lineno) from err
            if line.strip():
                yield lineno, line


def _parse_line(path: Path, lineno: int, line: str, max_depth: int) -> Node:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg} at column {err.colno})", file=path, line=lineno) from err
    try:
        tree = Node.from_dict(data)
        resolve_templates(tree)
        validate(tree, max_depth)
    except TreeError as err:
        raise err.at(path, lineno) from None
    return tree


def read_trees_report(path: PathLike, max_depth: int = DEFAULT_MAX_DEPTH) -> tuple[list[Node], SkipReport]:
    """Read a ``decomp-tree/v1`` JSONL file, skipping invalid lines; return the trees and a `SkipReport`."""
    path = Path(path)
    trees: list[Node] = []
    report = SkipReport()
    with _open_trees(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                report.add("invalid UTF-8", f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                trees.append(_parse_line(path, lineno, line, max_depth))
            except TreeError as err:
                report.add(err.reason, str(err))
            except InputError as err:
                report.add("invalid JSON", str(err))
    return trees, report


def read_trees(path: PathLike, max_depth: int = DEFAULT_MAX_DEPTH, skip_invalid: bool = False) -> list[Node]:
    """Read a ``decomp-tree/v1`` JSONL file: parse, resolve the templates and validate every tree.

    Args:
        path (`str` or `os.PathLike`): One JSON object per line; blank lines are ignored.
        max_depth (`int`, defaults to `DEFAULT_MAX_DEPTH`): Deeper trees are invalid.
        skip_invalid (`bool`, defaults to `False`): Skip invalid lines (logging how many and why; use
            `read_trees_report` to get the counts) instead of raising.

    Raises:
        `InputError`: ``"{file}:{line}: invalid JSON (...)"``, or a `TreeError` prefixed with ``file:line``;
        `InputFileNotFoundError` when `path` does not exist.
    """
    if skip_invalid:
        trees, report = read_trees_report(path, max_depth)
        if report.skipped:
            logger.warning("%s: %s; first: %s", path, report, report.messages[0])
        return trees
    path = Path(path)
    return [_parse_line(path, lineno, line, max_depth) for lineno, line in _iter_lines(path)]


def write_trees(path: PathLike, trees: Iterable[Node]) -> int:
    """Write trees as JSONL atomically (a temporary file in the same folder, then `os.replace`); return the count.

    Every tree is validated first (without a depth limit), so a bad tree leaves any existing file untouched.
    """
    count = 0

    def write(f) -> None:
        nonlocal count
        for tree in trees:
            validate(tree, max_depth=1_000_000)
            f.write(json.dumps(tree.to_dict(), ensure_ascii=False) + "\n")
            count += 1

    write_file_atomically(Path(path), write)
    return count


def tree_stats(trees: Iterable[Node]) -> dict[str, Any]:
    """Counts over `trees`: ``trees``, ``nodes``, ``leaves``, ``depth_histogram`` (tree depth -> trees),
    ``children_histogram`` (children of an inner node -> inner nodes), ``answer_sources`` (source -> nodes) and
    ``datasets`` (dataset -> trees). Histogram keys are ints, in increasing order."""
    depths: Counter = Counter()
    fanout: Counter = Counter()
    sources: Counter = Counter()
    datasets: Counter = Counter()
    n_trees = n_nodes = n_leaves = 0
    for tree in trees:
        n_trees += 1
        depths[tree.depth()] += 1
        datasets[tree.dataset or "unknown"] += 1
        for _, node in tree.iter_nodes():
            n_nodes += 1
            sources[node.answer_source] += 1
            if node.children:
                fanout[len(node.children)] += 1
            else:
                n_leaves += 1
    return {
        "trees": n_trees,
        "nodes": n_nodes,
        "leaves": n_leaves,
        "depth_histogram": dict(sorted(depths.items())),
        "children_histogram": dict(sorted(fanout.items())),
        "answer_sources": dict(sources.most_common()),
        "datasets": dict(datasets.most_common()),
    }


def is_evaluation_only(tree: Node) -> bool:
    """Whether `tree` comes from a benchmark that must not be trained on."""
    return tree.dataset in EVALUATION_ONLY_DATASETS or bool(tree.meta.get("evaluation_only"))


def check_trainable(trees: Iterable[Node], allow_evaluation_only: bool = False) -> None:
    """Refuse evaluation-only trees (datasets in `EVALUATION_ONLY_DATASETS` or ``meta["evaluation_only"]``).

    Raises:
        `InputError`: naming each such dataset and its number of trees, unless `allow_evaluation_only`.
    """
    if allow_evaluation_only:
        return
    found = Counter(tree.dataset or "unknown" for tree in trees if is_evaluation_only(tree))
    if found:
        listed = ", ".join(f"{name} ({count} tree{'s' if count != 1 else ''})" for name, count in sorted(found.items()))
        raise InputError(
            f"refusing to train on evaluation-only data: {listed}; these are benchmarks "
            "(pass allow_evaluation_only=True only for evaluation)"
        )
