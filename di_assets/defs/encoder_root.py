"""encoder_root: one tokenizer + text encoder holding every class token, updated incrementally."""

import dagster as dg

from .partitions import CLASSES, OWNERS
from .resources import ModelResource, StorageResource


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
                "tokens": dg.MetadataValue.md("| index | class | token |\n|---|---|---|\n" + "\n".join(
                    f"| {ct.index} | {ct.name} | `{ct.token}` |" for ct in entries)),
            },
            # What each class's token holds is versioned by its class_token partition; the root's
            # own version is its layout (base model), so updating one class's row does not make
            # every other class's counterfactuals stale.
            data_version=dg.DataVersion(f"{code_version}:{portable_base_model(spec.resolved().diffusion)}"),
        )

    return encoder_root
