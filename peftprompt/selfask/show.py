"""Print a self-ask run for people: the transcript (dimmed) and the trace as a tree, with each answer's source.

```
What is the capital of the birthplace of Rumi? -> Kabul
├── What is the birthplace (country only) of Rumi? -> Afghanistan (layer 1: retriever)
└── What is the capital of Afghanistan? -> Kabul (layer 1: retriever)
```

A follow-up that the model self-asked because its layer's retriever or tool had nothing reads
``(layer 1: model; the retriever had nothing)`` and has that run's follow-ups below it. An operator step shows what
the operator read: ``(layer 1: operators; later of 1975-03-08, 1987-01-14)``; one it could not compute says why.
"""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from ..recursive.tree import Node


def who_answered(node: Node) -> str:
    """``"layer 1: retriever"``, ``"layer 2: model; the tool had nothing"``, or the ``answer_source`` of a trace
    without layer records."""
    if "answerer" not in node.meta:
        return node.answer_source
    text = f"layer {node.meta.get('depth', '?')}: {node.meta['answerer']}"
    if "operator_answer" in node.meta:
        text += f"; {node.meta['operator']} of {', '.join(node.meta['parsed'])}"
    if node.meta.get("unanswered_by"):
        text += f"; the {node.meta['unanswered_by']} had nothing"
    if node.meta.get("operator_failure"):
        text += f" (operator {node.meta['operator']}: {node.meta['operator_failure']})"
    return text


def trace_tree(trace: Node, answer: Optional[str] = None) -> Tree:
    """A `rich.tree.Tree` of `trace`: the question with `answer` (default: the trace's), each follow-up with its
    answer and ``answer_source``, nested as the follow-ups were asked."""
    answer = trace.answer if answer is None else answer
    tree = Tree(f"[bold]{escape(trace.question)}[/] -> {escape(answer or '(no answer)')}")
    stack = [(tree, trace)]
    while stack:
        branch, node = stack.pop()
        for child in node.children:
            leaf = branch.add(f"{escape(child.question)} -> {escape(child.answer or '')} "
                              f"[dim]({escape(who_answered(child))})[/]")
            stack.append((leaf, child))
    return tree


def print_run(console: Console, trace: Node, answer: str, transcript: Optional[str] = None, note: str = "") -> None:
    """Print one run: its `transcript` (when given, dimmed), its trace tree and a summary line with `note`."""
    if transcript:
        console.print(escape(transcript), style="dim")
    console.print(trace_tree(trace, answer), soft_wrap=False)  # wrap long lines inside the tree, never crop them
    if note:
        console.print(f"[dim]{escape(note)}[/]")
