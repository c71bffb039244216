"""Generation across partitions (issue 15 item 4): batches filled from several (class, shift) pairs
give each pair the images it gets alone; CLIP text features of each caption are computed once."""

import numpy as np
import pytest
import torch
from PIL import Image

from di_assets.ml import generate as gen
from di_assets.ml.encoder_root import create_token_dictionary
from di_assets.ml.generate import GenerationConfig, generate_many, generate_samples
from di_assets.ml.shifts import IMAGENET_STAR

SHIFTS = IMAGENET_STAR[:4]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny):
    g = torch.Generator().manual_seed(7)
    return create_token_dictionary([torch.randn(32, generator=g), torch.randn(2, 32, generator=g),
                                    torch.randn(32, generator=g)], ["<ga>", "<gb>", "<gc>"], ["ga", "gb", "gc"],
                                   tmp_path_factory.mktemp("many") / "root", model=tiny)


def _px(im):
    return np.asarray(im, np.int16)


def _batch_sizes(monkeypatch):
    sizes = []
    real = gen._Run.batch
    monkeypatch.setattr(gen._Run, "batch", lambda self, items: sizes.append(len(items)) or real(self, items))
    return sizes


def test_batches_across_pairs_give_each_pair_its_own_images(root, tiny, monkeypatch):
    """3 classes x 4 shifts x 4 seeds at batch size 8: each pipeline call holds two pairs' images.

    Measured on CPU (torch 2.x, tiny model, 10 steps): at most 1/255 on any channel, on a few dozen
    of the 589,824 channel values (another batch composition, other float rounding); here at 4 steps.
    """
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=4, batch_size=8)
    jobs = [(c, s.prompt, range(20, 24)) for c in ("ga", "gb", "gc") for s in SHIFTS]
    sizes = _batch_sizes(monkeypatch)
    alone = [generate_samples(root, c, p, seeds=seeds, model=tiny, config=cfg) for c, p, seeds in jobs]
    assert sizes == [4] * 12  # one pair at a time: half-full batches
    sizes.clear()
    seen = []
    many = list(generate_many(root, jobs, model=tiny, config=cfg, progress=lambda d, t: seen.append((d, t))))
    assert sizes == [8] * 6  # across pairs: every batch full
    assert seen == [(8 * k, 48) for k in range(1, 7)]
    assert len(many) == len(jobs)
    diffs = []
    for a, b in zip(alone, many):
        assert [(x.prompt, x.text, x.seed, x.draw) for x in a] == [(x.prompt, x.text, x.seed, x.draw) for x in b]
        diffs += [np.abs(_px(x.image) - _px(y.image)) for x, y in zip(a, b)]
    assert max(int(d.max()) for d in diffs) <= 1  # each image keeps its own seed's noise
    assert sum(int((d > 0).sum()) for d in diffs) < 0.01 * sum(d.size for d in diffs)
    # and the comparison could fail: other seeds, other classes give other images
    assert np.abs(_px(many[0][0].image) - _px(many[0][1].image)).max() > 10
    assert np.abs(_px(many[0][0].image) - _px(many[4][0].image)).max() > 10
    assert many[4][0].text == "a photo of a <gb> <gb>_1"


def test_each_pair_arrives_when_its_last_image_is_made(root, tiny, monkeypatch):
    """A caller writes a pair's images while later pairs are still to be made; order is the jobs' order."""
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=1, batch_size=3)
    sizes = _batch_sizes(monkeypatch)
    jobs = [("ga", "a photo of a <TOKEN>", [0, 1]), ("gb", "a <TOKEN>", []), ("gc", "a <TOKEN> at night", [5, 6, 7]),
            (0, ["a <TOKEN>", "a <TOKEN> in the rain"], [9])]
    produced = generate_many(root, jobs, model=tiny, config=cfg)
    first = next(produced)
    assert [s.seed for s in first] == [0, 1] and sizes == [3]  # one batch so far
    second, third = next(produced), next(produced)
    assert second == [] and [s.seed for s in third] == [5, 6, 7] and sizes == [3, 3]
    last = next(produced)
    assert [(s.prompt, s.seed) for s in last] == [("a <TOKEN>", 9), ("a <TOKEN> in the rain", 9)]
    assert sizes == [3, 3, 1]
    with pytest.raises(StopIteration):
        next(produced)


def test_a_bad_job_fails_before_any_image(root, tiny, monkeypatch):
    sizes = _batch_sizes(monkeypatch)
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=1)
    with pytest.raises(KeyError, match="no class 'zebra'"):
        generate_many(root, [("ga", "a <TOKEN>", [0]), ("zebra", "a <TOKEN>", [0])], model=tiny, config=cfg)
    with pytest.raises(ValueError, match="no <TOKEN> placeholder"):
        generate_many(root, [("ga", "a <TOKEN>", [0]), ("gb", "a photo", [0])], model=tiny, config=cfg)
    assert sizes == []


def test_paper_seed_mode_runs_the_jobs_one_after_another(root, tiny):
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=2, seed_mode="paper")
    jobs = [("ga", "a <TOKEN>", [3]), ("gb", "a <TOKEN> in the snow", [4, 5])]
    many = list(generate_many(root, jobs, model=tiny, config=cfg))
    for (c, p, seeds), got in zip(jobs, many):
        want = generate_samples(root, c, p, seeds=seeds, model=tiny, config=cfg)
        assert [(s.text, s.seed) for s in got] == [(s.text, s.seed) for s in want]
        assert all(np.array_equal(_px(a.image), _px(b.image)) for a, b in zip(got, want))  # same calls: exact


def test_baseline_jobs_use_the_class_name(root, tiny):
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=1)
    [[s]] = generate_many(root, [("gb", "a photo of a <TOKEN>", [0])], use_token=False, model=tiny, config=cfg)
    assert s.text == "a photo of a gb"


def test_clip_text_features_of_each_caption_once_per_process(tiny, monkeypatch):
    """As clip_scores scores a run (every class caption + the shift caption + the base caption per
    pair), the process's scorer encodes each caption once, whatever the number of pairs."""
    from di_assets.ml.clip_metric import BASE_CAPTION, get_scorer
    from di_assets.ml.shifts import class_caption

    scorer = get_scorer(tiny)
    assert get_scorer(tiny) is scorer  # one scorer per process and model
    monkeypatch.setattr(scorer, "_text_cache", {})  # as in a fresh process
    encoded = []
    real = scorer.model.encode_text
    monkeypatch.setattr(scorer.model, "encode_text", lambda tokens, *a, **k: encoded.append(len(tokens))
                        or real(tokens, *a, **k))
    captions = [class_caption(n) for n in ("ga", "gb", "gc")]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    for _run in range(2):  # two runs in one process (e.g. the baseline's scores after the scores)
        for _c in captions:
            for shift in SHIFTS:
                sims = get_scorer(tiny).similarity(images, captions + [shift.caption, BASE_CAPTION])
                assert sims.shape == (4, 5)
    unique = set(captions) | {s.caption for s in SHIFTS} | {BASE_CAPTION}
    assert sum(encoded) == len(unique)  # "a photo" (base's caption and BASE_CAPTION) once
    assert set(scorer._text_cache) == unique
    # the cached features are the ones computed: scores from the cache equal a fresh computation
    cached = scorer.similarity(images, captions + [SHIFTS[1].caption, BASE_CAPTION])
    assert sum(encoded) == len(unique)
    monkeypatch.setattr(scorer, "_text_cache", {})
    fresh = scorer.similarity(images, captions + [SHIFTS[1].caption, BASE_CAPTION])
    assert sum(encoded) == len(unique) + 5 and torch.allclose(cached, fresh, atol=1e-6)


def test_the_counterfactuals_asset_fills_batches_across_partitions(tmp_path, monkeypatch):
    """One run over a 2 x 2 rectangle of class x shift partitions, 3 images each at batch size 4:
    three full pipeline calls (not four of 3), and every pair's files hold its own images."""
    import json

    import dagster as dg

    from di_assets.defs import CLASSES, build_assets, build_resources
    from di_assets.settings import Settings
    from di_assets_tests.conftest import copy_classes

    keys, shifts = ["circle", "square"], ["base", "in_the_snow"]
    data = copy_classes(tmp_path / "data", keys, per_class=2)
    settings = Settings.load(dataset=str(data), storage=str(tmp_path / "store"), shifts=shifts,
                             textual_inversion={"steps": 2},
                             generation={"num_samples": 3, "batch_size": 4, "num_inference_steps": 2}, classifiers=[])
    assets, resources = build_assets(settings), build_resources(settings)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(CLASSES.name, keys)
        for selection, tags in ((["class_token"], {"dagster/asset_partition_range_start": keys[0],
                                                   "dagster/asset_partition_range_end": keys[-1]}),
                                (["encoder_root"], {})):
            assert dg.materialize(assets, selection=selection, instance=instance, resources=resources,
                                  tags=tags).success
        sizes = _batch_sizes(monkeypatch)
        result = dg.materialize(assets, selection=["counterfactuals"], instance=instance, resources=resources,
                                tags={"dagster/asset_partition_range_start": f"{keys[0]}|{shifts[0]}",
                                      "dagster/asset_partition_range_end": f"{keys[-1]}|{shifts[-1]}"})
        assert result.success
        assert sizes == [4, 4, 4]
        records = instance.fetch_materializations(dg.AssetKey("counterfactuals"), limit=10).records
        assert sorted(r.asset_materialization.partition for r in records) == sorted(
            f"{k}|{s}" for k in keys for s in shifts)
        assert all(r.asset_materialization.metadata["num_images"].value == 3 for r in records)
    monkeypatch.undo()
    store = tmp_path / "store"
    root = store / "encoder_root"
    assert (root / "tokens.json").is_file()
    from di_assets.ml.shifts import CATALOG

    spec = resources["models"].spec()  # what the asset generated with
    cfg = resources["params"].generation_config(spec.family)
    assert (cfg.batch_size, cfg.num_inference_steps) == (4, 2)
    for k in keys:
        for s in shifts:
            folder = store / "images" / k / s
            manifest = json.loads((folder / "manifest.json").read_text())
            assert [r["seed"] for r in manifest["images"]] == [0, 1, 2]
            alone = generate_samples(root, k, CATALOG[s].prompt, seeds=range(3), model=spec, config=cfg)
            for r, sample in zip(manifest["images"], alone):
                saved = _px(Image.open(folder / r["file"]).convert("RGB"))
                assert r["text"] == sample.text and np.abs(saved - _px(sample.image)).max() <= 1
            assert (folder / "preview.jpg").is_file()
