"""class_token: textual inversion of one class's token (partitioned by class)."""

import math

import dagster as dg

from .class_images import class_images
from .metadata import loss_curve_markdown
from .partitions import CLASSES
from .resources import InterfaceParams, ModelResource, StorageResource

TOKEN_CHECK = "token_is_finite_with_sane_norm"


@dg.asset(
    partitions_def=CLASSES,
    deps=[class_images],
    group_name="interface",
    code_version="textual-inversion-v1",
    pool="gpu",
    kinds={"pytorch", "safetensors"},
    check_specs=[dg.AssetCheckSpec(TOKEN_CHECK, asset="class_token",
                                   description="The learned vector is finite and its norm within 10x the initialiser's")],
    description="One learned token per class (textual inversion): tokens/<class>/learned_embeds.safetensors",
)
def class_token(
    context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
) -> dg.MaterializeResult:
    from di_assets.ml.textual_inversion import run_textual_inversion

    folder = storage.class_folder(context.partition_key)
    spec = models.spec()
    cfg = params.ti_config(spec.family)
    every = max(1, cfg.steps // 10)

    def progress(step, total, loss):
        if step % every == 0 or step == total:
            context.log.info(f"{folder.token}: step {step}/{total}, loss {loss:.4f}")

    result = run_textual_inversion(folder.path, folder.token, folder.name, model=spec, config=cfg,
                                   output_dir=storage.token_dir(folder.key), progress=progress)
    norm = float(result.embeds.norm(dim=-1).max())
    finite = bool(result.embeds.isfinite().all())
    sane = finite and 0 < norm <= 10 * result.init_norm
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(result.embeds_path)),
            "token": folder.token,
            "class_name": folder.name,
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "initial_eval_loss": result.initial_eval_loss,
            "final_eval_loss": result.final_eval_loss,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "loss_curve": dg.MetadataValue.md(loss_curve_markdown(result.losses)),
            "norm": norm,
        },
        check_results=[dg.AssetCheckResult(
            check_name=TOKEN_CHECK, passed=sane,
            metadata={"norm": norm if math.isfinite(norm) else -1.0, "init_norm": result.init_norm, "finite": finite},
        )],
    )
