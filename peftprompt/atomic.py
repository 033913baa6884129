"""Write files and directories atomically: a crash or a bad input never leaves half a checkpoint, adapter or
result file behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TextIO


def _permissions(base: int) -> int:
    """`base` masked by the process umask: what ``open`` / ``mkdir`` would give (``mkstemp`` / ``mkdtemp`` give 0o600 / 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def write_file_atomically(target: Path, write: Callable[[TextIO], None]) -> Path:
    """Call ``write(f)`` on a UTF-8 text file next to `target`, then rename it to `target`.

    The previous `target` is replaced only after `write` has returned (and the data reached the disk), so it
    survives any error raised while writing; the temporary file is removed.
    """

    def write_text(path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            write(f)

    return write_path_atomically(target, write_text)


def write_path_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` with a file path next to `target` (for writers that open the file themselves, such as
    ``gguf.GGUFWriter``), then rename it to `target`: as `write_file_atomically`, the previous `target` survives any
    error raised while writing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _permissions(0o666))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory next to `target`, then rename it to `target`.

    The previous content of `target` is replaced only after `write` has returned, so it survives any error
    raised while writing. Permissions are set as a normal ``mkdir`` would (``mkdtemp`` creates 0o700).
    """
    tmp = temporary_dir(target)
    try:
        write(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(target)


def temporary_dir(target: Path) -> Path:
    """A fresh hidden directory next to `target` (``.{name}.XXXX``) to write into, then `replace_dir` it: the two
    halves of `write_dir_atomically`, for writers that are several processes (`peftprompt.training.checkpoints`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def replace_dir(tmp: Path, target: Path) -> Path:
    """Rename the complete directory `tmp` (from `temporary_dir`) to `target`, replacing what `target` held."""
    target = Path(target)
    os.chmod(tmp, _permissions(0o777))
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
