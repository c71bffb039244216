"""encoder_root: one tokenizer + text encoder holding every class token."""

import dagster as dg

from .class_token import class_token
from .partitions import CLASSES
from .resources import ModelResource, StorageResource


@dg.asset(
    deps=[class_token],
    group_name="interface",
    code_version="encoder-root-v1",
    kinds={"pytorch"},
    description="tokenizer/ + text_encoder/ (save_pretrained) + tokens.json with every class token",
)
def encoder_root(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource) -> dg.MaterializeResult:
    from di_assets.ml.encoder_root import create_token_dictionary, read_tokens
    from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds

    classes = storage.classes()
    keys = [k for k in context.instance.get_dynamic_partitions(CLASSES.name) if k in classes]
    # Existing classes keep their index; new ones are appended in key order.
    order: list[str] = []
    if (storage.encoder_root / "tokens.json").exists():
        order = [e["key"] for e in read_tokens(storage.encoder_root)["classes"] if e["key"] in keys]
    order += sorted(set(keys) - set(order))
    if not order:
        raise ValueError(f"no classes to put in the encoder root; is {storage.dataset} empty?")
    missing = [k for k in order if not (storage.token_dir(k) / EMBEDS_FILE).exists()]
    if missing:
        raise FileNotFoundError(f"classes {missing} have no learned token yet; materialize class_token for them first")
    tokens, embeds = zip(*(load_learned_embeds(storage.token_dir(k) / EMBEDS_FILE) for k in order))
    create_token_dictionary(list(embeds), list(tokens), [classes[k].name for k in order], storage.encoder_root,
                            model=models.spec(), class_keys=order)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(storage.encoder_root)),
        "num_classes": len(order),
        "tokens": dg.MetadataValue.md(
            "| index | class | token |\n|---|---|---|\n"
            + "\n".join(f"| {i} | {classes[k].name} | `{t}` |" for i, (k, t) in enumerate(zip(order, tokens)))
        ),
    })
