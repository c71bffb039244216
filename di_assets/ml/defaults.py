"""The family defaults of the stages' hyperparameters, stated once (no torch import here).

`TextualInversionConfig` and `GenerationConfig` take their defaults from these tables, and the
settings' descriptions (the launchpad's schema) are made from them, so they cannot disagree.
`sd` follows the paper; `tiny` was measured on the reference world
(`benchmarks/reference_world_gates.py`): its norm is free because a word the tiny model never saw
keeps its small initial row.
"""

TEXTUAL_INVERSION = {
    "sd": {"steps": 3000, "learning_rate": 5e-4, "batch_size": 1, "gradient_accumulation": 1,
           "resolution": None, "num_vectors": 1, "seed": 0, "pin_norm": True, "checkpoint_every": 500,
           "classes_per_batch": None,  # None: by family and device, CLASSES_PER_BATCH below
           "workers": None},  # None: by family and device, WORKERS below
}
TEXTUAL_INVERSION["tiny"] = {**TEXTUAL_INVERSION["sd"], "steps": 500, "learning_rate": 5e-2, "batch_size": 8,
                             "pin_norm": False, "checkpoint_every": 100}

# Classes whose tokens train in one loop (one UNet pass over all their images per step), by family and
# device type, when `classes_per_batch` is unset; 1 is a class at a time (the single-class run).
# CPU: the tiny model is compute-bound at batch 8, and 3 classes together gained 6-13% in
# benchmarks/bench_multi_ti.py, within that shared machine's noise (K=1, the same code both ways,
# differed by up to 19%), so 1. CUDA: one class's batch (sd: 1 image) leaves the GPU mostly idle;
# 8 is a first choice, to be measured at 768 px (benchmarks/gpu_check.py).
CLASSES_PER_BATCH = {
    "sd": {"cuda": 8, "mps": 1, "cpu": 1},
    "tiny": {"cuda": 8, "mps": 1, "cpu": 1},
}


def default_classes_per_batch(family: str, device: str) -> int:
    """CLASSES_PER_BATCH of a family (`sd`, else the tiny row) on a device (`cuda:1` is cuda)."""
    row = CLASSES_PER_BATCH["sd" if family == "sd" else "tiny"]
    return row.get(str(device).split(":")[0], 1)


# Processes that train groups of classes side by side, by family and device type, when `workers` is
# unset; 0 is one per CPU this process may use (ml/threads.py), each with one thread, or one per group
# of classes up to twice that, so that no CPU idles while a last class trains alone. The tiny model on
# a CPU: its operations are too small for a thread team that sleeps when idle (a step at one thread
# 0.14 s, at two such threads 0.17 s, on this 2-core machine), while separate processes share nothing;
# the example's textual inversion (3 classes) took 185 s in one process, 129 s in 2 workers and 100 s
# in 3. sd on a CPU: one process, whose large operations keep a team of threads busy, without a second
# copy of the model in memory. A GPU: one.
WORKERS = {
    "sd": {"cuda": 1, "mps": 1, "cpu": 1},
    "tiny": {"cuda": 1, "mps": 1, "cpu": 0},
}


def default_workers(family: str, device: str, groups: int | None = None) -> int:
    """WORKERS of a family on a device for `groups` groups of classes (0 made as described above)."""
    n = WORKERS["sd" if family == "sd" else "tiny"].get(str(device).split(":")[0], 1)
    if n == 0:
        from .threads import cpu_budget

        n = cpu_budget()
        if groups is not None and n < groups <= 2 * n:
            n = groups
    return n


def describe_workers() -> str:
    per = "; ".join(f"{family} " + ", ".join(f"{dev} {n or 'one per CPU (up to two when classes are left over)'}"
                                             for dev, n in row.items())
                    for family, row in WORKERS.items())
    return ("Processes that train groups of classes side by side, one torch thread each (each token ends "
            f"as in one process). Unset: by family and device ({per})")


def describe_classes_per_batch() -> str:
    per = "; ".join(f"{family} " + ", ".join(f"{dev} {n}" for dev, n in row.items())
                    for family, row in CLASSES_PER_BATCH.items())
    return ("Classes whose tokens train together in one loop (one UNet pass over all their images per "
            "step; each token ends as its own run would, within float noise). Unset: by family and "
            f"device ({per})")


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
