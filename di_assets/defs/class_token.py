"""class_token: textual inversion of one class's token (partitioned by class)."""

import math

import dagster as dg

from .class_images import class_images
from .executors import gpu_tags
from .metadata import loss_curve_markdown
from .partitions import CLASSES, OWNERS
from .resources import InterfaceParams, ModelResource, StorageResource

TOKEN_CHECK = "token_is_finite_with_sane_norm"


def build_class_token(code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=CLASSES,
        deps=[class_images],
        group_name="interface",
        owners=OWNERS,
        code_version=code_version,
        pool="gpu",
        op_tags=gpu_tags(),  # dagster-k8s: a pod with a GPU, on GPU nodes
        kinds={"pytorch", "safetensors"},
        # Reruns when its class folder's data version changes, or when a class is added.
        automation_condition=dg.AutomationCondition.eager(),
        # A backfill of many classes is one run: the models load once for all of them.
        backfill_policy=dg.BackfillPolicy.single_run(),
        # Blocking: a token that fails the check stops downstream assets in the same run.
        check_specs=[dg.AssetCheckSpec(TOKEN_CHECK, asset="class_token", blocking=True,
                                       description="Every learned vector is finite, its norm within 20x the vocabulary's largest word's")],
        description="One learned token per class (textual inversion): `tokens/<class>/learned_embeds.safetensors`",
    )
    def class_token(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        from di_assets.ml.textual_inversion import NonFiniteTokenError, run_textual_inversion

        # On a machine with several GPUs, this step holds one of them until it ends.
        with models.leased_spec() as spec:
            cfg = params.ti_config(spec.family)
            every = max(1, cfg.steps // 10)
            rows, curves, failures = [], {}, {}
            for key in context.partition_keys:
                folder = storage.class_folder(key)

                def progress(step, total, loss, token=folder.token):
                    if step % every == 0 or step == total:
                        context.log.info(f"{token}: step {step}/{total}, loss {loss:.4f}")

                try:
                    r = run_textual_inversion(folder.path, folder.token, folder.name, model=spec, config=cfg,
                                              output_dir=storage.token_dir(key), progress=progress)
                except CLASS_ERRORS as exc:  # this class's own problem: the others in the range still train
                    failures[key] = _one_line(exc)
                    context.log.error(f"class_token {key}: {failures[key]}")
                    if not isinstance(exc, NonFiniteTokenError):  # the one line is the message; keep the where
                        context.log.debug(f"class_token {key}: traceback", exc_info=exc)
                    continue
                norm = float(r.embeds.norm(dim=-1).max())
                # sane: no larger than 20x the largest word of the vocabulary (an unpinned tiny
                # token ends near 10x; a diverging one runs far past that)
                ok = bool(r.embeds.isfinite().all()) and 0 < norm <= 20 * r.vocab_norm
                tail = r.losses[-max(1, len(r.losses) // 10):]
                rows.append({"class": folder.name, "token": folder.token, "final_loss": sum(tail) / len(tail),
                             "eval_before": r.initial_eval_loss, "eval_after": r.final_eval_loss, "norm": norm, "ok": ok})
                curves[folder.token] = r.losses
        raise_for_failures(failures, len(context.partition_keys))
        metadata = {
            "classes": len(rows),
            "final_loss": sum(r["final_loss"] for r in rows) / len(rows),
            "steps": cfg.steps,
            "tokens": dg.MetadataValue.md(_table(rows)),
            "loss_curve": dg.MetadataValue.md("\n\n".join(f"**{t}**\n\n{loss_curve_markdown(c)}" for t, c in curves.items())),
        }
        if len(rows) == 1:
            metadata["path"] = dg.MetadataValue.path(str(storage.token_dir(context.partition_key) / "learned_embeds.safetensors"))
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[dg.AssetCheckResult(
                check_name=TOKEN_CHECK, passed=all(r["ok"] for r in rows),
                metadata={"max_norm": max(r["norm"] if math.isfinite(r["norm"]) else -1.0 for r in rows)},
            )],
        )

    return class_token


# What one class of a range may raise without stopping the others: divergence (NonFiniteTokenError
# is a FloatingPointError), and the class folder's own problems (no readable image, gone, no
# permission; a token that clashes with the vocabulary).
CLASS_ERRORS = (FloatingPointError, ValueError, FileNotFoundError, PermissionError)


class ClassTokenError(RuntimeError):
    """Some classes of a run failed; `failures` maps each class key to its one-line reason."""

    def __init__(self, message: str, failures: dict[str, str]):
        super().__init__(message)
        self.failures = failures


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def raise_for_failures(failures: dict[str, str], total: int) -> None:
    """One error, in one line, that names every failed class and why (after the others trained)."""
    if not failures:
        return
    others = " (the other classes' tokens are written)" if len(failures) < total else ""
    raise ClassTokenError(
        f"textual inversion failed for {len(failures)} of {total} classes{others}: "
        + " | ".join(f"{k}: {why}" for k, why in failures.items()),
        dict(failures))


def _table(rows) -> str:
    lines = ["| class | token | final loss | eval loss before → after | norm |", "|---|---|---|---|---|"]
    lines += [f"| {r['class']} | `{r['token']}` | {r['final_loss']:.4f} | {r['eval_before']:.4f} → {r['eval_after']:.4f} "
              f"| {r['norm']:.3f} |" for r in rows]
    return "\n".join(lines)
