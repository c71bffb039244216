"""The dataset-interface library: textual inversion, encoder roots, generation, CLIP metric.

It has no Dagster import; the asset layer in `di_assets.defs` calls these functions.
Submodules import torch; this package itself does not, so light modules (shifts, classes,
io) load fast.
"""

_EXPORTS = {
    "run_textual_inversion": "textual_inversion", "TextualInversionConfig": "textual_inversion",
    "TextualInversionResult": "textual_inversion", "run_textual_inversion_many": "textual_inversion",
    "TokenClass": "textual_inversion",
    "create_token_dictionary": "encoder_root", "class_tokens": "encoder_root", "resolve_class": "encoder_root",
    "generate": "generate", "generate_samples": "generate", "generate_many": "generate", "GenerationConfig": "generate",
    "clip_similarity": "clip_metric", "ClipScorer": "clip_metric", "get_scorer": "clip_metric",
    "import_imagenet_star": "imagenet_star", "export_encoder_root": "paper_format",
    "ModelSpec": "models",
    "evaluate": "diagnosis", "ClassifierSpec": "classifiers", "load_classifier": "classifiers",
    "FilterRule": "clip_metric",
    "CATALOG": "shifts", "IMAGENET_STAR": "shifts", "Shift": "shifts", "select_shifts": "shifts",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
