"""The one atomic directory writer: build a directory under a temporary name, then rename it into place.

Readers (the service, benchmarks, a resumed training run) must never see a half-written
variant, base snapshot or checkpoint. A rename within one filesystem is atomic, so every
writer builds its directory beside the target (`.tmp-*`, which store listings skip) and
renames it in when complete; on any error the temporary directory is removed.

Hand-written rather than a library: the standard library has atomic file replacement
(`os.replace`) but nothing for directories, and the swap of an existing directory needs the
same three steps everywhere.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_dir_beside(final: str | os.PathLike, tag: str = "") -> Path:
    """A new empty directory next to `final` (same filesystem, so the later rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{tag or final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _aside_name(final: Path) -> Path:
    return final.parent / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"


def set_aside(final: str | os.PathLike) -> list[Path]:
    """Earlier versions of `final` that replace_dir moved aside and a kill left behind (newest first): a kill
    between its two renames leaves one of these and no `final`; one after both leaves it beside `final`."""
    final = Path(final)
    found = list(final.parent.glob(f".tmp-old-{final.name}-*"))
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the complete directory `tmp` to `final`, replacing what was there.

    POSIX cannot rename a directory over a non-empty one, so an existing `final` is first
    renamed aside and removed after the swap; a reader sees either the old or the new
    directory, except for the instant between the two renames, where it sees none.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        trash = _aside_name(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


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
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
