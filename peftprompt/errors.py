"""Errors in what the user gave: a file, a config key, a command-line argument.

`InputError` is the one error type that means "the input is wrong, the code is not": the command line
(``peftprompt ...``) and the recipes print it as one line and exit with status 2; every other exception is a bug or
an environment failure and keeps its traceback. It subclasses `ValueError`, so ``except ValueError`` still catches it.

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
