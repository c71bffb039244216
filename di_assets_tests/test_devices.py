"""Device and dtype selection, device leases across real processes, and the speed flags."""

import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from di_assets.ml.devices import DEVICES_ENV, device_list, lease_device, leased_spec

FAKE_GPUS = ["cuda:0", "cuda:1"]


# ---------------------------------------------------------------- device and dtype


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with or without CUDA (with or without bf16) or MPS."""
    import torch
    import torch._dynamo  # noqa: F401  (imported first: it reads the real functions that we patch)

    def set_(cuda=False, bf16=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_


@pytest.mark.parametrize("cuda, bf16, mps, expected", [
    (True, True, False, ("cuda", "bfloat16")),
    (True, False, False, ("cuda", "float16")),
    (True, True, True, ("cuda", "bfloat16")),  # cuda before mps
    (False, False, True, ("mps", "float16")),
    (False, False, False, ("cpu", "float32")),
])
def test_auto_picks_cuda_then_mps_then_cpu(machine, cuda, bf16, mps, expected):
    from di_assets.ml.models import ModelSpec

    machine(cuda=cuda, bf16=bf16, mps=mps)
    spec = ModelSpec(family="sd").resolved()  # sd: resolves names only, loads nothing
    assert (spec.device, spec.dtype) == expected


@pytest.mark.parametrize("device, dtype, bf16, expected", [
    ("cpu", "auto", True, ("cpu", "float32")),  # a CPU asked for on a GPU machine stays float32
    ("cuda:1", "auto", True, ("cuda:1", "bfloat16")),
    ("cuda:1", "auto", False, ("cuda:1", "float16")),
    ("auto", "float32", True, ("cuda", "float32")),
    ("auto", "float16", True, ("cuda", "float16")),
    ("cuda", "bfloat16", False, ("cuda", "bfloat16")),  # an explicit dtype is kept as given
    ("mps", "auto", True, ("mps", "float16")),
    ("mps", "float32", True, ("mps", "float32")),
])
def test_config_overrides_device_and_dtype_each(machine, device, dtype, bf16, expected):
    from di_assets.ml.models import ModelSpec

    machine(cuda=True, bf16=bf16, mps=True)
    spec = ModelSpec(family="sd", device=device, dtype=dtype).resolved()
    assert (spec.device, spec.dtype) == expected


def test_float16_on_cpu_is_refused_and_bfloat16_is_kept(machine):
    from di_assets.ml.models import ModelSpec

    machine(cuda=True, bf16=True)
    with pytest.raises(ValueError, match="float16 is not supported on CPU; use float32, bfloat16 or auto"):
        ModelSpec(family="sd", device="cpu", dtype="float16").resolved()
    machine()  # no GPU at all: auto resolves to cpu
    with pytest.raises(ValueError, match="not supported on CPU"):
        ModelSpec(family="sd", dtype="float16").resolved()
    assert ModelSpec(family="sd", dtype="bfloat16").resolved().dtype == "bfloat16"
    assert ModelSpec(family="sd").resolved().dtype == "float32"  # auto on CPU stays float32


def test_unknown_dtype_is_refused():
    from di_assets.ml.models import ModelSpec

    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        ModelSpec(dtype="float64")


def test_flags_keep_the_spec_hashable_and_key_the_model_cache():
    from di_assets.ml.models import ModelSpec

    a, b = ModelSpec(device="cpu"), ModelSpec(device="cpu", channels_last=True)
    assert len({a, b, ModelSpec(device="cpu")}) == 2
    assert b.to_dict()["channels_last"] is True


# ---------------------------------------------------------------- SDPA and the speed flags


def test_attention_uses_pytorch_sdpa(tiny):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from di_assets.ml.models import apply_speed_flags, load_base_text_encoder, load_diffusion_components

    unet, vae = load_diffusion_components(tiny)
    for model in (unet, vae):
        procs = model.attn_processors
        assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs.values())
    assert load_base_text_encoder(tiny)[1].config._attn_implementation == "sdpa"  # transformers' default
    # SDPA is set, not just diffusers' default: a model saved with the classic processor gets it too
    unet.set_attn_processor(AttnProcessor())
    apply_speed_flags(tiny.resolved(), unet, vae)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_speed_flags_apply_and_leave_the_default_alone(tiny):
    import torch

    from di_assets.ml.models import load_diffusion_components

    unet, vae = load_diffusion_components(tiny)
    assert not vae.use_slicing and not vae.use_tiling and unet._compiled_call_impl is None
    fast = replace(tiny, compile=True, channels_last=True, vae_slicing=True, vae_tiling=True)
    unet2, vae2 = load_diffusion_components(fast)
    assert unet2 is not unet  # other flags, other cache entry
    conv = unet2.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert vae2.use_slicing and vae2.use_tiling
    assert unet2._compiled_call_impl is not None  # compiled lazily, on the first call
    assert load_diffusion_components(fast)[0] is unet2  # still cached per process


def test_channels_last_and_vae_slicing_give_the_same_images(tiny, tmp_path):
    import numpy as np
    import torch

    from di_assets.ml.encoder_root import create_token_dictionary
    from di_assets.ml.generate import GenerationConfig, generate_samples

    root = create_token_dictionary([torch.randn(32, generator=torch.Generator().manual_seed(0))], ["<c>"],
                                   ["circle"], tmp_path / "root", model=tiny)
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=2, batch_size=2)
    fast = replace(tiny, channels_last=True, vae_slicing=True)
    plain = generate_samples(root, 0, "a photo of a <TOKEN>", seeds=[0, 1], model=tiny, config=cfg)
    flagged = generate_samples(root, 0, "a photo of a <TOKEN>", seeds=[0, 1], model=fast, config=cfg)
    for a, b in zip(plain, flagged):
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 2


def test_clip_runs_in_half_precision_weights(tiny):
    """The GPU path (bf16 weights, inputs cast to match) checked on CPU, which has bf16 kernels."""
    import torch
    from PIL import Image

    from di_assets.ml.clip_metric import ClipScorer

    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "white")]
    scorer = ClipScorer(tiny)
    full = scorer.image_features(images)
    bf16 = ClipScorer(replace(tiny, dtype="bfloat16"))
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    half = bf16.image_features(images)
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=5e-2)


def test_the_gpu_precision_runs_end_to_end_on_cpu_in_bfloat16(tiny, tmp_path):
    """The path a GPU takes (bf16 weights: a bf16 UNet, VAE, text encoder and CLIP) through the plain
    API on CPU: gradient steps that lower the loss, a float32 token, an encoder root, images, scores."""
    import numpy as np
    import torch

    from di_assets.ml.clip_metric import ClipScorer
    from di_assets.ml.encoder_root import create_token_dictionary
    from di_assets.ml.generate import GenerationConfig, generate_samples
    from di_assets.ml.models import load_diffusion_components
    from di_assets.ml.textual_inversion import run_textual_inversion

    from .conftest import copy_classes

    bf16 = replace(tiny, dtype="bfloat16")
    data = copy_classes(tmp_path / "data", ("circle",))
    unet, vae = load_diffusion_components(bf16.resolved())
    assert unet.dtype == vae.dtype == torch.bfloat16
    res = run_textual_inversion(data / "circle", "<circle-bf16>", "circle", model=bf16, steps=30, batch_size=4,
                                resume=False)
    assert res.embeds.dtype == torch.float32 and torch.isfinite(res.embeds).all()
    assert res.final_eval_loss < res.initial_eval_loss
    root = create_token_dictionary([res.embeds[0]], ["<circle-bf16>"], ["circle"], tmp_path / "root", model=bf16)
    samples = generate_samples(root, 0, "a photo of a <TOKEN> in the snow", seeds=[0, 1], model=bf16,
                               config=GenerationConfig.for_family("tiny", num_inference_steps=3, batch_size=2))
    pixels = [np.asarray(s.image) for s in samples]
    assert len(pixels) == 2 and pixels[0].std() > 0 and not np.array_equal(pixels[0], pixels[1])
    scores = ClipScorer(bf16).similarity([s.image for s in samples], ["a photo of a circle", "a photo in the snow"])
    assert scores.shape == (2, 2) and torch.isfinite(torch.as_tensor(scores)).all()


# ---------------------------------------------------------------- device lists


def test_device_list_from_argument_env_or_cuda(monkeypatch, machine):
    monkeypatch.delenv(DEVICES_ENV, raising=False)
    assert device_list("cuda:0, cuda:1") == FAKE_GPUS
    assert device_list(["cuda:2"]) == ["cuda:2"]
    monkeypatch.setenv(DEVICES_ENV, "cuda:0,cuda:1")
    assert device_list() == FAKE_GPUS
    monkeypatch.delenv(DEVICES_ENV)
    machine()  # no CUDA: nothing to lease, the CPU is shared
    assert device_list() == []
    import torch

    machine(cuda=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert device_list() == ["cuda:0", "cuda:1", "cuda:2"]


def test_leased_spec_only_leases_auto_devices(tmp_path, tiny):
    from di_assets.ml.models import ModelSpec

    auto = ModelSpec(family="tiny")
    with leased_spec(auto, FAKE_GPUS, tmp_path) as spec:
        assert spec.device == "cuda:0"
        with leased_spec(auto, FAKE_GPUS, tmp_path) as other:
            assert other.device == "cuda:1"
    with leased_spec(tiny, FAKE_GPUS, tmp_path) as spec:  # device: cpu, as configured
        assert spec is tiny
    with leased_spec(auto, [], tmp_path) as spec:  # no GPU: no lease
        assert spec is auto


# ---------------------------------------------------------------- leases across processes


def _hold(lock_dir, got, release):
    """A step: lease a device, report it, hold it until the file `release` appears."""
    Path(f"{release}.{os.getpid()}.started").touch()
    with lease_device(FAKE_GPUS, lock_dir) as device:
        got.put((os.getpid(), device))
        deadline = time.monotonic() + 60
        # A file, not an mp.Event: Event.set() blocks forever once a waiter has been SIGKILLed.
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_lease_is_released_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="step failed"):
        with lease_device(["cuda:0"], tmp_path):
            raise RuntimeError("step failed")
    with lease_device(["cuda:0"], tmp_path, timeout=0) as device:
        assert device == "cuda:0"


def test_concurrent_steps_get_different_devices_and_a_crashed_holder_frees_its_own(tmp_path):
    ctx = mp.get_context("spawn")
    locks, release = tmp_path / "locks", tmp_path / "release"
    got = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(locks), got, str(release)), daemon=True) for _ in range(3)]
    try:
        for p in procs[:2]:
            p.start()
        holders = dict(got.get(timeout=60) for _ in range(2))
        assert sorted(holders.values()) == FAKE_GPUS  # two steps, two devices

        procs[2].start()
        started = Path(f"{release}.{procs[2].pid}.started")
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(queue.Empty):
            got.get(timeout=1)  # the third step has asked for a device, and waits
        with pytest.raises(TimeoutError, match=r"no free device after 0.2 s; all are held: cuda:0 \(pid \d+\)"):
            with lease_device(FAKE_GPUS, locks, timeout=0.2):
                pass

        victim = next(pid for pid, d in holders.items() if d == "cuda:1")
        os.kill(victim, signal.SIGKILL)  # a crash: no cleanup code runs
        pid, device = got.get(timeout=30)
        assert (pid, device) == (procs[2].pid, "cuda:1")  # the waiting step takes the freed device
    finally:
        release.touch()
        for p in procs:
            if p.pid is not None:
                p.join(30)
                if p.is_alive():
                    p.kill()
    assert [p.exitcode for p in procs] == [0 if p.pid != victim else -signal.SIGKILL for p in procs]
    with lease_device(FAKE_GPUS, locks, timeout=0) as device:  # all released at the end
        assert device == "cuda:0"


def test_no_device_to_lease_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DEVICES_ENV, " ")
    with pytest.raises(ValueError, match="no device to lease"):
        with lease_device(None, tmp_path):
            pass
