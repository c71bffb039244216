"""Bad settings, missing models and unusable class folders: one line on stderr, exit code 2, and no work.

The whole settings file is checked before anything is written (`Settings.validate`), and `run` and
`update` check the models and class folders they name before they take the storage lock. The CLI
runs in-process here; every case stops long before a model loads.
"""

import errno
import os
from pathlib import Path

import pytest

from di_assets.cli import main
from di_assets_tests.conftest import copy_classes


def run_cli(capsys, tmp_path, settings: str | None, *args, command: str = "run"):
    """`di-assets <command> --config <tmp>/config.yaml ...`: exit code, stderr lines, stdout."""
    if not (tmp_path / "data").exists():
        copy_classes(tmp_path / "data", per_class=1)
    argv = [command, *args]
    if settings is not None:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(settings)
        argv += ["--config", str(cfg)]
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, [line for line in err.splitlines() if line.strip()], out


def assert_one_line(rc, err, out, *fragments, storage: Path):
    assert rc == 2, (rc, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in out and "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    # nothing written: no storage root (not even the lock), no tokens, no Dagster instance
    assert not storage.exists(), sorted(p.name for p in storage.iterdir())


BASE = "dataset: data\nstorage: store\nshifts: [base]\nclassifiers: []\n"

# (settings added to BASE, fragments of the one line: the setting's path, what is wrong, what is allowed)
BAD_SETTINGS = [
    # top level
    ("datasets: other\n", ["unknown settings key datasets; did you mean dataset?"]),
    ("baseline: maybe\n", ["baseline: should be true or false, got 'maybe'"]),
    ("observe_cron: every hour\n", ["observe_cron: should be a cron string", "'0 * * * *'", "'every hour'"]),
    ("removed_classes: keep\n", ["removed_classes: should be one of trash, delete, got 'keep'"]),
    ("models: sd\n", ["models: should be a mapping of settings (family, diffusion", "got 'sd'"]),
    ("textual_inversion: 10\n", ["textual_inversion: should be a mapping of settings (steps,"]),
    ("generation: [1]\n", ["generation: should be a mapping"]),
    ("scoring: true\n", ["scoring: should be a mapping"]),
    ("classifiers: judge\n", ["classifiers: must be a list of {name, kind, ...} mappings, got 'judge'"]),
    # models
    ("models: {famly: sd}\n", ["unknown settings key models.famly; did you mean family?"]),
    ("models: {family: big}\n", ["models.family: should be one of tiny, sd, got 'big'"]),
    ("models: {device: gpu}\n", ["models.device: should be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"]),
    ("models: {dtype: fp16}\n", ["models.dtype: should be one of auto, float32, float16, bfloat16, got 'fp16'"]),
    ("models: {compile: sometimes}\n", ["models.compile: should be a valid boolean", "'sometimes'"]),
    ("models: {devices: 'cuda:0'}\n", ["models.devices: should be a valid list"]),
    ("models: {diffusion: 5}\n", ["models.diffusion: should be a valid string, got 5"]),
    # textual_inversion
    ("textual_inversion: {stepz: 10}\n", ["unknown settings key textual_inversion.stepz; did you mean steps?"]),
    ("textual_inversion: {steps: ten}\n", ["textual_inversion.steps: should be a valid integer", "'ten'"]),
    ("textual_inversion: {steps: 0}\n", ["textual_inversion.steps: should be greater than 0, got 0"]),
    ("textual_inversion: {steps: 2.5}\n", ["textual_inversion.steps: should be a valid integer", "2.5"]),
    ("textual_inversion: {learning_rate: -0.1}\n", ["textual_inversion.learning_rate: should be greater than 0"]),
    ("textual_inversion: {learning_rate: .nan}\n", ["textual_inversion.learning_rate: should be a finite number"]),
    ("textual_inversion: {batch_size: -1}\n", ["textual_inversion.batch_size: should be greater than 0"]),
    ("textual_inversion: {gradient_accumulation: 0}\n", ["textual_inversion.gradient_accumulation: should be greater"]),
    ("textual_inversion: {resolution: 100}\n", ["textual_inversion.resolution: should be a multiple of 8, got 100"]),
    ("textual_inversion: {num_vectors: 0}\n", ["textual_inversion.num_vectors: should be greater than 0"]),
    ("textual_inversion: {checkpoint_every: 0}\n", ["textual_inversion.checkpoint_every: should be greater than 0"]),
    ("textual_inversion: {pin_norm: sure}\n", ["textual_inversion.pin_norm: should be a valid boolean"]),
    # generation
    ("generation: {num_samples: -1}\n", ["generation.num_samples: should be greater than 0, got -1"]),
    ("generation: {num_sample: 3}\n", ["unknown settings key generation.num_sample; did you mean num_samples?"]),
    ("generation: {scheduler: karras}\n",
     ["generation.scheduler: should be one of euler, euler_a, ddim, dpm, pndm, ddpm, got 'karras'"]),
    ("generation: {guidance_scale: -1}\n", ["generation.guidance_scale: should be greater than or equal to 0"]),
    ("generation: {guidance_scale: .inf}\n", ["generation.guidance_scale: should be a finite number"]),
    ("generation: {num_inference_steps: 0}\n", ["generation.num_inference_steps: should be greater than 0"]),
    ("generation: {resolution: -64}\n", ["generation.resolution: should be greater than 0"]),
    ("generation: {batch_size: 0}\n", ["generation.batch_size: should be greater than 0"]),
    ("generation: {seed: abc}\n", ["generation.seed: should be a valid integer"]),
    ("generation: {seed_mode: paper}\n", ["unknown settings key generation.seed_mode"]),
    ("generation: {negative: blurry}\n", ["unknown settings key generation.negative; did you mean negative_prompt?"]),
    ("generation: {xyz: 1}\n", ["unknown settings key generation.xyz; known keys: num_samples, seed, num_inference"]),
    # scoring
    ("scoring: {zero_shots: true}\n", ["unknown settings key scoring.zero_shots; did you mean zero_shot?"]),
    ("scoring: {real_images: 0}\n", ["scoring.real_images: should be greater than 0"]),
    ("scoring: {min_sim_class: 2}\n", ["scoring.min_sim_class: should be less than or equal to 1, got 2"]),
    ("scoring: {calibrated: perhaps}\n", ["scoring.calibrated: should be a valid boolean"]),
    # shifts
    ("shifts: 5\n", ["shifts: should be a list of shift keys and {key, prompt, caption} mappings", "got 5"]),
    ("shifts: [at_nite]\n", ["shifts[0]: unknown shift 'at_nite'; did you mean at_night?"]),
    ("shifts: [5]\n", ["shifts[0]: should be a shift key or a {key, prompt, caption} mapping, got 5"]),
    ("shifts: [base, {key: dusk, prompt: 'a <TOKEN> at dusk', caption: at dusk, weight: 2}]\n",
     ["unknown settings key shifts[1].weight; known keys: key, prompt, caption"]),
    ("shifts: [{key: dusk, prompt: 'a <TOKEN> at dusk', captoin: at dusk}]\n",
     ["unknown settings key shifts[0].captoin; did you mean caption?"]),
    ("shifts: [{key: dusk, prompt: 'a <TOKEN> at dusk'}]\n", ["shifts[0]: lacks caption"]),
    ("shifts: [{key: dusk, prompt: [a], caption: at dusk}]\n", ["shifts[0].prompt: should be a string"]),
    ("shifts: [{key: dusk, prompt: 'a photo at dusk', caption: at dusk}]\n", ["shifts: prompt", "<TOKEN>"]),
    ("shifts: [base, base]\n", ["shifts: shift keys must be unique"]),
    # classifiers
    ("classifiers: [{name: mine, kind: reference, modle: judge}]\n",
     ["classifiers[mine]: unknown keys modle; did you mean model?"]),
    ("classifiers: [{name: mine, kind: keras}]\n", ["classifiers: classifier 'mine': unknown kind 'keras'"]),
    ("classifiers: [{name: mine, kind: reference, batch_size: 0}]\n", ["classifiers:", "batch_size"]),
    ("classifiers: [{name: mine, kind: torchvision, model: 5, weights: w.pt}]\n",
     ["classifiers[mine].model: should be a string, got 5"]),
    ("classifiers: [judge]\n", ["classifiers[0]: should be a mapping of name, kind", "got 'judge'"]),
    ("classifiers: [{name: mine}]\n", ["classifiers:", "lacks ['kind']"]),
]


@pytest.mark.parametrize("extra, fragments", BAD_SETTINGS, ids=[e.strip() for e, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_before_any_work(capsys, tmp_path, extra, fragments):
    text = BASE
    for line in extra.splitlines():  # the case's keys replace the base's
        text = "".join(b for b in text.splitlines(keepends=True) if not b.startswith(line.split(":")[0] + ":"))
    rc, err, out = run_cli(capsys, tmp_path, text + extra)
    assert_one_line(rc, err, out, str(tmp_path / "config.yaml"), *fragments, storage=tmp_path / "store")


@pytest.mark.parametrize("text, fragments", [
    ("dataset: data\ntextual_inversion: {steps: 10\n", ["not valid YAML", "line 3, column 1"]),
    ("dataset: data\n  storage: store\n", ["not valid YAML", "line 2"]),
    ("dataset: [data\n", ["not valid YAML"]),
    ("- dataset: data\n", ["should hold a mapping of settings", "not a list"]),
    ("just a string\n", ["not a str"]),
])
def test_a_file_that_is_not_a_mapping_of_settings_is_one_line(capsys, tmp_path, text, fragments):
    rc, err, out = run_cli(capsys, tmp_path, text)
    assert_one_line(rc, err, out, str(tmp_path / "config.yaml"), *fragments, storage=tmp_path / "store")


@pytest.mark.parametrize("command", ["update", "query"])
def test_every_command_checks_the_settings(capsys, tmp_path, command):
    args = ["SELECT 1"] if command == "query" else []
    rc, err, out = run_cli(capsys, tmp_path, BASE + "textual_inversion: {stepz: 10}\n", *args, command=command)
    assert_one_line(rc, err, out, "textual_inversion.stepz; did you mean steps?", storage=tmp_path / "store")


@pytest.mark.parametrize("flags, fragments", [
    (["--num-samples", "0"], ["with --num-samples 0: generation.num_samples: should be greater than 0, got 0"]),
    (["--device", "gpu"], ["with --device gpu: models.device: should be one of auto"]),
    (["--shifts", "base,at_nite"], ["with --shifts base,at_nite: shifts[1]: unknown shift 'at_nite'"]),
])
def test_bad_flags_are_one_line(capsys, tmp_path, flags, fragments):
    rc, err, out = run_cli(capsys, tmp_path, BASE, *flags)
    assert_one_line(rc, err, out, *fragments, storage=tmp_path / "store")


def test_a_shift_catalog_file_is_checked_too(capsys, tmp_path):
    (tmp_path / "shifts.yaml").write_text("- {key: dusk, prompt: 'a <TOKEN> at dusk', caption: at dusk, colour: red}\n")
    rc, err, out = run_cli(capsys, tmp_path, "dataset: data\nstorage: store\nshifts: shifts.yaml\n")
    assert_one_line(rc, err, out, f"{tmp_path / 'shifts.yaml'}: unknown settings key shifts[0].colour",
                    storage=tmp_path / "store")
    rc, err, out = run_cli(capsys, tmp_path, "dataset: data\nstorage: store\nshifts: nope.yaml\n")
    assert_one_line(rc, err, out, f"shifts: shift catalog file {tmp_path / 'nope.yaml'} does not exist",
                    storage=tmp_path / "store")


def test_a_whole_valid_file_passes(tmp_path):
    from di_assets.settings import Settings

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "dataset: data\nstorage: store\n"
        "models: {family: sd, diffusion: /models/sd2, clip_model: ViT-H-14, clip_pretrained: laion2b_s32b_b79k,\n"
        "         device: 'cuda:1', dtype: bfloat16, compile: true, channels_last: false, vae_slicing: true,\n"
        "         vae_tiling: false, devices: ['cuda:0', 'cuda:1']}\n"
        "shifts: [base, {key: dusk, prompt: 'a photo of a <TOKEN> at dusk', caption: a photo at dusk}]\n"
        "textual_inversion: {steps: 10, learning_rate: 1e-3, batch_size: 2, gradient_accumulation: 2,\n"
        "                    resolution: 512, num_vectors: 2, seed: -1, pin_norm: true, checkpoint_every: 5}\n"
        "generation: {num_samples: 2, seed: 3, num_inference_steps: 20, guidance_scale: 0, scheduler: euler_a,\n"
        "             resolution: 768, negative_prompt: blurry, batch_size: 4}\n"
        "scoring: {zero_shot: false, calibrated: true, real_images: 8, shift_over_base: false,\n"
        "          min_sim_class: 0.2, min_sim_shift: -0.1}\n"
        "classifiers: [{name: mine, kind: reference, model: judge, batch_size: 8}]\n"
        "baseline: true\nobserve_cron: '*/15 * * * *'\nremoved_classes: delete\n")
    s = Settings.load(cfg)
    assert s.textual_inversion["learning_rate"] == "1e-3"  # YAML 1.1 reads 1e-3 as a string; pydantic takes it
    assert s.dataset == str(tmp_path / "data") and s.observe_cron == "*/15 * * * *"


def test_the_choices_agree_with_the_code_that_uses_them():
    from di_assets.defs.resources import GenerationParams, ModelResource
    from di_assets.ml import models

    def choices(cls, name):
        return cls.model_fields[name].json_schema_extra["choices"]

    assert set(choices(ModelResource, "family")) == set(models.FAMILIES)
    assert set(choices(ModelResource, "dtype")) == set(models.DTYPES)
    with pytest.raises(ValueError, match="unknown scheduler") as info:
        models.load_scheduler(models.ModelSpec(family="tiny", device="cpu"), "nope")
    assert set(str(info.value).split("choose one of ")[1].split(", ")) == set(choices(GenerationParams, "scheduler"))


# ---------------------------------------------------------------- models, before the first stage


def test_a_missing_diffusion_folder(capsys, tmp_path):
    missing = tmp_path / "sd2"
    rc, err, out = run_cli(capsys, tmp_path, BASE + f"models: {{family: sd, diffusion: {missing}}}\n")
    assert_one_line(rc, err, out, storage=tmp_path / "store")
    assert err[0] == f"error: models.diffusion: folder {missing} does not exist"


def test_a_missing_relative_diffusion_folder_is_not_taken_for_a_hub_id(capsys, tmp_path):
    rc, err, out = run_cli(capsys, tmp_path, BASE + "models: {family: sd, diffusion: ./models/sd}\n")
    assert_one_line(rc, err, out, storage=tmp_path / "store")
    # relative to the settings file, as dataset and storage are
    assert err[0] == f"error: models.diffusion: folder {tmp_path / 'models' / 'sd'} does not exist"


def test_a_diffusion_folder_without_a_model(capsys, tmp_path):
    (tmp_path / "sd2").mkdir()
    rc, err, out = run_cli(capsys, tmp_path, BASE + f"models: {{family: sd, diffusion: {tmp_path / 'sd2'}}}\n")
    assert_one_line(rc, err, out, "models.diffusion: folder", "holds no diffusers model", storage=tmp_path / "store")


def _empty_hub_cache(monkeypatch, tmp_path) -> Path:
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.mark.parametrize("models", ["{family: sd}", "{family: sd, diffusion: stabilityai/stable-diffusion-2}"])
def test_a_hub_id_not_in_the_cache(capsys, tmp_path, monkeypatch, models):
    hub = _empty_hub_cache(monkeypatch, tmp_path)
    rc, err, out = run_cli(capsys, tmp_path, BASE + f"models: {models}\n")
    assert_one_line(rc, err, out, "models.diffusion: stabilityai/stable-diffusion-2 is neither a local folder nor in "
                    f"the Hugging Face cache ({hub})", "never downloads weights", storage=tmp_path / "store")


def _cache(hub: Path, repo_id: str, filename: str) -> Path:
    """A file of a Hub repository, laid out as the Hugging Face cache holds it."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / ("0" * 40) / filename).write_text("{}")
    return repo / "snapshots" / ("0" * 40) / filename


def test_a_clip_tag_not_in_the_cache_is_found_before_any_work(capsys, tmp_path, monkeypatch):
    hub = _empty_hub_cache(monkeypatch, tmp_path)
    _cache(hub, "someone/tiny-sd", "model_index.json")
    rc, err, out = run_cli(capsys, tmp_path, BASE + "models: {family: sd, diffusion: someone/tiny-sd}\n")
    assert_one_line(rc, err, out, "models.clip_pretrained: ViT-H-14 laion2b_s32b_b79k "
                    "(laion/CLIP-ViT-H-14-laion2B-s32B-b79K) is not in the Hugging Face cache", "never downloads",
                    storage=tmp_path / "store")


def test_a_clip_tag_is_read_from_the_cache(tmp_path, monkeypatch):
    from di_assets.ml.models import cached_clip_checkpoint

    hub = _empty_hub_cache(monkeypatch, tmp_path)
    f = _cache(hub, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors")
    assert cached_clip_checkpoint("ViT-H-14", "laion2b_s32b_b79k") == str(f)
    with pytest.raises(FileNotFoundError, match="knows no pretrained tag 'nope' for ViT-H-14"):
        cached_clip_checkpoint("ViT-H-14", "nope")


def test_a_hub_id_in_the_cache_passes_the_model_check(capsys, tmp_path, monkeypatch):
    hub = _empty_hub_cache(monkeypatch, tmp_path)
    _cache(hub, "someone/tiny-sd", "model_index.json")
    _cache(hub, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors")
    (tmp_path / "data" / "empty").mkdir(parents=True)  # the next check stops the run: no model loads
    rc, err, out = run_cli(capsys, tmp_path, BASE + "models: {family: sd, diffusion: someone/tiny-sd}\n")
    assert_one_line(rc, err, out, "class folder", "empty has no readable images", storage=tmp_path / "store")


def test_a_missing_clip_checkpoint_is_found_before_textual_inversion(capsys, tmp_path):
    rc, err, out = run_cli(capsys, tmp_path, BASE + "models: {clip_pretrained: ./nope/clip.safetensors}\n")
    assert_one_line(rc, err, out, storage=tmp_path / "store")
    assert err[0] == f"error: models.clip_pretrained: checkpoint file {tmp_path / 'nope' / 'clip.safetensors'} does not exist"


def test_a_dtype_the_device_cannot_run(capsys, tmp_path):
    rc, err, out = run_cli(capsys, tmp_path, BASE + "models: {device: cpu, dtype: float16}\n")
    assert_one_line(rc, err, out, "models.dtype: dtype float16 is not supported on CPU", storage=tmp_path / "store")


# ---------------------------------------------------------------- the dataset


def test_a_dataset_that_is_a_file(capsys, tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    rc, err, out = run_cli(capsys, tmp_path, BASE.replace("dataset: data", "dataset: images.zip"))
    assert_one_line(rc, err, out, storage=tmp_path / "store")
    assert err[0] == f"error: dataset {tmp_path / 'images.zip'} is a file, not a folder of class folders"


def test_a_missing_dataset(capsys, tmp_path):
    rc, err, out = run_cli(capsys, tmp_path, BASE.replace("dataset: data", "dataset: nope"))
    assert_one_line(rc, err, out, f"dataset folder {tmp_path / 'nope'} does not exist", storage=tmp_path / "store")


@pytest.mark.parametrize("command", ["run", "update"])
@pytest.mark.parametrize("content", [{}, {"notes.txt": b"not an image", "broken.png": b"\x89PNG nope"}])
def test_a_class_folder_without_images(capsys, tmp_path, command, content):
    empty = tmp_path / "data" / "empty"
    empty.mkdir(parents=True)
    for name, data in content.items():
        (empty / name).write_bytes(data)
    copy_classes(tmp_path / "data", classes=("circle",), per_class=1)
    rc, err, out = run_cli(capsys, tmp_path, BASE, command=command)
    assert_one_line(rc, err, out, storage=tmp_path / "store")
    assert err[0] == f"error: class folder {empty} has no readable images; add .jpg/.png files or remove the folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_class_folder(capsys, tmp_path):
    copy_classes(tmp_path / "data", per_class=1)
    locked = tmp_path / "data" / "square"
    locked.chmod(0)
    try:
        rc, err, out = run_cli(capsys, tmp_path, BASE)
    finally:
        locked.chmod(0o755)
    assert_one_line(rc, err, out, f"class folder {locked} cannot be read (permission denied)",
                    storage=tmp_path / "store")


def test_an_unreadable_image_simulated(capsys, tmp_path, monkeypatch):
    copy_classes(tmp_path / "data", per_class=2)
    locked = sorted((tmp_path / "data" / "square").iterdir())[1]
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    rc, err, out = run_cli(capsys, tmp_path, BASE)
    assert_one_line(rc, err, out, f"{locked} cannot be read (permission denied)", storage=tmp_path / "store")


def test_an_unreadable_class_folder_simulated(capsys, tmp_path, monkeypatch):
    # the same as above for a root user, whom chmod does not stop: the folder's listing is refused
    copy_classes(tmp_path / "data", per_class=1)
    locked = tmp_path / "data" / "square"
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    rc, err, out = run_cli(capsys, tmp_path, BASE)
    assert_one_line(rc, err, out, f"class folder {locked} cannot be read (permission denied)",
                    storage=tmp_path / "store")


# ---------------------------------------------------------------- what main() turns into one line


def _validation_error():
    from di_assets.defs.resources import GenerationParams

    try:
        GenerationParams(num_samples=-1)
    except ValueError as exc:
        return exc


def _yaml_error():
    import yaml

    try:
        yaml.safe_load("a: [")
    except yaml.YAMLError as exc:
        return exc


def _wrapped_permission_error():
    from dagster._core.errors import DagsterExecutionStepExecutionError

    cause = PermissionError(errno.EACCES, "Permission denied", "/data/cat/1.jpg")
    try:
        raise cause
    except PermissionError:
        import sys

        return DagsterExecutionStepExecutionError("Error occurred while executing op", user_exception=cause,
                                                  original_exc_info=sys.exc_info(), step_key="class_token",
                                                  op_name="class_token", op_def_name="class_token")


@pytest.mark.parametrize("make, expected", [
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/cat"), "[Errno 13] Permission denied: '/data/cat'"),
    (lambda: OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
    (_validation_error, "GenerationParams.num_samples: should be greater than 0, got -1"),
    (_yaml_error, "not valid YAML: expected the node content, but found '<stream end>' at line 1, column 5 "
                  "(while parsing a flow node)"),
    (lambda: KeyError("class 'cat' has no folder"), "class 'cat' has no folder"),
    (lambda: ValueError("first line\n  second line"), "first line"),
    (_wrapped_permission_error, "[Errno 13] Permission denied: '/data/cat/1.jpg'"),
])
def test_main_turns_errors_a_user_can_fix_into_one_line(capsys, monkeypatch, make, expected):
    import di_assets.cli as cli

    def failing(args):
        raise make()

    monkeypatch.setattr(cli, "cmd_report", failing)
    capsys.readouterr()
    assert main(["report"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {expected}"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    import di_assets.cli as cli

    def failing(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "cmd_report", failing)
    with pytest.raises(TypeError, match="a bug"):
        main(["report"])
