"""Crash-safe, owner-checked file writes.

Three rules every writer in fusionkit follows:

- **Atomic**: a file or directory is written beside its target under a temporary name,
  then renamed onto it, so a crash leaves either the old or the new version.
- **Ours only**: a directory is replaced only when it is empty or carries the marker of
  what fusionkit made there (:func:`check_replaceable`); anything else is an error naming
  what is there.
- **Umask respected**: temporary files and directories get the permissions an ordinary
  ``open``/``mkdir`` would give, not the 0600/0700 of :mod:`tempfile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fusionkit.errors import FusionkitError

__all__ = ["LOCK_FILE", "TEMP_PATTERNS", "current_umask", "apply_umask", "make_temp_file", "make_temp_dir",
           "atomic_write", "atomic_write_text", "sha256_file", "describe_contents", "json_marker",
           "check_replaceable", "check_file_replaceable", "json_file_marker", "replace_directory", "write_directory", "backups_of", "is_temporary",
           "recover_directory", "remove_temporaries", "LockedError", "exclusive_lock", "folder_lock"]

#: The lock file of a folder that one fusionkit process writes at a time (a run, an extraction in progress).
LOCK_FILE = ".fusionkit.lock"

#: Name patterns of the temporary entries fusionkit's writers leave behind when killed.
TEMP_PATTERNS = (".*.tmp-*", ".*.old-*", ".*.tmp")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give a file written by a library that ignores the umask (safetensors writes 0600) the usual mode."""
    os.chmod(path, 0o666 & ~current_umask())


def make_temp_file(directory: Path, name: str) -> Path:
    """An empty temporary file for ``directory/name``, with umask-respecting permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    return Path(tmp)


def make_temp_dir(directory: Path, name: str) -> Path:
    """A temporary directory for ``directory/name``, with umask-respecting permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=directory))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash while writing leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = make_temp_file(path.parent, path.name)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_contents(directory: Path, limit: int = 5) -> str:
    """A short listing of a directory's entries for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def json_marker(file: str, key: str, values: tuple[str, ...]) -> Callable[[Path], bool]:
    """A marker test: ``directory/file`` is a JSON object whose ``key`` is one of ``values``."""

    def test(directory: Path) -> bool:
        try:
            data = json.loads((directory / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get(key) in values

    return test


def json_file_marker(key: str, values: tuple[str, ...]) -> Callable[[Path], bool]:
    """A marker test for a file: a JSON object whose ``key`` is one of ``values``."""

    def test(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get(key) in values

    return test


def check_file_replaceable(target: Path, what: str, is_ours: Callable[[Path], bool]) -> None:
    """Raise unless the file ``target`` may be replaced by a new ``what`` (with its article: "an evaluation"): absent,
    or a file ``is_ours`` recognises as one fusionkit wrote. A directory, a symlink or anyone else's file is never
    replaced."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_file():
        raise FusionkitError(f"{target}: exists and is not a regular file; not replaced by {what}. Move it away.")
    if not is_ours(target):
        raise FusionkitError(f"{target}: exists and is not {what} written by fusionkit; not replaced. Move the file "
                             "away (or choose another output path).")


def check_replaceable(target: Path, what: str, is_ours: Callable[[Path], bool], flag: str = "--overwrite") -> None:
    """Raise unless ``target`` may be replaced by a new ``what``: absent, an empty directory, or one ``is_ours``.

    Never replaces a file, a symlink, the current directory or one of its parents.
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise FusionkitError(f"{target}: exists and is not a directory; choose another output path for the {what}")
    resolved = target.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise FusionkitError(f"{target}: is the current directory or one of its parents; "
                             f"give the {what} a directory of its own")
    if not any(target.iterdir()) or is_ours(target):
        return
    raise FusionkitError(
        f"{target}: not replaced: it is not a {what} made by fusionkit, and it holds {describe_contents(target)}. "
        f"{flag} only replaces an empty directory or a fusionkit {what}; choose another output path."
    )


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` onto ``target`` (already checked replaceable).

    The old version is renamed aside first and removed last, so a crash at any point leaves
    the old or the new version, recoverable with :func:`recover_directory`.
    """
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def write_directory(target: Path, fill: Callable[[Path], None]) -> Path:
    """Write a directory atomically: ``fill(tmp)`` fills a temporary directory beside ``target`` (already
    checked replaceable), which then replaces it (:func:`replace_directory`); on any failure the temporary
    directory is removed and ``target`` is as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        fill(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def backups_of(target: Path) -> list[Path]:
    """The copies of ``target`` a :func:`replace_directory` set aside (``.NAME.old-*``), oldest first."""
    return sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is one of the temporary entries fusionkit's writers leave when killed."""
    return any(path.match(pattern) for pattern in TEMP_PATTERNS)


def recover_directory(target: Path) -> None:
    """Finish or undo a :func:`replace_directory` that a crash interrupted.

    A crash between its two renames leaves only ``.NAME.old-*``: it is renamed back. Left-over
    old copies beside a complete target, and unfinished ``.NAME.tmp-*`` directories, are removed.
    """
    olds = backups_of(target)
    if not target.exists() and olds:
        os.rename(olds.pop(), target)
    for leftover in [*olds, *target.parent.glob(f".{target.name}.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary entries fusionkit's writers leave in ``directory`` when killed; returns them."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for path in directory.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class LockedError(FusionkitError):
    """Another process holds the lock of a folder fusionkit writes."""


@contextlib.contextmanager
def exclusive_lock(directory: Path, what: str, busy: str) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (its ``.fusionkit.lock``) while the block runs.

    A second holder gets :class:`LockedError` at once, naming ``what`` is written and, after the holder's
    pid and host, ``busy`` (what to do). The operating system releases the lock when the process ends, however it ends,
    so a crash never leaves a lock that blocks the next writer.
    """
    fd = _lock_file(directory / LOCK_FILE, directory, what, busy)
    _stamp(fd)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_file(path: Path, owner: Path, what: str, busy: str) -> int:
    """The open descriptor of ``path``, locked exclusively; a :class:`LockedError` naming ``owner`` and the holder
    when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise LockedError(f"{owner}: another fusionkit process is writing this {what} ({holder}). {busy}") from None
    return fd


def _stamp(fd: int) -> None:
    """Write who holds a lock into its file, for the next writer's error."""
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())


@contextlib.contextmanager
def folder_lock(target: Path, what: str, busy: str) -> Iterator[None]:
    """Hold the lock of a folder written whole and swapped into place (an export) while the block runs: the file
    ``.NAME.lock`` beside ``target``, which the holder removes when it is done.

    A second writer gets :class:`LockedError` at once (``busy`` says what to do). The lock dies with its process,
    however it ends, and a lock file that its last holder removed between another's open and lock is noticed (its
    inode is no longer the path's), so that two writers never hold it together."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    for _ in range(100):
        fd = _lock_file(path, target, what, busy)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the file we locked was removed by its last holder: lock the one at the path now
    else:
        raise LockedError(f"{target}: its lock {path} keeps changing hands; {busy}")
    _stamp(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting writer then sees a new inode at the path
        os.close(fd)
