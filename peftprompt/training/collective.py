"""One outcome on every process: a save that fails on any process fails on all of them, with the same message.

In a distributed run a save is written by one process (the adapter, the config) or by each (a checkpoint: every
process writes its RNG state). A process whose write fails must not simply raise: the others would wait for it in
the next collective, over gloo until it has exited (``Connection closed by peer``, from inside
``broadcast_object_list``), over NCCL until the watchdog's timeout. So the writing processes catch the error, the
outcome of every process travels through one collective (``all_gather_object``), and every process raises the same
`SaveError`, which names the path, the file when the error knows it, the cause and the process that failed:

    cannot write checkpoint out/checkpoints/step-4: out/checkpoints/step-4/random_states_1.pkl: No space left on
    device (disk full) [process 1 of 2]      (one line)

```py
tmp = shared_outcome(lambda: temporary_dir(target), what="checkpoint", target=target, main_only=True)
shared_outcome(lambda: accelerator.save_state(str(tmp)), what="checkpoint", target=target)  # every process writes
```

Without a process group (one process) it is a plain call that turns the error into the same `SaveError`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from ..errors import RunError, SaveError

T = TypeVar("T")

# What an error number means for a save, where its text alone does not say it.
HINTS = {errno.ENOSPC: "disk full", errno.EFBIG: "over the file size limit (ulimit -f)"}
LOW_SPACE = 1 << 20  # an error that names no cause, on a device with less free space than this: probably full
_ERRNO_IN_TEXT = re.compile(r"(?:\bcode: |\bos error |\[Errno )(\d+)")  # safetensors: IoError(Os { code: 28, ...


def process_index_and_count() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shared_outcome(action: Callable[[], T], *, what: str, target, main_only: bool = False) -> T:
    """Run `action` on every process (on the main one only with `main_only`), then agree on the outcome.

    When `action` raised on any process, every process raises the same error: a `RunError` that `action` raised
    keeps its class and message; any other exception becomes ``SaveError("cannot write {what} {target}: {file}:
    {cause} [process i of n]")`` (the lowest failed process's). Returns the main process's result on every process.

    A collective: every process calls it, in the same order. `action` must run no collective itself (a process
    that fails would leave the others inside it); gather (``get_state_dict``, ``gathered_weights``) before.
    """
    rank, count = process_index_and_count()
    result, failure, own = None, None, None
    if rank == 0 or not main_only:
        try:
            result = action()
        except RunError as err:
            failure, own = (type(err), str(err)), err
        except Exception as err:  # noqa: BLE001 - any failure of the write is shared, then raised everywhere
            failure, own = (SaveError, describe_failure(err, what, target, rank, count)), err
    if count > 1:
        outcomes: list = [None] * count
        dist.all_gather_object(outcomes, (failure, result if rank == 0 else None))
        failure = next((f for f, _ in outcomes if f is not None), None)
        result = outcomes[0][1]
    if failure is not None:
        kind, message = failure
        raise kind(message) from own  # this process's own error, if it had one, stays in the traceback
    return result


def describe_failure(err: BaseException, what: str, target, rank: int = 0, count: int = 1) -> str:
    """One line for a failed write of `what` at `target`: the file (when the error names it; temporary names next
    to `target` are shown under `target`), the cause (``No space left on device (disk full)``, ``Permission
    denied``...; an error number found in the text of a non-`OSError`, e.g. safetensors' ``IoError(Os { code: 28
    ...``, counts too) and, with several processes, which one failed."""
    target = Path(target)
    text = (str(err).strip().splitlines() or [""])[0]
    code = err.errno if isinstance(err, OSError) and err.errno else None
    if code is None and (match := _ERRNO_IN_TEXT.search(text)):
        code = int(match.group(1))
    if code is not None:
        cause = os.strerror(code) + (f" ({HINTS[code]})" if code in HINTS else "")
    else:
        cause = text if isinstance(err, OSError) and text else f"{type(err).__name__}: {text}".rstrip(": ")
        free = _free_bytes(target)
        if free is not None and free < LOW_SPACE:
            cause += f" ({free:,} bytes free on the device: disk full?)"
    filename = getattr(err, "filename", None) if isinstance(err, OSError) else None
    file = _shown_path(Path(filename), target) if filename else None
    shown = f"{file}: " if file is not None and file != target else ""
    process = f" [process {rank} of {count}]" if count > 1 else ""
    return f"cannot write {what} {target}: {shown}{cause}{process}"


def _shown_path(path: Path, target: Path) -> Path:
    """`path` with the temporary names of `peftprompt.atomic` taken back to the names they become: a file
    ``.{name}.XXXXXXXX.tmp`` is ``name``, a file in the directory ``.{target.name}.XXXXXXXX`` next to `target` is
    in `target`; so a message names the file the user will look for."""
    if match := _TEMPORARY_FILE.fullmatch(path.name):
        path = path.with_name(match.group(1))
    try:
        first, *rest = path.relative_to(target.parent).parts
    except ValueError:
        return path
    if _TEMPORARY_DIR.fullmatch(first) and first[1:].rsplit(".", 1)[0] == target.name:
        return target.joinpath(*rest)
    return path


_TEMPORARY_FILE = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp(prefix=".name.", suffix=".tmp")
_TEMPORARY_DIR = re.compile(r"\..+\.[a-z0-9_]{8}")  # tempfile.mkdtemp(prefix=".name.")


def _free_bytes(target: Path) -> Optional[int]:
    for path in (target, *target.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None
