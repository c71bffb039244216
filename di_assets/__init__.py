"""di-assets: dataset interfaces as Dagster software-defined assets.

The paper's Python API is importable from here; torch loads only when one is first used,
so that `dagster dev` loads the code location quickly.
"""

import os as _os

# torch's idle OpenMP threads otherwise spin on cores that other processes hold (see ml/threads.py).
# Read when torch loads OpenMP, so set here, before any torch import of ours; a value already set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["run_textual_inversion", "create_token_dictionary", "generate", "clip_similarity", "evaluate",
           "import_imagenet_star", "ModelSpec", "ClassifierSpec"]


def __getattr__(name):
    if name in __all__:
        import importlib

        from di_assets.ml import _EXPORTS

        # from the defining module itself: `di_assets.ml.generate` is also a submodule's name
        return getattr(importlib.import_module(f"di_assets.ml.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'di_assets' has no attribute {name!r}")
