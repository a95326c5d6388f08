"""Staging a bundle beside --out, committing it atomically, and what a build may replace or delete there.

A build writes into a hidden sibling `.<out>.partial-XXXX/` and renames it into place only in
`commit()`: `--out` is either untouched or complete. Each folder a build makes beside --out
(`.partial-`, `.old-` while a replaced bundle is removed, `<out>.failed`) holds a marker file
saying so; a partial or old folder's marker is also locked (flock) while its build runs. So a later
build can tell a folder left by a killed build (marker, unlocked: removed) from a running build's
(locked: left alone) and from anybody else's (no marker: never touched).

What may be replaced:
- `--out`, only with --force and only when it is provably an edgecompile bundle: its manifest loads
  (schema and keys) and every file in the folder matches the manifest's sha256, none missing or extra;
- `<out>.failed` (--keep-failed), only when it is the failed build edgecompile left there, unchanged.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgecompile import interrupt
from edgecompile.bundle.store import STAGING_MARKER, check_hashes, load_bundle
from edgecompile.inputs.files import sha256_file
from edgecompile.errors import EdgecompileError, EnvironmentProblem, InputError, is_disk_full

MARKER_SCHEMA = "edgecompile-staging/1"


class Marker:
    """The marker file of a folder a build made, locked for as long as this build uses the folder."""

    def __init__(self, folder: Path, kind: str, out: Path) -> None:
        self.path = folder / STAGING_MARKER
        self.handle = open(self.path, "w", encoding="utf-8")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        json.dump({"schema": MARKER_SCHEMA, "kind": kind, "bundle": out.name, "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, self.handle)
        self.handle.flush()

    def remove(self) -> None:
        """Delete the file (the lock stays held until release)."""
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.handle.close()


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == MARKER_SCHEMA else None


def remove_stale(out: Path) -> list[Path]:
    """Remove `.<out>.partial-*` / `.<out>.old-*` folders that killed builds left: ours and unlocked only."""
    removed = []
    pattern = glob.escape(f".{out.name}.")
    for folder in sorted(out.parent.glob(pattern + "partial-*")) + sorted(out.parent.glob(pattern + "old-*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            handle = open(folder / STAGING_MARKER, "r", encoding="utf-8")
        except OSError:
            continue  # not ours (or just being created)
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a running build's
            marker = _read_marker(folder)
            if marker is None or marker.get("bundle") != out.name or marker.get("kind") not in ("partial", "old"):
                continue
            if marker["kind"] == "old" and not out.is_dir():
                continue  # killed between the two renames: the previous bundle is inside; a person decides
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def _file_hashes(folder: Path) -> dict[str, str] | None:
    """sha256 of every file below folder except the marker; None if anything is not a regular file."""
    hashes = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent, name)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return None
            if path.is_file() and path.name != STAGING_MARKER:
                hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def not_our_failed_folder(failed: Path) -> str | None:
    """Why `<out>.failed` may not be replaced (None: absent, or the unchanged failed build we left)."""
    if not failed.exists() and not failed.is_symlink():
        return None
    if failed.is_symlink() or not failed.is_dir():
        return "exists and was not made by edgecompile (it is not a folder)"
    marker = _read_marker(failed)
    if marker is None or marker.get("kind") != "failed":
        return "exists and was not made by edgecompile (no marker)"
    found = _file_hashes(failed)
    if found != marker.get("files"):
        changed = sorted(set(found or {}) ^ set(marker.get("files") or {})) or ["a file's contents"]
        return f"exists and holds changes not made by edgecompile ({', '.join(changed[:3])})"
    return None


def why_not_a_bundle(folder: Path) -> str | None:
    """None when `folder` is provably an edgecompile bundle: manifest schema and keys, every file's sha256."""
    try:
        problems = check_hashes(load_bundle(folder))
    except EdgecompileError as exc:
        return str(exc).removeprefix(f"{folder}/")
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "") if problems else None


def check_out_dir(out: Path, force: bool, keep_failed: bool = False) -> None:
    if out.is_symlink():
        raise InputError(f"{out}: --out is a symbolic link (to {os.readlink(out)}); give the folder's real path")
    if out.exists():
        if not force:
            raise InputError(f"{out}: already exists; pass --force to replace it")
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a bundle folder; remove it first")
        problem = why_not_a_bundle(out) if any(out.iterdir()) else None
        if problem:
            raise InputError(f"{out}: exists and is not an edgecompile bundle ({problem}); --force replaces only a "
                             "bundle whose files all match its manifest")
    failed = failed_path(out)
    if keep_failed and (problem := not_our_failed_folder(failed)):
        raise InputError(f"{failed}: {problem}; --keep-failed would replace it: move it away first")


def check_out_parent(out: Path) -> None:
    """The bundle is staged beside --out: its parent must be creatable and writable."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=f".{out.name}.probe-", dir=out.parent).cleanup()
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(out) from None
        raise InputError(f"{out.parent}: --out's folder: expected a writable folder, found {exc.strerror.lower()}") from None


def disk_full(out: Path) -> EnvironmentProblem:
    return EnvironmentProblem(f"{out.parent}: no space left on device while writing the bundle; nothing was written")


class Staging:
    """A temporary folder beside `out`, renamed into place only by `commit()`.

    Any exception (including KeyboardInterrupt / SIGTERM turned into one) removes it, so `out` is
    either untouched or complete; a full disk becomes one EnvironmentProblem. Only a SIGKILL can
    leave a `.<out>.partial-*` folder behind, and the next build of the same --out removes it.
    """

    def __init__(self, out: Path, force: bool) -> None:
        self.out = Path(out)
        self.force = force
        self.committed = False
        check_out_dir(self.out, force)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.removed_stale = remove_stale(self.out)
            self.root = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(self.out) from None
            raise
        try:
            self.marker = Marker(self.root, "partial", self.out)
        except BaseException as exc:
            shutil.rmtree(self.root, ignore_errors=True)
            if is_disk_full(exc):
                raise disk_full(self.out) from None
            raise
        umask = os.umask(0)
        os.umask(umask)
        self.root.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary folder

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if not self.committed:
            shutil.rmtree(self.root, ignore_errors=True)
        self.marker.release()
        if exc is not None and not isinstance(exc, EdgecompileError) and is_disk_full(exc):
            raise disk_full(self.out) from None

    def keep_as_failed(self) -> Path:
        """Move the staging folder to `<out>.failed` for a person to inspect.

        An earlier `<out>.failed` is replaced only if it is our unchanged failed build (checked up front
        too); if it changed meanwhile, the artifacts go to a new `<out>.failed-XXXX` instead.
        """
        failed = failed_path(self.out)
        self.marker.remove()
        marker = {"schema": MARKER_SCHEMA, "kind": "failed", "bundle": self.out.name, "files": _file_hashes(self.root)}
        (self.root / STAGING_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        if not_our_failed_folder(failed) is not None:
            failed = Path(tempfile.mkdtemp(prefix=f"{failed.name}-", dir=self.out.parent))
        elif failed.exists():
            shutil.rmtree(failed)
        os.replace(self.root, failed)
        return failed

    def commit(self) -> None:
        interrupt.check()  # never publish a bundle after Ctrl-C / SIGTERM was requested
        check_out_dir(self.out, self.force)
        self.marker.remove()  # the marker is no part of the bundle
        old: tuple[Path, Marker] | None = None
        with interrupt.deferred():  # no signal between moving the old bundle aside and removing it
            try:
                if self.out.exists():
                    folder = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
                    old = (folder, Marker(folder, "old", self.out))
                    os.replace(self.out, folder / "bundle")
                try:
                    os.replace(self.root, self.out)
                except OSError:
                    if old is not None:
                        os.replace(old[0] / "bundle", self.out)
                    raise
                self.committed = True
                interrupt.settle()  # the new bundle is in place: from here on a signal changes nothing
            finally:
                if old is not None:  # never the previous bundle, unless it was replaced
                    if self.committed or not (old[0] / "bundle").exists():
                        shutil.rmtree(old[0], ignore_errors=True)
                    old[1].release()
