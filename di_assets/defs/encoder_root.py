"""encoder_root: one tokenizer + text encoder holding every class token, updated incrementally."""

import dagster as dg

from .checks import MAX_NAMED, emit, failed_summary, name_list
from .partitions import CLASSES, OWNERS
from .resources import ModelResource, StorageResource

ENCODER_ROOT = dg.AssetKey("encoder_root")
ROOT_CHECK = "holds_every_current_token"


def build_encoder_root(code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        deps=[dg.AssetKey("class_token")],
        group_name="interface",
        owners=OWNERS,
        code_version=code_version,
        kinds={"pytorch"},
        automation_condition=dg.AutomationCondition.eager(),
        description="tokenizer/ + text_encoder/ (save_pretrained) + tokens.json with every class token",
    )
    def encoder_root(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource) -> dg.MaterializeResult:
        from di_assets.ml.encoder_root import class_tokens, update_token_dictionary
        from di_assets.ml.models import portable_base_model
        from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds

        classes = storage.classes()
        keys = sorted(k for k in context.instance.get_dynamic_partitions(CLASSES.name) if k in classes)
        if not keys:
            raise ValueError(f"no classes to put in the encoder root; is {storage.dataset} empty?")
        missing = [k for k in keys if not (storage.token_dir(k) / EMBEDS_FILE).exists()]
        if missing:
            raise FileNotFoundError(f"classes {missing} have no learned token yet; materialize class_token for them first")
        tokens, embeds = zip(*(load_learned_embeds(storage.token_dir(k) / EMBEDS_FILE) for k in keys))
        spec = models.spec()
        # Existing classes keep their index and ids; changed tokens replace their rows; new ones append.
        update_token_dictionary(storage.encoder_root, list(embeds), list(tokens), [classes[k].name for k in keys],
                                class_keys=keys, model=spec)
        entries = sorted(class_tokens(storage.encoder_root), key=lambda ct: ct.index)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(storage.encoder_root)),
                "num_classes": len(entries),
                "tokens": dg.MetadataValue.md(token_table(entries)),
            },
            # What each class's token holds is versioned by its class_token partition; the root's
            # own version is its layout (base model), so updating one class's row does not make
            # every other class's counterfactuals stale.
            data_version=dg.DataVersion(f"{code_version}:{portable_base_model(spec.resolved().diffusion)}"),
        )

    return encoder_root


def token_table(entries) -> str:
    """The root's classes (ClassTokens in index order) as a Markdown table: the first MAX_NAMED, then how
    many more. The whole list is the root's tokens.json; in the record it would be a megabyte at 21,000
    classes, stored again with every update."""
    rows = [f"| {ct.index} | {ct.name} | `{ct.token}` |" for ct in entries[:MAX_NAMED]]
    if len(entries) > MAX_NAMED:
        rows.append(f"| ... | and {len(entries) - MAX_NAMED} more: see `tokens.json` | |")
    return "| index | class | token |\n|---|---|---|\n" + "\n".join(rows)


def root_check_result(storage: StorageResource, known: list[str]) -> tuple[bool, dict]:
    """ROOT_CHECK from the files: the root's `tokens.json` holds exactly the classes that have a token
    (of the known classes with a folder, as encoder_root takes them), each with its token file's digest."""
    from di_assets.ml.encoder_root import class_tokens, embeds_digest
    from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds

    on_disk = storage.classes()
    expected, unreadable = {}, []
    for key in sorted(k for k in known if k in on_disk):
        path = storage.token_dir(key) / EMBEDS_FILE
        if not path.is_file():
            continue  # no token yet: not in the root either (encoder_root waits for it)
        try:
            expected[key] = embeds_digest(load_learned_embeds(path)[1])
        except Exception:  # noqa: BLE001 - an unreadable token file fails the check, with its class named
            unreadable.append(key)
    meta = {"path": dg.MetadataValue.path(str(storage.encoder_root)), "classes_with_token": len(expected)}
    try:
        held = {ct.key: ct.embeds_sha for ct in class_tokens(storage.encoder_root)}
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return False, {**meta, **failed_summary(sorted(expected), len(expected)),
                       "reason": f"no readable encoder root ({exc.__class__.__name__})"}
    missing = sorted(expected.keys() - held.keys())
    extra = sorted(held.keys() - expected.keys() - set(unreadable))
    stale = sorted(k for k in expected.keys() & held.keys() if held[k] != expected[k])
    failed = sorted({*missing, *extra, *stale, *unreadable})
    meta.update(classes_in_root=len(held), stale=name_list(stale) or "none", missing=name_list(missing) or "none",
                extra=name_list(extra) or "none", **failed_summary(failed, len(expected)))
    if unreadable:
        meta["unreadable_token"] = name_list(unreadable)
    return not failed, meta


def build_root_check() -> dg.AssetChecksDefinition:
    """ROOT_CHECK: compares digests only (no model load). Not blocking: counterfactuals already
    refuse a class whose token the root does not hold, class by class."""

    @dg.asset_check(asset=ENCODER_ROOT, name=ROOT_CHECK,
                    description="tokens.json holds exactly the classes that have a token, each with the digest "
                                "of its current token file (stale: an older token; missing; extra: a class "
                                "that has no token any more)")
    def root_check(context: dg.AssetCheckExecutionContext, storage: StorageResource):
        known = context.instance.get_dynamic_partitions(CLASSES.name)
        yield from emit(context, ENCODER_ROOT, ROOT_CHECK, {None: root_check_result(storage, known)})

    return root_check
