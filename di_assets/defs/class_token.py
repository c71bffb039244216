"""class_token: textual inversion of one class's token (partitioned by class)."""

import dagster as dg

from .checks import emit, partitioned_checks, run_partition_keys
from .class_images import class_images
from .executors import gpu_tags
from .partitions import CLASSES, OWNERS
from .resources import InterfaceParams, ModelResource, StorageResource

CLASS_TOKEN = dg.AssetKey("class_token")
TOKEN_CHECK = "token_is_finite_with_sane_norm"
NORM_LIMIT = 20  # a sane token: no larger than 20x the vocabulary's largest word
LOSS_CHART = "loss.png"  # the class's loss curve, beside its token


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
        # Its check (TOKEN_CHECK, below) runs after it in the same run, one result per class.
        description="One learned token per class (textual inversion): `tokens/<class>/learned_embeds.safetensors`",
    )
    def class_token(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        import di_assets.ml.textual_inversion as ti
        from di_assets.ml.train_tokens import train_tokens

        classes = storage.classes()  # once per step: a range of N classes must not list the dataset N times
        # On a machine with several GPUs, this step holds one of them until it ends.
        with models.leased_spec() as spec:
            cfg = params.ti_config(spec.family)
            every = max(1, cfg.steps // 10)
            done, failures, todo = [], {}, []
            for key in context.partition_keys:
                if key not in classes:
                    failures[key] = f"no folder {key!r} in {storage.dataset}; was it removed?"
                    context.log.error(f"class_token {key}: {failures[key]}")
                    continue
                todo.append((key, classes[key]))

            def progress_of(token):
                def progress(step, total, loss):
                    if step % every == 0 or step == total:
                        context.log.info(f"{token}: step {step}/{total}, loss {loss:.4f}")
                return progress

            # Groups of classes_per_batch classes train in one loop (each token as its own run would
            # leave it); on a CPU the groups spread over worker processes (ml/train_tokens.py).
            reporters = [progress_of(folder.token) for _, folder in todo]
            outcomes = train_tokens(
                [ti.TokenClass(folder.path, folder.token, folder.name, storage.token_dir(key)) for key, folder in todo],
                model=spec, config=cfg, threads=models.threads,
                progress=lambda i, step, total, loss: reporters[i](step, total, loss))
            for (key, folder), r in zip(todo, outcomes):
                if isinstance(r, BaseException):
                    if not isinstance(r, CLASS_ERRORS):  # not a class's own problem: the step fails
                        raise r
                    # this class's own problem: the others in the range still train
                    failures[key] = _one_line(r)
                    context.log.error(f"class_token {key}: {failures[key]}")
                    if not isinstance(r, ti.NonFiniteTokenError):  # the one line is the message; keep the where
                        context.log.debug(f"class_token {key}: traceback", exc_info=r)
                    continue
                done.append((folder.token, _record(context, storage, key, folder, r, cfg.steps)))
        failures = {k: failures[k] for k in context.partition_keys if k in failures}  # in the range's order
        raise_for_failures(failures, len(context.partition_keys))
        if len(done) > 1:  # the run's summary goes to its log, not into every partition's record
            context.log.info(f"textual inversion of {len(done)} classes, mean final loss "
                             f"{sum(f for _, f in done) / len(done):.4f}")
        return dg.MaterializeResult()

    return class_token


def _record(context: dg.AssetExecutionContext, storage: StorageResource, key: str, folder, r, steps: int) -> float:
    """A trained class's loss chart beside its token, and its partition's metadata; its final loss."""
    from di_assets.ml.io import atomic_path
    from di_assets.ml.report import loss_chart

    tail = r.losses[-max(1, len(r.losses) // 10):]
    final = sum(tail) / len(tail)
    # The class's loss curve as a file beside its token (a chart with axes and a legend);
    # the record links it, so each partition's record stays a few hundred bytes.
    chart = storage.token_dir(key) / LOSS_CHART
    with atomic_path(chart) as tmp:
        tmp.write_bytes(loss_chart({folder.token: r.losses}, {folder.token: (r.initial_eval_loss, r.final_eval_loss)}))
    # Each partition's own record, also in a run over many classes.
    context.add_asset_metadata({
        "token": folder.token, "class_name": folder.name, "steps": steps,
        "final_loss": final, "eval_loss_before": r.initial_eval_loss,
        "eval_loss_after": r.final_eval_loss, "norm": float(r.embeds.norm(dim=-1).max()),
        "path": dg.MetadataValue.path(str(storage.token_dir(key) / "learned_embeds.safetensors")),
        "loss_curve": dg.MetadataValue.path(str(chart)),
    }, partition_key=key)
    return final


def token_check_results(storage: StorageResource, spec, keys: list[str]) -> dict:
    """TOKEN_CHECK of each class, from its token file: {class: (passed, metadata)}.

    Sane: every vector finite, and the largest no larger than NORM_LIMIT x the largest word of the
    base vocabulary (an unpinned tiny token ends near 10x; a diverging one runs far past that).
    """
    from di_assets.ml.models import load_base_text_encoder
    from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds

    _, text_encoder = load_base_text_encoder(spec)  # loaded once per process (shared with the training)
    vocab = float(text_encoder.get_input_embeddings().weight.detach().norm(dim=-1).max())
    limit = NORM_LIMIT * vocab
    out = {}
    for key in keys:
        path = storage.token_dir(key) / EMBEDS_FILE
        meta = {"path": dg.MetadataValue.path(str(path)), "norm_limit": limit}
        if not path.is_file():
            out[key] = (False, {**meta, "reason": "no token file: materialize class_token for this class"})
            continue
        try:
            token, embeds = load_learned_embeds(path)  # refuses non-finite values
        except Exception as exc:  # noqa: BLE001 - an unreadable file fails the check; it is no crash of the check
            out[key] = (False, {**meta, "reason": _one_line(exc)})
            continue
        norm = float(embeds.norm(dim=-1).max())
        ok = 0 < norm <= limit
        out[key] = (ok, {**meta, "token": token, "norm": norm, "norm_over_vocabulary": norm / vocab,
                         **({} if ok else {"reason": f"norm {norm:.4g} is not in (0, {limit:.4g}] "
                                                     f"({NORM_LIMIT}x the vocabulary's largest word)"})})
    return out


def build_token_check() -> dg.AssetChecksDefinition:
    """TOKEN_CHECK, per class and blocking: a failed class stops its own counterfactuals (their
    automation condition waits for it to pass, and the asset refuses it), no other class's."""
    with partitioned_checks():
        @dg.asset_check(asset=CLASS_TOKEN, name=TOKEN_CHECK, blocking=True, partitions_def=CLASSES,
                        description=f"Every learned vector is finite, its norm within {NORM_LIMIT}x the "
                                    "vocabulary's largest word's (read from the token file)")
        def token_check(context: dg.AssetCheckExecutionContext, storage: StorageResource, models: ModelResource):
            results = token_check_results(storage, models.spec(), run_partition_keys(context, CLASSES))
            yield from emit(context, CLASS_TOKEN, TOKEN_CHECK, results, blocking=True)

    return token_check


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
