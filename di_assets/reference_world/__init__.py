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


def optimizer_step(loss, opt, sched, losses: list, step: int, steps: int, log_every: int, t0: float,
                   label: str = "step", clip_params=None) -> None:
    """Backward, (clip,) step the optimizer and the schedule, record the loss, log its running mean."""
    import time

    import torch

    opt.zero_grad()
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % log_every == 0 or step == steps:
        recent = losses[-log_every:]
        print(f"{label} {step}/{steps} loss {sum(recent) / len(recent):.4f} ({time.time() - t0:.0f}s)", flush=True)
