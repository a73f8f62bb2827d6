"""On-disk model store: one directory per variant, plus shared base snapshots.

Layout::

    STORE/
      <variant>/manifest.json        + the variant's files (safetensors / ONNX only)
      _bases/<fingerprint[:16]>/     base encoder snapshot shared by LoRA variants
      .tmp-*/                        in-flight writes (renamed into place when complete)

A variant is written into a temporary directory and renamed into place only when its files
and manifest are complete, so a reader never sees a half-written variant. Crashes (models.atomic):
a variant whose replacement was killed between its two renames is renamed back from its aside
by the next reader; the temporary directories of killed writers are removed by the next writer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from models.atomic import (
    ASIDE_PREFIX,
    aside_of,
    recover,
    remove_abandoned,
    remove_dir,
    rename_new,
    replace_dir,
    temp_dir,
)
from models.manifest import BASES_DIR, MANIFEST_NAME, Manifest, ManifestError, check_name

# Pickle-based formats can execute code on load; the store refuses them outright.
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data")


class VariantRefused(Exception):
    """A variant that exists but must not be served; `reasons` lists every problem found."""

    def __init__(self, name: str, reasons: list[str]):
        self.name = name
        self.reasons = reasons
        super().__init__(f"variant '{name}' refused: " + "; ".join(reasons))


class VariantNotFound(KeyError):
    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        listing = ", ".join(available) or "none"
        super().__init__(f"no variant '{name}' in the store; available: {listing}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory` except the manifest, keyed by relative path."""
    directory = Path(directory)
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


@dataclass(frozen=True)
class VariantInfo:
    name: str
    path: Path
    manifest: Manifest | None
    error: str | None = None  # set when the manifest itself could not be read


class Store:
    """The model store rooted at `root` (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._new_only: set[Path] = set()  # temporary dirs of writing(overwrite=False): commit must not replace

    # ---- reading ---------------------------------------------------------------------------
    def require(self) -> None:
        """Raise FileNotFoundError saying what to do when the root is not a directory: a typo or the wrong CWD
        would otherwise read as an empty store ("available: none", a service serving nothing)."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"store {self.root} is not a directory; give --store the store training wrote "
                "(default ./store; `make demo` writes demo-run/full/store)"
            )

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        self._recover_all()
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", BASES_DIR)) and (p / MANIFEST_NAME).exists()
        )

    def list(self) -> list[VariantInfo]:
        """Every variant directory, with its manifest or the reason it could not be read."""
        out = []
        for name in self.names():
            path = self.root / name
            try:
                out.append(VariantInfo(name, path, Manifest.load(path)))
            except ManifestError as e:
                out.append(VariantInfo(name, path, None, str(e)))
        return out

    def path(self, name: str) -> Path:
        check_name(name)
        path = self.root / name
        if not (path / MANIFEST_NAME).exists() and not self._recover(name):
            raise VariantNotFound(name, self.names())
        return path

    def _recover(self, name: str) -> bool:
        """Rename back a version of `name` that a killed replacement left aside (models.atomic.recover): only
        one holding a readable manifest of that name, and only while `name` is missing. True if it is there."""

        def names_it(aside: Path) -> bool:
            try:
                return Manifest.load(aside).name == name
            except ManifestError:
                return False

        return recover(self.root / name, names_it) and (self.root / name / MANIFEST_NAME).exists()

    def _recover_all(self) -> None:
        for aside in self.root.glob(f"{ASIDE_PREFIX}*"):
            name = aside_of(aside)
            if name and not (self.root / name).exists():
                self._recover(name)

    def manifest(self, name: str) -> Manifest:
        return Manifest.load(self.path(name))

    def identity(self, name: str) -> tuple[int, int]:
        """Which directory holds `name` now (device, inode): every write renames a new directory into place,
        so this changes whenever the variant is replaced, even by one with equal files."""
        st = os.stat(self.path(name))
        return st.st_dev, st.st_ino

    def base_path(self, fingerprint: str) -> Path:
        return self.root / BASES_DIR / fingerprint[:16]

    def verify(
        self,
        name: str,
        *,
        expected_base_fingerprint: str | None = None,
        check_hashes: bool = True,
    ) -> Manifest:
        """Check a variant without loading weights; raise VariantRefused listing every problem.

        Checks: manifest valid and named like its directory, no pickle files, every file
        present with the recorded sha256 and no unlisted files, label count matches the
        weights' config, a LoRA variant carries its classification head, and (when given)
        the base fingerprint equals the base the caller has loaded.
        """
        path = self.path(name)
        try:
            m = Manifest.load(path)
        except ManifestError as e:
            raise VariantRefused(name, [str(e)]) from e
        reasons: list[str] = []
        if m.name != name:
            reasons.append(f"manifest names '{m.name}' but the directory is '{name}'; rename one to match")
        pickles = [p.name for p in path.rglob("*") if p.suffix in FORBIDDEN_SUFFIXES]
        if pickles:
            reasons.append(f"pickle weight files are not allowed: {pickles}; re-save as safetensors")
        if check_hashes:
            reasons += _check_files(path, m)
        reasons += _check_labels(path, m)
        if expected_base_fingerprint is not None and m.base_fingerprint != expected_base_fingerprint:
            reasons.append(
                f"built on base {m.base_fingerprint[:12]}… but the loaded base is "
                f"{expected_base_fingerprint[:12]}…; train the adapter on this base, or serve its base "
                f"(python -m service --base {m.base_fingerprint[:12]})"
            )
        if reasons:
            raise VariantRefused(name, reasons)
        return m

    # ---- writing ---------------------------------------------------------------------------
    @contextmanager
    def writing(self, name: str, *, overwrite: bool = False) -> Iterator[Path]:
        """Yield a temporary directory; commit it with `commit()` inside the block.

        If the block raises or never commits, the temporary directory is removed and the
        store is unchanged.
        """
        check_name(name)
        # a writer cleans up after killed ones (readers may have a read-only store): versions left aside first
        # come back (so the check below sees them), then unlocked, old temporary directories go
        # (models.atomic.remove_abandoned)
        if self.root.is_dir():
            self._recover_all()
        for parent in (self.root, self.root / BASES_DIR):
            remove_abandoned(parent)
        if (self.root / name).exists() and not overwrite:
            raise FileExistsError(f"variant '{name}' already exists in {self.root}; pass overwrite to replace it")
        with temp_dir(self.root / name) as tmp:
            if not overwrite:
                self._new_only.add(tmp)
            try:
                yield tmp
            finally:
                self._new_only.discard(tmp)

    def commit(self, tmp: Path, manifest: Manifest) -> Path:
        """Hash the files in `tmp`, write the manifest and move it into place atomically."""
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in FORBIDDEN_SUFFIXES]
        if pickles:
            raise ValueError(f"refusing to store pickle files {pickles}; save weights as safetensors")
        manifest.files = hash_directory(tmp)
        if not manifest.created_at:
            manifest.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        Manifest.model_validate(manifest.model_dump())  # re-validate after mutation
        manifest.save(tmp)
        final = self.root / manifest.name
        if tmp in self._new_only:
            # another writer may have committed this name since writing() checked (a training run takes
            # minutes): the first commit wins
            try:
                rename_new(tmp, final)
            except FileExistsError as e:
                raise FileExistsError(
                    f"variant '{manifest.name}' was written to {self.root} by someone else meanwhile; "
                    "pass overwrite to replace it"
                ) from e
        else:
            replace_dir(tmp, final)
        return final

    def delete(self, name: str) -> None:
        remove_dir(self.path(name))


def _check_files(path: Path, m: Manifest) -> list[str]:
    reasons = []
    if not m.files:
        return ["manifest lists no files; re-export the variant"]
    actual = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    missing = sorted(set(m.files) - actual)
    extra = sorted(actual - set(m.files))
    if missing:
        reasons.append(f"files listed in the manifest are missing: {missing}")
    if extra:
        reasons.append(f"files not listed in the manifest: {extra}; remove them or re-export")
    for rel, digest in sorted(m.files.items()):
        if rel in actual and sha256_file(path / rel) != digest:
            reasons.append(f"{rel} does not match its sha256 in the manifest (corrupt or modified); re-export it")
    return reasons


def _check_labels(path: Path, m: Manifest) -> list[str]:
    """Label count must agree with what the weights produce."""
    import json

    from models.heads import head_out_features

    try:
        if m.kind == "lora":
            n = head_out_features(path)
            if n is None:
                return ["adapter has no classification head (modules_to_save); retrain with the head saved"]
        else:
            cfg = json.loads((path / "config.json").read_text())
            n = len(cfg.get("id2label") or {}) or cfg.get("num_labels")
    except FileNotFoundError as e:
        return [f"cannot read label count: {e.filename} is missing"]
    except (OSError, ValueError, KeyError) as e:
        return [f"cannot read label count: {e}"]
    if n != m.num_labels:
        return [f"weights produce {n} classes but the manifest has {m.num_labels} labels {m.labels}"]
    return []
