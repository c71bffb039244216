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
        from di_assets.ml.encoder_root import class_tokens
        from di_assets.ml.models import portable_base_model

        classes = storage.classes()
        keys = sorted(k for k in context.instance.get_dynamic_partitions(CLASSES.name) if k in classes)
        if not keys:
            raise ValueError(f"no classes to put in the encoder root; is {storage.dataset} empty?")
        spec = models.spec()
        changed, kept = refresh_root(storage, {k: classes[k].name for k in keys}, spec)
        context.log.info(f"encoder root: {len(changed)} token files read, {len(kept)} classes as the root held them")
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


def refresh_root(storage: StorageResource, names: dict[str, str], spec) -> tuple[list[str], list[str]]:
    """Bring the encoder root up to date with these classes ({key: display name}, each with a token file):
    (the classes whose token file it read, the classes it kept as it held them).

    A class whose token file has the signature the root recorded when it last read it stays as the root
    holds it: an update of one class reads one token file, not 21,000 (1.6 s against 18.2 s,
    `benchmarks/bench_root_update.py`). Existing classes keep their index and ids; changed tokens
    replace their rows; new ones append."""
    from di_assets.ml.encoder_root import class_tokens, root_base_model, update_token_dictionary
    from di_assets.ml.models import portable_base_model
    from di_assets.ml.textual_inversion import load_learned_embeds

    files = token_files(storage, list(names))
    missing = [k for k in names if k not in files]
    if missing:
        raise FileNotFoundError(f"classes {name_list(missing)} have no learned token yet; materialize class_token "
                                "for them first")
    keep = []
    if root_base_model(storage.encoder_root) == portable_base_model(spec.resolved().diffusion):
        held = {ct.key: ct for ct in class_tokens(storage.encoder_root)}
        keep = [k for k in names if as_the_root_read_it(held.get(k), files[k][1])]
    changed = sorted(names.keys() - set(keep))
    tokens, embeds = zip(*(load_learned_embeds(files[k][0]) for k in changed)) if changed else ((), ())
    update_token_dictionary(storage.encoder_root, list(embeds), list(tokens), [names[k] for k in changed],
                            class_keys=changed, model=spec, keep=keep, sources=[files[k][1] for k in changed])
    return changed, keep


def token_files(storage: StorageResource, keys: list[str]) -> dict[str, tuple]:
    """{class key: (its token file's path, file_signature or None where racy)} for the classes that have one."""
    from di_assets.ml.observe import file_signatures
    from di_assets.ml.textual_inversion import EMBEDS_FILE

    base = storage.tokens_root  # joined as text: 21,000 Path joins cost more than the stat calls
    paths = {f"{base}/{k}/{EMBEDS_FILE}": k for k in keys}
    return {paths[path]: (path, sig) for path, sig in file_signatures(paths).items()}


def as_the_root_read_it(held, signature) -> bool:
    """Whether a token file (its file_signature, None where racy) is the one the root read for the class
    (its ClassToken `held`, or None): a racy signature never is, since a rewrite could keep it."""
    return signature is not None and held is not None and held.source == signature


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
    (of the known classes with a folder, as encoder_root takes them), each with its token file's digest.
    A token file whose signature is the one the root recorded when it read it is not read again."""
    from di_assets.ml.encoder_root import class_tokens, embeds_digest
    from di_assets.ml.textual_inversion import load_learned_embeds

    on_disk = storage.classes()
    files = token_files(storage, sorted(k for k in known if k in on_disk))  # no token yet: not in the root either
    meta = {"path": dg.MetadataValue.path(str(storage.encoder_root)), "classes_with_token": len(files)}
    try:
        held = {ct.key: ct for ct in class_tokens(storage.encoder_root)}
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return False, {**meta, **failed_summary(sorted(files), len(files)),
                       "reason": f"no readable encoder root ({exc.__class__.__name__})"}
    expected, unreadable = {}, []
    for key, (path, sig) in files.items():
        if as_the_root_read_it(held.get(key), sig):
            expected[key] = held[key].embeds_sha
            continue
        try:
            expected[key] = embeds_digest(load_learned_embeds(path)[1])
        except Exception:  # noqa: BLE001 - an unreadable token file fails the check, with its class named
            unreadable.append(key)
    held_sha = {k: ct.embeds_sha for k, ct in held.items()}
    missing = sorted(expected.keys() - held_sha.keys())
    extra = sorted(held_sha.keys() - expected.keys() - set(unreadable))
    stale = sorted(k for k in expected.keys() & held_sha.keys() if held_sha[k] != expected[k])
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
