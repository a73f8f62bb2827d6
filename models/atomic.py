"""The one atomic directory writer: build a directory under a temporary name, then rename it into place.

Readers (the service, benchmarks, a resumed training run) must never see a half-written
variant, base snapshot or checkpoint. A rename within one filesystem is atomic, so every
writer builds its directory beside the target (`.tmp-*`, which store listings skip) and
renames it in when complete; on any error the temporary directory is removed.

Hand-written rather than a library: the standard library has atomic file replacement
(`os.replace`) but nothing for directories, and the swap of an existing directory needs the
same steps everywhere.

Crashes. A killed writer leaves its `.tmp-*` directory behind; it holds an flock on it while it
lives (`temp_dir`), so `remove_abandoned` can tell a dead writer's leftovers from a live
writer's work without guessing from pids or clocks alone. Replacing a directory swaps the two
in one step where Linux can (renameat2 RENAME_EXCHANGE); elsewhere the old one is renamed
aside first, and a kill between the two renames leaves only the aside (`.tmp-old-*`), which
`recover` renames back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so remove_abandoned removes nothing
    fcntl = None  # type: ignore[assignment]

# A temporary directory is removed as abandoned only when no writer holds its lock AND it is this old: the
# age covers the instant between a writer's mkdir and its flock, and writers of code from before the lock
# (they hold none; an ONNX export of a large model takes minutes, not an hour).
ABANDONED_AFTER_S = 3600.0
# An aside is renamed back only this long after it was set aside (its ctime: a rename updates it): a live
# writer's two renames are microseconds apart, so only a dead writer's aside is this old.
RECOVER_AFTER_S = 10.0

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _load_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False where this platform or filesystem cannot (the caller
    falls back to plain renames); any other failure raises as os.rename would (EEXIST: FileExistsError)."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def temp_dir_beside(final: str | os.PathLike, tag: str = "") -> Path:
    """A new empty directory next to `final` (same filesystem, so the later rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{tag or final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


ASIDE_PREFIX = ".tmp-old-"


def _aside_name(final: Path) -> Path:
    return final.parent / f"{ASIDE_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"


def aside_of(aside: Path) -> str | None:
    """The name of the directory `aside` (`.tmp-old-<name>-<8 hex>`, _aside_name) was set aside from; None if
    it is no aside."""
    if not aside.name.startswith(ASIDE_PREFIX):
        return None
    return aside.name[len(ASIDE_PREFIX) : -9] or None


def set_aside(final: str | os.PathLike) -> list[Path]:
    """Earlier versions of `final` that replace_dir moved aside and a kill left behind (newest first): a kill
    between its two renames leaves one of these and no `final`; one after both leaves it beside `final`."""
    final = Path(final)
    found = []
    for d in final.parent.glob(f"{ASIDE_PREFIX}{final.name}-*"):
        try:  # one being removed meanwhile (by its writer, or remove_abandoned) is no longer a version
            found.append((d.stat().st_mtime, d))
        except OSError:
            continue
    return [d for _, d in sorted(found, reverse=True)]


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the complete directory `tmp` to `final`, replacing what was there.

    POSIX rename cannot replace a non-empty directory. On Linux the two are exchanged in one step
    (renameat2 RENAME_EXCHANGE) and the old one, now under `tmp`'s name, removed: a reader, or a kill,
    finds the old or the new directory at `final`, never none. Elsewhere (or a filesystem without the
    exchange) `final` is first renamed aside: a kill between the two renames leaves only the aside, which
    `set_aside` finds and `recover` renames back.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        try:
            swapped = _renameat2(tmp, final, _RENAME_EXCHANGE)
        except FileNotFoundError:  # `final` was removed meanwhile: a plain rename below
            swapped = False
        if swapped:
            shutil.rmtree(tmp, ignore_errors=True)  # the old version, under the temporary name
            return final
    if final.exists():
        trash = _aside_name(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def rename_new(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename the directory `src` to `dst` only if `dst` does not exist; FileExistsError if it does.

    renameat2 RENAME_NOREPLACE on Linux; elsewhere os.rename, which fails on a non-empty `dst` (every
    directory written here has files) but would replace an empty one.
    """
    src, dst = Path(src), Path(dst)
    try:
        if not _renameat2(src, dst, _RENAME_NOREPLACE):
            os.rename(src, dst)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise FileExistsError(e.errno, f"{dst} already exists", str(dst)) from e
    return dst


def recover(final: str | os.PathLike, is_intact: Callable[[Path], bool]) -> bool:
    """Rename back the newest intact version of `final` that a kill left aside while `final` is missing
    (replace_dir's two-rename fallback, or this code before the exchange); True when `final` exists after.

    Only asides set aside RECOVER_AFTER_S ago: a live writer between its renames is microseconds from
    putting its new version in. A store this process cannot write (a read-only mount) is left as it is.
    """
    final = Path(final)
    if final.exists():
        return True
    now = time.time()
    for aside in set_aside(final):
        try:
            if now - aside.stat().st_ctime < RECOVER_AFTER_S or not is_intact(aside):
                continue
            rename_new(aside, final)
            return True
        except FileExistsError:  # another reader recovered it, or a writer put a new version in
            return True
        except OSError:
            continue
    return final.exists()


def _hold(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on directory `path`, or None where that is not possible
    (no fcntl; NFS, which emulates flock with byte-range locks that need a writable file)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextmanager
def temp_dir(final: str | os.PathLike, tag: str = "") -> Iterator[Path]:
    """A new empty directory beside `final` (temp_dir_beside), locked while the block runs and removed after
    it unless renamed into place. The lock dies with the process, however it dies: a `.tmp-*` directory
    nobody locks is a dead writer's (remove_abandoned)."""
    tmp = temp_dir_beside(final, tag)
    fd = _hold(tmp)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def remove_abandoned(parent: str | os.PathLike) -> list[Path]:
    """Remove the `.tmp-*` directories in `parent` that killed writers left; return them.

    A directory goes only when this process can take its lock (no live writer of this code holds it; where
    locks cannot be taken nothing is removed) and it is ABANDONED_AFTER_S old (by mtime). An aside whose
    directory is missing is the only copy of that version: it is left for `recover`.
    """
    parent = Path(parent)
    if fcntl is None or not parent.is_dir():
        return []
    removed, now = [], time.time()
    for d in parent.iterdir():
        if not d.name.startswith(".tmp-"):
            continue
        if (name := aside_of(d)) is not None and not (parent / name).exists():
            continue
        try:
            if not d.is_dir() or d.is_symlink() or now - d.stat().st_mtime < ABANDONED_AFTER_S:
                continue
        except OSError:
            continue
        fd = _hold(d)
        if fd is None:  # a live writer holds it (or it cannot be locked here): keep it
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(d)
    return removed


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that readers never see it half-deleted (rename away, then remove)."""
    path = Path(path)
    trash = path.parent / f".tmp-del-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block completes it becomes `final`.

    If the block raises, the temporary directory is removed and `final` is unchanged. With
    `overwrite=False` an existing `final` is an error (checked before any work is done).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or pass overwrite")
    with temp_dir(final) as tmp:
        yield tmp
        replace_dir(tmp, final)
