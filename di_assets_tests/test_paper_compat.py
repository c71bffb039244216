"""The paper's formats and call patterns (MadryLab/dataset-interfaces): encoder roots written by
its `create_encoder`, its seeding, and its `generate(root, c, prompts, num_samples, random_seed)`."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from di_assets.ml.encoder_root import class_tokens, create_token_dictionary, resolve_class
from di_assets.ml.generate import generate
from di_assets.ml.paper_format import export_encoder_root

PROMPT = "a photo of a <TOKEN> in the snow"


class Payload:
    """Stands for a pickle that would run code on load."""


def _px(im):
    return np.asarray(im).astype(np.int16)


def _same(a, b):
    return [np.array_equal(_px(x), _px(y)) for x, y in zip(a, b)]


def write_paper_root(out, embeds, tokens, names, base, legacy=False):
    """An encoder root as the paper's `create_encoder` makes one: the base tokenizer and a float16
    text encoder, each class token added in turn (a resize per token) with its row set, both saved
    with save_pretrained, and `tokens.pt` = {'initializer_words': names, 'tokens': tokens}.

    `legacy`: the files transformers 4.x wrote then (a slow tokenizer's vocab.json, merges.txt and
    added_tokens.json; a pytorch_model.bin)."""
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float16)
    for token, embed in zip(tokens, embeds):
        assert tokenizer.add_tokens(token) == 1
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        text_encoder.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(token)] = embed
    out.mkdir(parents=True)
    if legacy:
        tok_dir = out / "tokenizer"
        tok_dir.mkdir()
        tokenizer.backend_tokenizer.model.save(str(tok_dir))
        first = len(json.loads((tok_dir / "vocab.json").read_text()))
        (tok_dir / "added_tokens.json").write_text(json.dumps({t: first + i for i, t in enumerate(tokens)}))
        specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}
        (tok_dir / "special_tokens_map.json").write_text(json.dumps(specials))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **specials}))
        enc_dir = out / "text_encoder"
        enc_dir.mkdir()
        cfg = text_encoder.config.to_dict()
        cfg["torch_dtype"] = "float16"
        (enc_dir / "config.json").write_text(json.dumps(cfg))
        torch.save(text_encoder.state_dict(), enc_dir / "pytorch_model.bin")
    else:
        tokenizer.save_pretrained(out / "tokenizer")
        text_encoder.save_pretrained(out / "text_encoder")
    torch.save({"initializer_words": list(names), "tokens": list(tokens)}, out / "tokens.pt")
    return out


@pytest.fixture(scope="module")
def paper_case(tmp_path_factory, tiny):
    g = torch.Generator().manual_seed(11)
    embeds = [torch.randn(32, generator=g) for _ in range(3)]  # the paper's tokens are one vector each
    names = ["tench", "goldfish", "great white shark"]
    tokens = [f"<{n}-{i}>" for i, n in enumerate(names)]  # the paper's tokens: `<great white shark-2>`
    base = tiny.resolved().diffusion
    folder = tmp_path_factory.mktemp("paper")
    return {"embeds": embeds, "names": names, "tokens": tokens, "base": base, "folder": folder,
            "root": write_paper_root(folder / "paper_root", embeds, tokens, names, base)}


def _paper_pipeline(root, base):
    """The paper's `get_pipe` with use_token=True, on the CPU in float32."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        base, scheduler=EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"), safety_checker=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _paper_generate(root, base, c, prompt, num_samples, random_seed, steps):
    """The paper's `generate` + `evaluate_pipe` for one prompt (without its resize to 512)."""
    tokens = torch.load(os.path.join(root, "tokens.pt"), weights_only=True)
    pipe = _paper_pipeline(root, base)
    generator = torch.Generator("cpu").manual_seed(random_seed)  # the paper: torch.Generator("cuda")
    prompt = prompt.replace("<TOKEN>", tokens["tokens"][c])
    return [pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, generator=generator).images[0]
            for _ in range(num_samples)]


@pytest.mark.parametrize("legacy", [False, True])
def test_reads_a_paper_root(paper_case, tiny, tmp_path, legacy):
    root = paper_case["root"] if not legacy else write_paper_root(
        tmp_path / "legacy", paper_case["embeds"], paper_case["tokens"], paper_case["names"], paper_case["base"],
        legacy=True)
    classes = class_tokens(root)
    assert [(c.index, c.name, c.token) for c in classes] == [
        (i, n, t) for i, (n, t) in enumerate(zip(paper_case["names"], paper_case["tokens"]))]
    tok = CLIPTokenizer.from_pretrained(paper_case["root"], subfolder="tokenizer")
    assert [c.token_ids for c in classes] == [(tok.convert_tokens_to_ids(t),) for t in paper_case["tokens"]]
    assert resolve_class(root, 2).name == "great white shark" and resolve_class(root, "goldfish").index == 1
    # a paper token with spaces is one id in a prompt
    shark = resolve_class(root, 2)
    assert shark.token_ids[0] in tok(PROMPT.replace("<TOKEN>", shark.token)).input_ids
    ours = generate(root, 1, PROMPT, num_samples=2, random_seed=3, model=tiny, num_inference_steps=3)
    named = generate(root, 1, PROMPT, num_samples=1, random_seed=3, model=tiny, num_inference_steps=3,
                     use_token=False)
    assert len(ours) == 2 and ours[0].size == (64, 64) and not all(_same(ours, named))
    if not legacy:  # the same root in the older layout generates the same images
        paper_case["images"] = ours
    elif "images" in paper_case:
        assert all(_same(ours, paper_case["images"]))


def test_seed_mode_paper_reproduces_the_papers_draws(paper_case, tiny):
    root, base = paper_case["root"], paper_case["base"]
    theirs = _paper_generate(root, base, 1, PROMPT, num_samples=3, random_seed=7, steps=3)
    ours = generate(root, 1, PROMPT, num_samples=3, random_seed=7, model=tiny, num_inference_steps=3,
                    seed_mode="paper")
    assert all(_same(ours, theirs))
    per_image = generate(root, 1, PROMPT, num_samples=3, random_seed=7, model=tiny, num_inference_steps=3)
    assert np.abs(_px(per_image[0]) - _px(theirs[0])).max() <= 2  # the first draw is seed 7's in both
    assert not _same(per_image[1:], theirs[1:])[0]  # after it, per_image reseeds: seed 8, not draw 2 of seed 7
    # with the paper's resize to 512 too
    big = generate(root, 1, PROMPT, num_samples=1, random_seed=7, model=tiny, num_inference_steps=3,
                   seed_mode="paper", output_size=512)
    assert big[0].size == (512, 512) and _same(big, [theirs[0].resize((512, 512))])[0]


def test_the_papers_call_patterns(paper_case, tiny):
    root = paper_case["root"]
    prompts = ["a photo of a <TOKEN>", PROMPT]
    kw = dict(model=tiny, num_inference_steps=2)
    rows = generate(root, 0, prompts, num_samples=2, random_seed=range(5, 7), **kw)  # the notebook's call
    assert len(rows) == 2 and [len(r) for r in rows] == [2, 2]
    flat = generate(root, 0, PROMPT, num_samples=2, random_seed=6, **kw)
    assert len(flat) == 2 and not isinstance(flat[0], list)
    assert all(_same(rows[1], flat))  # prompt 1 got seed 6
    same_seed = generate(root, 0, prompts, num_samples=1, random_seed=5, **kw)
    assert [len(r) for r in same_seed] == [1, 1] and _same(same_seed[0], rows[0])[0]
    paper_rows = generate(root, 0, prompts, num_samples=2, random_seed=[5, 6], seed_mode="paper", **kw)
    assert [len(r) for r in paper_rows] == [2, 2]
    assert all(_same(paper_rows[1], generate(root, 0, PROMPT, num_samples=2, random_seed=6, seed_mode="paper",
                                             **kw)))
    names = generate(root, 0, prompts, num_samples=1, random_seed=5, use_token=False, **kw)
    assert [len(r) for r in names] == [1, 1] and not _same(names[0], same_seed[0])[0]
    for unseeded in (-1, None):  # the paper's default, and ours
        assert len(generate(root, 0, PROMPT, num_samples=1, random_seed=unseeded, **kw)) == 1
    with pytest.raises(ValueError, match="one per prompt"):
        generate(root, 0, prompts, num_samples=1, random_seed=[1, 2, 3], **kw)


def test_export_round_trip(paper_case, tiny, tmp_path):
    """paper root -> generate; the same classes as a di-assets root -> export to the paper's format:
    the tokens, token ids, weights and images (same seed) agree."""
    # di-assets tokens are one word each, so the paper's `<great white shark-2>` becomes `<great_white_shark-2>`
    tokens = [t.replace(" ", "_") for t in paper_case["tokens"]]
    src = write_paper_root(tmp_path / "paper_root", paper_case["embeds"], tokens, paper_case["names"],
                           paper_case["base"])
    ours = create_token_dictionary(paper_case["embeds"], tokens, paper_case["names"], tmp_path / "di_root",
                                   model=tiny)
    out = export_encoder_root(ours, tmp_path / "exported", format="paper")
    assert {p.name for p in out.iterdir()} >= {"tokenizer", "text_encoder", "tokens.pt"}
    assert not (out / "tokens.json").exists()
    assert torch.load(out / "tokens.pt", weights_only=True) == torch.load(src / "tokens.pt", weights_only=True)
    tok_src, tok_out = (CLIPTokenizer.from_pretrained(r, subfolder="tokenizer") for r in (src, out))
    assert tok_out.convert_tokens_to_ids(tokens) == tok_src.convert_tokens_to_ids(tokens)
    enc_src, enc_out = (CLIPTextModel.from_pretrained(r, subfolder="text_encoder") for r in (src, out))
    assert enc_out.dtype == torch.float16
    for (k, a), (_, b) in zip(sorted(enc_src.state_dict().items()), sorted(enc_out.state_dict().items())):
        assert torch.equal(a, b), k
    # older transformers' slow CLIPTokenizer reads vocab.json, merges.txt and added_tokens.json
    legacy = tmp_path / "legacy_tok"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        (legacy / name).write_bytes((out / "tokenizer" / name).read_bytes())
    assert CLIPTokenizer.from_pretrained(legacy).convert_tokens_to_ids(tokens) == tok_src.convert_tokens_to_ids(tokens)

    kw = dict(num_samples=2, random_seed=3, num_inference_steps=3)
    from_paper = generate(src, 1, PROMPT, model=tiny, **kw)
    assert all(_same(generate(out, 1, PROMPT, **kw), from_paper))  # base model from di_assets.json
    # the paper's generate on the exported root draws what seed_mode="paper" draws
    assert all(_same(_paper_generate(out, paper_case["base"], 1, PROMPT, 2, 3, 3),
                     generate(out, 1, PROMPT, seed_mode="paper", **kw)))
    # the di-assets root itself: the same up to its float32 rows (the paper's are float16)
    diff = [np.abs(_px(a) - _px(b)).mean() for a, b in zip(generate(ours, 1, PROMPT, **kw), from_paper)]
    assert max(diff) < 3
    # an update never rewrites a paper root in place; it is converted first
    from di_assets.ml.encoder_root import update_token_dictionary

    with pytest.raises(ValueError, match="paper's format"):
        update_token_dictionary(src, [paper_case["embeds"][0]], [tokens[0]], ["tench"], class_keys=["tench"],
                                model=tiny)
    # and back: the paper root as a di-assets root
    back = export_encoder_root(src, tmp_path / "back", format="di-assets", model=tiny)
    assert [(c.index, c.name, c.token, c.token_ids) for c in class_tokens(back)] == \
        [(c.index, c.name, c.token, c.token_ids) for c in class_tokens(src)]
    assert all(_same(generate(back, 1, PROMPT, **kw), from_paper))


def test_a_bad_tokens_pt_is_refused(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    torch.save({"tokens": ["<a>"]}, root / "tokens.pt")
    with pytest.raises(ValueError, match="initializer_words"):
        class_tokens(root)
    torch.save({"initializer_words": ["a"], "tokens": [Payload()]}, root / "tokens.pt")
    with pytest.raises(ValueError, match="not a readable tokens.pt"):
        class_tokens(root)
