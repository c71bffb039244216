"""Incremental observation of class folders: a cheap listing per folder, and a memo of descriptions.

Describing a class folder (`describe_folder`: every byte hashed, every image decoded) costs about
as much as reading the folder; listing it (`os.scandir` and `stat`: names, sizes, time stamps, no
file opened) costs a few microseconds a file. `ObservationMemo` keeps, per storage root
(`<root>/.observed/class_images.json`), each class's listing digest and its description, and
describes a folder again only when its listing changed.

A listing changes when a visible file (at any depth; hidden names are skipped as
`describe_folder` skips them) is added, removed or renamed, or its size, mtime, ctime, inode or
mode changes. A rewrite of a file changes its ctime, which no tool can set back, so a same-size
rewrite is caught even when its mtime is set back (`touch -r`, `cp -p`). Where a file system keeps
no real ctime (some network and FUSE mounts; Windows, where it is the creation time), a rewrite
that keeps the size and the mtime is not detected, as rsync's default quick check does not
detect it. `DI_ASSETS_OBSERVE_FULL=1` (or `ObservationMemo(..., full=True)`) describes every folder
again, whatever its listing.

A listing taken within a clock tick of a file's last change is "racy" (git's word): a write just
after it could keep the size and the time stamps. Its entry is described again next time.
A memo that is missing, unreadable or written by another format (or another Pillow, which may
read more or fewer images) only means that every folder is described again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path

from .io import _list_class_folder, describe_folder, write_json

log = logging.getLogger("di_assets")

MEMO = Path(".observed") / "class_images.json"
FULL_ENV = "DI_ASSETS_OBSERVE_FULL"
FORMAT = 1  # bump when describe_folder's result changes meaning: older memos are then ignored
RACY_NS = 100_000_000  # kernels stamp files from a clock that ticks every few ms
COARSE_RACY_NS = 2_000_000_000  # whole-second stamps (FAT keeps 2 s)
CHECKPOINT_S = 60.0  # a long first observation saves what it described this often


# While a command shares its listings (shared_listings): a listing taken by ObservationMemo.unchanged,
# by folder, until the next folder_listing of that folder takes it.
_HANDED: dict[str, tuple[str, bool]] | None = None


@contextlib.contextmanager
def shared_listings():
    """Within it, the listing `ObservationMemo.unchanged` takes of a folder is handed to the next
    `folder_listing` of that folder, once: `di-assets run` and `update` check the class folders before
    they start (cli's preflight), and their observation then lists each folder once, not twice. A
    listing stats every file, 1.3 million of them at ImageNet-1k; one handed over is at most a
    command's start old, and a change after it shows in the next observation, as any change after a
    listing does."""
    global _HANDED
    outer, _HANDED = _HANDED, {}
    try:
        yield
    finally:
        _HANDED = outer


def folder_listing(folder: str | os.PathLike) -> tuple[str, bool]:
    """(digest of the folder's listing, whether the listing is racy). Opens no file.

    A folder that cannot be listed raises `describe_folder`'s one-line PermissionError; one that
    is gone gives a racy digest (never trusted), and `describe_folder` reports it as it always did.
    """
    if _HANDED:
        handed = _HANDED.pop(str(folder), None)
        if handed is not None:
            return handed
    folder = Path(folder)
    h = hashlib.sha256()
    start = time.time_ns()
    state = {"newest": 0, "coarse": True, "files": 0}
    try:
        _walk(folder, "", h, state)
    except PermissionError:
        _list_class_folder(folder)  # raises its one clear line
        raise
    except OSError:
        return "missing", True
    return h.hexdigest()[:32], state["newest"] >= racy_after(start, state["coarse"] and state["files"] > 0)


def racy_after(start_ns: int, coarse: bool) -> int:
    """A file changed at or after this time (ns) may change again unseen by a listing taken at `start_ns`
    (one clock tick before it; `coarse`: the file system keeps whole seconds)."""
    return start_ns - (COARSE_RACY_NS if coarse else RACY_NS)


def file_signature(st: os.stat_result) -> list[int]:
    """What tells a version of a file from another without opening it: size, mtime, ctime, inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def without_racy(signatures: dict, start_ns: int) -> dict:
    """The file_signatures taken from `start_ns` on, each None where it is racy: changed within a clock tick
    of it (the file system keeps whole seconds when every ctime is a whole second)."""
    racy = racy_after(start_ns, bool(signatures) and all(sig[2] % 1_000_000_000 == 0 for sig in signatures.values()))
    return {key: sig if max(sig[1], sig[2]) < racy else None for key, sig in signatures.items()}


def file_signatures(paths) -> dict:
    """{path: file_signature, or None where it is racy} for each of `paths` that is a file now."""
    start, found = time.time_ns(), {}
    for path in paths:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISREG(st.st_mode):
            found[path] = file_signature(st)
    return without_racy(found, start)


def _walk(folder: Path, rel: str, h, state: dict) -> None:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        if not rel:
            raise
        h.update(f"{rel}\0unlistable\n".encode())  # rglob skips it; a fix of its mode changes the digest
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        path = rel + e.name
        try:
            if e.is_dir(follow_symlinks=False):
                h.update(f"{path}/\0{e.stat(follow_symlinks=False).st_mode}\n".encode())
                _walk(Path(e.path), path + "/", h, state)
                continue
            if not e.is_file():  # a link to a folder, a broken link, a fifo: describe_folder skips them too
                continue
            s = e.stat()  # of a link's target, whose bytes describe_folder reads
        except OSError:
            h.update(f"{path}\0?\n".encode())
            continue
        h.update(f"{path}\0{s.st_size}\0{s.st_mtime_ns}\0{s.st_ctime_ns}\0{s.st_ino}\0{s.st_mode}\n".encode())
        state["newest"] = max(state["newest"], s.st_mtime_ns, s.st_ctime_ns)
        state["coarse"] = state["coarse"] and s.st_ctime_ns % 1_000_000_000 == 0
        state["files"] += 1


def _stamp() -> str:
    import PIL

    return f"{FORMAT}/pillow-{PIL.__version__}"


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("listing"), str) and isinstance(entry.get("folder"), str)
            and isinstance(entry.get("hash"), str) and isinstance(entry.get("images"), int)
            and isinstance(entry.get("skipped"), list))


class ObservationMemo:
    """Each class's listing digest and description, kept in `<root>/.observed/class_images.json`.

    `describe(key, folder)` returns `describe_folder(folder)`, read from the memo while the
    folder's listing is unchanged; `described` lists the keys it described again (what was
    hashed), and each entry keeps `described_at` (ns). `save()` writes the memo atomically, only
    when something changed. `full` (default: `$DI_ASSETS_OBSERVE_FULL` set and not "0")
    describes every folder again.
    """

    def __init__(self, root: str | os.PathLike, full: bool | None = None):
        self.path = Path(root) / MEMO
        self.full = os.environ.get(FULL_ENV, "") not in ("", "0") if full is None else full
        self.entries: dict[str, dict] = self._load()
        self.described: list[str] = []
        self._dirty = False
        self._saved = time.monotonic()

    def _load(self) -> dict[str, dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read the observation memo %s (%s); describing every class folder again",
                        self.path, exc)
            return {}
        try:
            memo = json.loads(raw)
            stamp, classes = memo["stamp"], memo["classes"]
            if not isinstance(classes, dict) or not all(_valid(e) for e in classes.values()):
                raise ValueError("malformed entries")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("the observation memo %s is corrupt (%s); describing every class folder again",
                        self.path, " ".join(str(exc).split())[:200] or exc.__class__.__name__)
            return {}
        if stamp != _stamp():
            log.info("the observation memo %s was written for %s, not %s; describing every class folder again",
                     self.path, stamp, _stamp())
            return {}
        return classes

    def describe(self, key: str, folder: str | os.PathLike) -> tuple[dict, bool]:
        """(`describe_folder(folder)`, whether the listing changed since the memo's entry: True
        also for a class the memo does not hold)."""
        folder = Path(folder)
        digest, racy = folder_listing(folder)  # before describing: a change meanwhile shows next time
        same, kept = self._kept(key, folder, digest)
        if kept is not None:
            return kept, False
        d = describe_folder(folder)
        self.entries[key] = {"folder": str(folder), "listing": digest, "racy": racy, "hash": d["hash"],
                             "images": d["images"], "skipped": d["skipped"], "described_at": time.time_ns()}
        self.described.append(key)
        self._dirty = True
        return d, not same

    def _kept(self, key: str, folder: Path, digest: str) -> tuple[bool, dict | None]:
        """(whether the memo's entry of `key` recorded this listing of `folder`, its description where
        it may be trusted: the listing was not racy when recorded, and not every folder is described)."""
        old = self.entries.get(key)
        same = old is not None and old["listing"] == digest and old["folder"] == str(folder)
        if same and not old.get("racy") and not self.full:
            return True, {"hash": old["hash"], "images": old["images"], "skipped": list(old["skipped"])}
        return same, None

    def unchanged(self, key: str, folder: str | os.PathLike) -> dict | None:
        """The memo's description of `folder` where its listing is the one the memo recorded (then the
        folder holds the same files, byte for byte and mode for mode, as when they were all read), else
        None, also for a folder that cannot be listed. Within shared_listings, the listing is handed to
        the next folder_listing of the folder."""
        folder = Path(folder)
        try:
            listing = folder_listing(folder)
        except OSError:
            return None
        if _HANDED is not None:
            _HANDED[str(folder)] = listing
        return self._kept(key, folder, listing[0])[1]

    def checkpoint(self) -> None:
        """Save now and then during a long observation, so that a killed one keeps its work."""
        if self._dirty and time.monotonic() - self._saved > CHECKPOINT_S:
            self.save()

    def save(self, keep=None) -> None:
        """Write the memo (if changed), holding only the keys in `keep` when given. A memo that
        cannot be written is a warning: the next observation describes those folders again."""
        if keep is not None:
            gone = [k for k in self.entries if k not in keep]
            for k in gone:
                del self.entries[k]
            self._dirty = self._dirty or bool(gone)
        if not self._dirty:
            return
        try:
            write_json(self.path, {"stamp": _stamp(), "classes": self.entries}, compact=True)
        except OSError as exc:
            log.warning("cannot write the observation memo %s (%s); the next observation describes these "
                        "class folders again", self.path, exc)
        self._dirty = False
        self._saved = time.monotonic()
