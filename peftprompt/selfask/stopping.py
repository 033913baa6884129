r"""Where a generated continuation ends: stop rules, checked on the whole text or incrementally as text comes in.

A `StopRule` names strings that end a continuation: one of `StopRule.after` ends it right after itself (kept); one
of `StopRule.line_after` ends it at the end of its line (the newline not kept). Whichever of them starts first in the
text decides. The self-ask protocol (`peftprompt.selfask.runner`) asks every step with one rule (stop after
``\nIntermediate answer:``, at the end of the ``So the final answer is:`` line, or after a ``\nQuestion:`` that starts
another question) and every forced answer with `END_OF_LINE`; a generation backend (`peftprompt.selfask.backend`)
applies them.

```py
>>> rule = StopRule(after=("\nIntermediate answer:",), line_after=("So the final answer is:",))
>>> rule.index("Follow up: Who?\nIntermediate answer: Ada")     # characters kept
36
>>> watch = rule.watch()                                         # as tokens come in
>>> [watch.feed(piece) for piece in ("So the final", " answer is: Ada", "\n")]
[False, False, True]
```

`StopWatch.feed` costs what the new text and the longest string cost, however long the continuation has grown: it
searches only the text that can still complete a string (the new piece and the few characters before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StopRule:
    """Strings that end a continuation.

    Args:
        after (`tuple[str, ...]`): The continuation ends right after the first of these (kept).
        line_after (`tuple[str, ...]`): Once one of these is written, the continuation ends at the end of its line
            (the newline not kept). The empty string is found at the start: the first newline ends it
            (`END_OF_LINE`).

    The string that starts first decides (at the same start, the smaller string).
    """

    after: tuple[str, ...] = ()
    line_after: tuple[str, ...] = ()

    def index(self, text: str) -> Optional[int]:
        """How many characters of `text` the continuation keeps, or `None` while it should go on."""
        found = [(i, mark) for mark in self.after + self.line_after if (i := text.find(mark)) >= 0]
        if not found:
            return None
        i, mark = min(found)
        if mark in self.after:
            return i + len(mark)
        end = text.find("\n", i)
        return end if end >= 0 else None

    def watch(self) -> "StopWatch":
        """An incremental check of this rule for one continuation."""
        return StopWatch(self)


END_OF_LINE = StopRule(line_after=("",))
"""The first newline ends the continuation (a forced final answer: one line)."""


class StopWatch:
    """`StopRule.index` of a continuation that grows piece by piece, in time proportional to each piece.

    `feed` appends a piece and says whether the text so far has reached the rule's end (``rule.index(text) is not
    None``); `peek` says the same of the text with a piece that may still change (e.g. an incomplete character) and
    keeps nothing. Only the last ``longest string - 1`` characters are kept, with the start of a pending
    `StopRule.line_after` string (waiting for its newline)."""

    def __init__(self, rule: StopRule):
        self.rule = rule
        self.marks = sorted(rule.after + rule.line_after, key=len)
        self.keep = max([len(m) - 1 for m in self.marks] + [0])  # characters that may begin a string
        self.tail = ""  # the last `keep` characters fed
        self.fed = 0  # characters fed
        self.line_from: Optional[int] = None  # where the pending line_after string starts (characters fed)
        self.pending: Optional[str] = None
        self.stopped = False
        self._check("", commit=True, initial=True)  # an empty string is found before anything is fed

    def feed(self, piece: str) -> bool:
        """Append `piece`; whether the continuation has reached its end."""
        if not self.stopped:
            self._check(piece, commit=True)
        return self.stopped

    def peek(self, piece: str) -> bool:
        """Whether the continuation would have reached its end with `piece` appended (nothing is kept)."""
        return self.stopped or self._check(piece, commit=False)

    def _check(self, piece: str, commit: bool, initial: bool = False) -> bool:
        window = self.tail + piece
        start = self.fed - len(self.tail)  # where the window starts in the text
        found = [] if self.line_from is None else [(self.line_from, self.pending)]
        for mark in self.marks:
            # only an occurrence that ends in `piece` is new (an empty string: only before anything is fed)
            i = window.find(mark, 0 if initial else max(0, len(self.tail) - len(mark) + 1))
            if i >= 0 and (mark or initial):
                found.append((start + i, mark))
        stopped, line_from, pending = False, self.line_from, self.pending
        if found:
            i, mark = min(found)
            if mark in self.rule.after:
                stopped = True
            else:
                line_from, pending = i, mark
                stopped = window.find("\n", max(0, i - start)) >= 0
        if commit:
            self.stopped, self.line_from, self.pending = stopped, line_from, pending
            self.fed += len(piece)
            self.tail = window[-self.keep:] if self.keep else ""
        return stopped
