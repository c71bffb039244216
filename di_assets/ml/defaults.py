"""The family defaults of the stages' hyperparameters, stated once (no torch import here).

`TextualInversionConfig` and `GenerationConfig` take their defaults from these tables, and the
settings' descriptions (the launchpad's schema) are made from them, so they cannot disagree.
`sd` follows the paper; `tiny` was measured on the reference world
(`benchmarks/reference_world_gates.py`): its norm is free because a word the tiny model never saw
keeps its small initial row.
"""

TEXTUAL_INVERSION = {
    "sd": {"steps": 3000, "learning_rate": 5e-4, "batch_size": 1, "gradient_accumulation": 1,
           "resolution": None, "num_vectors": 1, "seed": 0, "pin_norm": True, "checkpoint_every": 500},
}
TEXTUAL_INVERSION["tiny"] = {**TEXTUAL_INVERSION["sd"], "steps": 500, "learning_rate": 5e-2, "batch_size": 8,
                             "pin_norm": False, "checkpoint_every": 100}

GENERATION = {
    "sd": {"num_inference_steps": 50, "guidance_scale": 7.5, "scheduler": "euler", "resolution": None,
           "negative_prompt": "", "batch_size": 8},
}
GENERATION["tiny"] = {**GENERATION["sd"], "num_inference_steps": 10, "resolution": 64, "batch_size": 16}


def _show(value) -> str:
    if value is None:
        return "the model's native size"
    if value == "":
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe(table: dict, key: str, what: str) -> str:
    """`what`, then the default of each family: `Steps. Default: sd 3000, tiny 500`."""
    sd, tiny = table["sd"][key], table["tiny"][key]
    default = _show(sd) if sd == tiny else f"sd {_show(sd)}, tiny {_show(tiny)}"
    return f"{what}. Unset: the family's default ({default})"
