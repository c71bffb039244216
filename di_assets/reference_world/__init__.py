"""The reference world: a small procedurally drawn world whose answers are known.

Shapes (the classes) in colours, on backgrounds that play the part of shifts. The embedded
models are trained on it, so that a flow run on the embedded default means something.
"""


def save_trained(model, out, record: dict) -> None:
    """Write a trained model's weights (safetensors) and the record of how it was made (.json)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from di_assets.ml.io import atomic_path, write_json

    print(json.dumps(record, indent=2))
    if out is None:
        return
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(out.with_suffix(".json"), record)
