"""One way to create a file or a folder, for every file the project writes.

A run's folder may lie in a shared runs folder, where anyone can plant a link named like one of its
files. So a file is written into a temporary file with a random name beside its place, created
exclusively and never through a link (O_EXCL | O_NOFOLLOW), synced, and renamed into place: a rename
replaces a link itself, never what it points to, and a kill at any moment leaves the old file or the
new one. Files and folders get the user's umask, as any other tool's would (a teammate can read them
where the umask lets them). Names that come from the user are checked as names, never used as paths.
"""
import errno
import os
import secrets
from pathlib import Path

from plumbing.base.errors import BadInput

NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temporary_name(path: Path) -> Path:
    """A name beside `path` that nobody can have planted in advance."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def write_file(path, write, replace: bool = True) -> None:
    """write(f) into a new file at `path`, whole or not at all. replace=False refuses an existing
    `path` (FileExistsError), also when it appears while writing: the file is linked into place,
    which fails on any name that exists, a link included. OSError is left to the caller."""
    path = Path(path)
    tmp = temporary_name(path)
    fd = os.open(tmp, NEW, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, or a power cut could leave it empty
        if replace:
            os.replace(tmp, path)
        else:
            _link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path` only if no name `path` exists. A file system without hard links gets
    the name claimed exclusively first, then the file renamed over its claim."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.close(os.open(path, NEW, 0o666))
        os.replace(tmp, path)


def append_line(path, line: str) -> None:
    """Append one line to a text file (made if absent), never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line)


def make_folder(path) -> None:
    """A folder and its parents, with the user's umask (tempfile's folders are private: 0700)."""
    Path(path).mkdir(parents=True, exist_ok=True)


def temporary_folder(path: Path) -> Path:
    """A new, empty folder beside `path` with a random name, with the user's umask."""
    tmp = temporary_name(path)
    os.mkdir(tmp, 0o777)
    return tmp


def probe(folder) -> None:
    """Whether files can be created in `folder`: one is made (under a random name) and removed."""
    tmp = temporary_name(Path(folder) / ".writable")
    os.close(os.open(tmp, NEW, 0o666))
    tmp.unlink()


def check_name(flag: str, value: str, what: str) -> str:
    """A name the user gives (a revision, a task) that the project may put into a path: one name,
    never a path, so that it cannot reach outside the folder it is meant for."""
    if not value or value in (".", "..") or any(c in value for c in "/\\\0") or \
            not value.isprintable():
        raise BadInput(f"{flag} {value!r}: not a valid {what} (a name, not a path)")
    return value
