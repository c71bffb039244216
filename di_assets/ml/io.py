"""Atomic file writes, image loading and content hashing (no torch import)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger("di_assets")

MANIFEST = "manifest.json"  # a counterfactual partition's record: prompt, settings, one entry per image
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A killed run leaves at most a `.tmp-*` file, never a half-written artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in place of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_image(image, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Files in `folder` that look like images by suffix, sorted (hidden files skipped)."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def load_class_images(folder: str | os.PathLike, with_files: bool = False, limit: int | None = None):
    """Open every readable image in a class folder as RGB (with `with_files`: (files, images);
    with `limit`: the first `limit` readable ones, by file name).

    Corrupt or non-image files are skipped with a warning; a folder with no usable image
    raises a ValueError that names it.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"class folder {folder} does not exist")
    files, images = [], []
    for p in sorted(q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")):
        if limit is not None and len(images) >= limit:
            break
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.convert("RGB"))
            files.append(p)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            log.warning("skipping %s: not a readable image (%s)", p, exc.__class__.__name__)
    if not images:
        raise ValueError(
            f"class folder {folder} has no readable images; add .jpg/.png files or remove the folder"
        )
    return (files, images) if with_files else images


def read_counterfactuals(folder: str | Path) -> tuple[dict, list]:
    """A counterfactual partition's folder: its manifest and its images (RGB), in manifest order."""
    from PIL import Image

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    images = []
    for rec in manifest["images"]:
        with Image.open(folder / rec["file"]) as im:
            images.append(im.convert("RGB"))
    return manifest, images


def hash_folder(folder: str | os.PathLike) -> str:
    """Content hash of a folder's visible files (names and bytes), stable across mtimes."""
    return describe_folder(folder, check_images=False)["hash"]


def describe_folder(folder: str | os.PathLike, check_images: bool = True) -> dict:
    """One pass over a class folder: its content hash, and (with `check_images`) how many of its
    top-level files are images that Pillow can identify and which files are skipped."""
    import io

    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    h = hashlib.sha256()
    images, skipped = 0, []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        data = p.read_bytes()
        h.update(str(rel).encode())
        h.update(b"\0")
        h.update(hashlib.sha256(data).digest())
        if check_images and len(rel.parts) == 1:
            try:
                with Image.open(io.BytesIO(data)):  # the header only: cheap next to the hash
                    images += 1
            except (UnidentifiedImageError, OSError, ValueError):
                skipped.append(str(rel))
    return {"hash": h.hexdigest()[:16], "images": images, "skipped": skipped}
