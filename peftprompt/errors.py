"""Errors in what the user gave (a file, a config key, a command-line argument), and runs that cannot go on.

`InputError` is the one error type that means "the input is wrong, the code is not": the command line
(``peftprompt ...``) and the recipes print it as one line and exit with status 2. It subclasses `ValueError`, so
``except ValueError`` still catches it. `RunError` means "the run cannot go on, and here is why": a save that failed
(`SaveError`: disk full, permission denied) or a stop signal (`TrainingInterrupted`); it is raised with the same
message on every process, and recipes print it as one line and exit non-zero. Every other exception is a bug or an
environment failure and keeps its traceback.

```py
>>> raise InputError("must be >= 1, got 0", file="run.yaml", line=3, field="max_steps")
InputError: run.yaml:3: field 'max_steps': must be >= 1, got 0
```
"""

from __future__ import annotations

import os
from typing import Optional, Union


class InputError(ValueError):
    """An invalid input, with where it is: `file`, `line` (1-based) and `field`, each `None` when not known.

    The message names all three that are known: ``"{file}:{line}: field {field!r}: {message}"``; a part that
    `message` already states (the location as ``file:line``, or the field name) is not repeated.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Union[str, os.PathLike, None] = None,
        line: Optional[int] = None,
        field: Optional[str] = None,
    ):
        self.message = message
        self.file = None if file is None else str(file)
        self.line, self.field = line, field
        text = message
        if field is not None and field not in message:
            text = f"field {field!r}: {text}"
        if self.file is not None:
            location = self.file if line is None else f"{self.file}:{line}"
            if location not in message:
                text = f"{location}: {text}"
        super().__init__(text)


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or directory the user named does not exist (also a `FileNotFoundError`)."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside the code: a save that failed (disk full, permission denied) or
    a stop signal. Raised with the same message on every process of a distributed run; recipes print it as one
    line and exit with `exit_code` (`peftprompt.training.recipe.run_recipe`)."""

    exit_code = 1


class SaveError(RunError, OSError):
    """A checkpoint, adapter or other output could not be written; the message names the path and the cause, and
    what was there before (the previous checkpoint, the previous adapter) is intact. Also an `OSError`, so code
    that caught the write's own error still catches it."""


class TrainingInterrupted(RunError):
    """Training stopped on a signal (SIGTERM) after writing a checkpoint; ``resume_from=latest`` continues it.
    The exit status is 128 + the signal number, as if the signal had ended the process (143 for SIGTERM)."""

    def __init__(self, message: str, signal_number: int = 15):
        super().__init__(message)
        self.exit_code = 128 + signal_number
