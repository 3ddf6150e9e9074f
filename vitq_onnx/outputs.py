"""Where results go: every output is checked before any work, and written all at once.

An output must be a file name in an existing, writable folder and never one of the inputs. Files
are written into a temporary folder beside their destination and renamed into place together,
with Ctrl-C held off for the renames, so a failed or interrupted run leaves either the old files
or the whole new set — never part of one, never a temporary.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import VitqError


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Path | None]) -> None:
    """Fail before any work if an output is a folder, cannot be written, or is one of ``inputs``
    (the same file by any path: symlinks and hard links count)."""
    taken = {}
    for path in inputs:
        if path is not None and (ident := _identity(Path(path))) is not None:
            taken.setdefault(ident, Path(path))
    writable: set[Path] = set()
    for out in map(Path, outputs):
        if out.is_dir():
            raise VitqError(f"output {out} is a folder: name a file in it")
        if (clash := taken.get(_identity(out))) is not None:
            raise VitqError(f"output {out} would overwrite the input {clash}")
        parent = out.parent
        if not parent.is_dir():
            raise VitqError(f"output folder does not exist: {parent}")
        if parent not in writable:
            try:
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".vitq-"):
                    pass
            except OSError as exc:
                raise VitqError(f"cannot write to {parent}: {exc.strerror}") from None
            writable.add(parent)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C during the block is raised when the block ends, so its steps happen together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A temporary folder inside ``folder``: whatever the block writes there is renamed into
    ``folder`` (same names) when the block succeeds, and removed whatever happens."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".vitq-") as tmp:
        yield Path(tmp)
        with interrupts_held():
            for path in sorted(Path(tmp).iterdir()):
                os.replace(path, Path(folder) / path.name)
