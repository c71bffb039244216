"""di-assets: dataset interfaces as Dagster software-defined assets.

The paper's Python API is importable from here; torch loads only when one is first used,
so that `dagster dev` loads the code location quickly.
"""

__version__ = "0.1.0"

__all__ = ["run_textual_inversion", "create_token_dictionary", "generate", "clip_similarity",
           "import_imagenet_star", "ModelSpec"]


def __getattr__(name):
    if name in __all__:
        from di_assets import ml

        return getattr(ml, name)
    raise AttributeError(f"module 'di_assets' has no attribute {name!r}")
