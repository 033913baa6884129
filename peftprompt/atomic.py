"""Write directories atomically: a crash or a bad input never leaves half a checkpoint or adapter behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory next to `target`, then rename it to `target`.

    The previous content of `target` is replaced only after `write` has returned, so it survives any error
    raised while writing. Permissions are set as a normal ``mkdir`` would (``mkdtemp`` creates 0o700).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
