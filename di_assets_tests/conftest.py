"""Shared fixtures: one tiny-model cache per test run, and small class-image datasets."""

import os
import shutil
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "di_assets" / "example_data"


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """The tiny models are built once per test run into a private cache (never downloaded)."""
    cache = tmp_path_factory.mktemp("di_cache")
    old = os.environ.get("DI_ASSETS_CACHE")
    os.environ["DI_ASSETS_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DI_ASSETS_CACHE", None)
    else:
        os.environ["DI_ASSETS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny():
    from di_assets.ml.models import ModelSpec

    return ModelSpec(family="tiny", device="cpu")


def copy_classes(dest: Path, classes=("circle", "square"), per_class: int | None = None) -> Path:
    for c in classes:
        (dest / c).mkdir(parents=True)
        for f in sorted((EXAMPLE / c).iterdir())[:per_class]:
            shutil.copy(f, dest / c / f.name)
    return dest


def token_classes(data: Path, out: Path, names) -> list:
    """A TokenClass per class folder `data/<name>`: token `<name>`, files under `out/<name>`."""
    from di_assets.ml.textual_inversion import TokenClass

    return [TokenClass(data / n, f"<{n}>", n, out / n) for n in names]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two classes of the bundled example, 8 images each."""
    return copy_classes(tmp_path / "dataset")
