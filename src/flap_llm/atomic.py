"""Writing that never leaves half a file: temporary siblings renamed into place once complete, removed on any
error or interruption (Ctrl-C, SIGTERM through the CLI's handler); the checks of a destination made before any
work; and a full disk turned into one line that says what was being written, what it needs and what is free,
whichever writer hit it (safetensors, the gguf package, llama-quantize, torch.save, plain text)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, FlapError


def commit(tmp: Path, path: Path) -> None:
    """Put the complete temporary `tmp` (a file or a folder) in `path`'s place; an existing folder is moved
    aside first and removed only after the rename."""
    old = None
    if path.is_dir() and tmp.is_dir():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_destination(path: Path, overwrite: bool, sources: list[str | Path] = ()) -> None:
    """Refuse a destination that is a source model, or a non-empty folder unless overwriting."""
    dest = path.resolve()
    for src in sources:
        if not src:
            continue
        s = Path(src).resolve()
        if s.exists() and (dest == s or (s.is_file() and dest == s.parent) or s.is_relative_to(dest)):
            raise FlapError(f"refusing to write into {path}: it holds the source model; choose another output folder")
        if s.is_dir() and (s / "config.json").is_file() and dest.is_relative_to(s):
            raise FlapError(f"refusing to write {path} inside the source model's folder {s}; choose a folder outside it")
    if Path.cwd().resolve().is_relative_to(dest):
        raise FlapError(f"{path} is the current folder (or holds it) and cannot be replaced; choose a new output folder")
    if path.exists() and not path.is_dir():
        raise FlapError(f"{path} exists and is not a folder; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FlapError(f"{path} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)")
    check_writable_parent(dest)


def check_writable_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a folder we can write into (checked before any work)."""
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FlapError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FlapError(f"cannot write {path}: no write permission in {parent}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(path: Path) -> Path:
    """A temporary name beside `path` that records our pid; temporaries of `path` left by a killed run
    (their pid no longer alive) are removed first."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when it is gone)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


# How the writers we use say "disk full" when they do not raise OSError(ENOSPC) themselves: safetensors (Rust's
# io::Error text), numpy's tofile under the gguf package (it checks the free space before a large tensor).
_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
               "Not enough free space to write")
_NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this free found the disk full


def _is_disk_full(e: BaseException, where: Path | None = None) -> bool:
    """Whether `e` (or an error it was raised from) says the disk is full; with `where`, also an error whose
    writer gave no reason (torch.save's "file write failed", llama-quantize's exit status) while `where`'s
    filesystem has under 1 MiB free. Interruptions (Ctrl-C, SIGTERM) are never a full disk."""
    if not isinstance(e, Exception):
        return False
    seen, err = set(), e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(err) for w in _FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    if where is None:
        return False
    try:
        return shutil.disk_usage(where).free < _NEARLY_FULL
    except OSError:
        return False


def _disk_full(path: Path, what: str, written: int, needed: int | None) -> DiskFullError:
    """The one-line error for a write that filled the disk (after its temporary output was removed)."""
    free = shutil.disk_usage(path.parent).free
    need = (f"it needs about {_human(needed)}" if needed and needed > written
            else f"it needs more than the {_human(written)} written before the disk filled" if written
            else "it needs more than is free")
    return DiskFullError(f"the disk filled while writing {what} to {path}: {need}, and {_human(free)} is free there; "
                         "nothing partial was left. Free some space or write elsewhere")


@contextmanager
def atomic_folder(path: Path, what: str = "the output folder", needed: int | None = None):
    """Yield a temporary sibling folder; on success it replaces `path`, on error nothing is left. A full disk
    ends in a DiskFullError naming `what` and the `needed` bytes (an estimate, if known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:  # errors, Ctrl-C and (through the CLI's handler) SIGTERM: no temporary output left
        full = _is_disk_full(e, path.parent)
        written = _size(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full(path, what, written, needed) from e
        raise
    try:
        commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_file(path: Path, what: str = "the output file", needed: int | None = None, shown: Path | None = None):
    """Yield a temporary name beside `path`; once the block has written it, it is renamed to `path`.
    On any error or interruption the temporary file is removed and `path` is left as it was; a full disk ends
    in a DiskFullError naming `what`, the file it is for (`shown`, when `path` is itself a temporary) and the
    `needed` bytes (an estimate, if known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException as e:
        full = _is_disk_full(e, path.parent)
        written = _size(tmp) if full else 0
        tmp.unlink(missing_ok=True)
        if full:
            raise _disk_full(shown or path, what, written, needed) from e
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it: a reader never sees half of it."""
    with atomic_file(path, needed=len(text.encode())) as tmp:
        tmp.write_text(text)
