"""Code versions: a stage's code version plus a hash of the settings that change its output.

Bump a `*_CODE` constant when the stage's code changes what it writes. Changing a setting
(hyperparameters, models, shifts) changes the hash, so Dagster marks the stage, and only
that stage and its descendants, stale.
"""

import hashlib
import json

from di_assets.settings import Settings

TEXTUAL_INVERSION_CODE = "textual-inversion-1"
ENCODER_ROOT_CODE = "encoder-root-1"
GENERATION_CODE = "generation-1"
CLIP_METRIC_CODE = "clip-metric-2"  # 2: the default filter (zero-shot, calibrated floor, shift over base)
SCORES_DB_CODE = "scores-db-1"
PREDICTIONS_CODE = "predictions-1"
DIAGNOSIS_CODE = "diagnosis-1"


# Settings that change how a stage runs, not what it writes: they leave its code version alone.
TI_RUN_ONLY = ("classes_per_batch", "workers", "checkpoint_every")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def code_versions(settings: Settings, shifts) -> dict[str, str]:
    m = settings.models
    diffusion = {"family": m.get("family", "tiny"), "diffusion": m.get("diffusion")}
    clip = {"family": m.get("family", "tiny"), "clip_model": m.get("clip_model"), "pretrained": m.get("clip_pretrained")}
    ti = {k: v for k, v in settings.textual_inversion.items() if k not in TI_RUN_ONLY}
    return {
        "class_token": f"{TEXTUAL_INVERSION_CODE}-{_digest([diffusion, ti])}",
        "encoder_root": f"{ENCODER_ROOT_CODE}-{_digest(diffusion)}",
        "counterfactuals": f"{GENERATION_CODE}-{_digest([diffusion, settings.generation, [s.prompt for s in shifts]])}",
        "clip_scores": f"{CLIP_METRIC_CODE}-{_digest([clip, settings.scoring, [s.caption for s in shifts]])}",
        "scores_db": SCORES_DB_CODE,
        "diagnosis": DIAGNOSIS_CODE,
    }


def classifier_version(spec) -> str:
    """A classifier's predictions go stale when its settings or its weights files change."""
    return f"{PREDICTIONS_CODE}-{spec.fingerprint()}"
