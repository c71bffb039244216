"""The orchestration at ImageNet scale, with stand-in models: what Dagster costs, not what the models cost.

    python benchmarks/bench_scale.py [--classes 10,100,1000] [--shifts 24] [--grain class_shift]
    python benchmarks/bench_scale.py --classes 21000 --grain class --only-add-and-tick
    python benchmarks/bench_scale.py --classes 5 --shifts 2 --keep /tmp/bench   # keep the storage

What it measures, for every N in --classes, K in --shifts (the first K keys of the default shift
catalog: `base` and the ImageNet* shifts) and grain in --grain, with no classifiers:

  sensor s        `class_folders_sensor` adding N new class folders (LocalDriver.sensor, as `di-assets
                  update` and the daemon apply it: dynamic partitions and the folders' observations);
  tick s          one evaluation of every automation condition right after (LocalDriver.tick; a tick
                  before the sensor, on the empty instance, starts the watching as the daemon would);
                  stderr also says which partitions it requested and how many runs the driver makes of them;
  whole s         the whole orchestration until everything is materialized: `di-assets run` (the
                  command itself, in this process) by default, or with --orchestrate automation the
                  daemon's way (the driver executes what each tick requests until none requests more);
                  then checked: `di-assets query` must count N x K class x shift pairs in the scores;
  s/partition     whole s / (N x K): per class x shift pair, whatever the grain;
  instance MB     the Dagster instance on disk after it (SQLite, under the storage's .dagster; with
                  --postgres, the growth of its PostgreSQL database, see below);
  KB/partition    instance bytes / (N x K);
  update-nothing s  `di-assets update` with nothing changed (the second one: the steady state; the first
                  one after `run`, which also starts the automation cursor, is on stderr);
  update-one s    `di-assets update` after one image file of one class is rewritten; stderr says which
                  partitions reran (expected: that class's token, the encoder root, its K image and score
                  partitions, and scores_db).

The grain is the settings key `partition_grain` (top level): `class_shift` (counterfactuals and
scores partitioned by class x shift) or `class` (by class only). A version whose settings reject the
key says so in one line and skips that configuration (`class_shift` then runs without the key: it is
such a version's only grain). `--only-add-and-tick` measures the sensor, the tick and the instance size
only (for e.g. 21,000 classes at the class grain).

Stand-ins. Every Dagster call, file, Parquet and DuckDB write is real; the three ML functions that
the asset bodies import when they run are replaced in this process (and only here) by fast stand-ins
that write the same files in the same formats:

  di_assets.ml.train_tokens.train_tokens  trains each class with the next stand-in, in this process;
  di_assets.ml.textual_inversion.run_textual_inversion  reads the class folder's images, reports every
      step to the asset's progress callback (so the same log lines reach the event log), and returns a
      random finite token of the text encoder's width (norm half the vocabulary's largest), written with
      the real save_learned_embeds, with loss.json and the last two checkpoints;
  di_assets.ml.generate.get_pipeline  returns a stand-in pipeline (no model loads) whose call makes one
      small random image (smooth noise, at the requested size) per prompt from a number drawn from its
      generator; the real generate_samples / generate_many around it resolve the class in the encoder
      root, fill the prompts, batch and seed as they always do;
  di_assets.ml.clip_metric.get_scorer  a scorer with the real interface (similarity, model_id) whose
      similarities are random in [-1, 1].

The real model loaders (load_diffusion_components, load_clip, load_encoder_root) are watched: if the
asset code reaches a model by a path the stand-ins miss, stderr and the table's footnote say so.
The encoder root is the real update_token_dictionary on the embedded tiny text encoder (it holds every
token; the checks read it). The models are the embedded tiny ones; nothing is downloaded. Steps run in
this process (DI_ASSETS_EXECUTOR is ignored: stand-ins do not reach other processes). Class folders hold
--images tiny PNGs each, in a temporary folder (or --keep DIR, kept for inspection). The Dagster
instance is the command line's own (`<storage>/.dagster`, SQLite; $DAGSTER_HOME is ignored), or with
--postgres one new database per configuration on a PostgreSQL server that the benchmark starts and stops
(as di_assets_tests/test_postgres.py does; its DAGSTER_HOME holds the README's dagster.yaml snippet);
stderr then also gives the database's size after VACUUM FULL at the end (its live rows).

A throwaway 2 classes x 1 shift runs first (--no-warmup skips it), so that the first configuration
is not charged for the process's imports and model loads. Progress goes to stderr, with a line of
details per configuration at the end (the tick's requests, `run`'s stages, the event log by type,
what each update reran); stdout gets one Markdown table. --profile N adds the costliest functions of
the whole orchestration (cProfile, cumulative and own time) to stderr, --profile-update N those of the
update with one class changed. Ctrl-C prints the table of
what was measured so far (a configuration stopped during the whole orchestration shows `>T (stopped)`;
Dagster may hold the interrupt until the running step ends).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import os
import pstats
import re
import resource
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:8.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ stand-ins

def _rng(*parts) -> "object":
    import numpy as np

    return np.random.default_rng(zlib.crc32("|".join(map(str, parts)).encode()))


def stand_in_textual_inversion(train_path, token, class_name, *, model=None, config=None, output_dir=None,
                               resume=True, progress=None, **overrides):
    """run_textual_inversion's interface and files, without training."""
    import torch

    from di_assets.ml import textual_inversion as ti
    from di_assets.ml.io import hash_folder, load_class_images, write_json
    from di_assets.ml.models import ModelSpec, load_base_text_encoder

    spec = (model or ModelSpec()).resolved()
    cfg = config or ti.TextualInversionConfig.for_family(spec.family)
    if overrides:
        cfg = replace(cfg, **overrides)
    load_class_images(train_path)  # the training reads the folder (a missing or empty one fails the same way)
    _, text_encoder = load_base_text_encoder(spec)
    weight = text_encoder.get_input_embeddings().weight.detach()
    vocab_norm = float(weight.norm(dim=-1).max())
    g = torch.Generator().manual_seed(zlib.crc32(f"{token}|{hash_folder(train_path, warn=False)}".encode()))
    embeds = torch.randn(cfg.num_vectors, weight.shape[1], generator=g)
    embeds = embeds / embeds.norm(dim=-1, keepdim=True) * (0.5 * vocab_norm)
    rng = _rng(token)
    losses = [float(0.5 * (1 - s / cfg.steps) + 0.05 + 0.02 * rng.random()) for s in range(cfg.steps)]
    for step, loss in enumerate(losses, 1):
        if progress is not None:
            progress(step, cfg.steps, loss)
    run_config = {**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "token": token, "class_name": class_name,
                  "model": spec.diffusion}
    values = {"token": token, "class_name": class_name, "embeds": embeds, "losses": losses,
              "initial_eval_loss": losses[0], "final_eval_loss": losses[-1], "init_norm": 0.5 * vocab_norm,
              "vocab_norm": vocab_norm, "steps": cfg.steps, "resumed_from": 0,
              "output_dir": Path(output_dir) if output_dir is not None else None, "config": run_config}
    result = ti.TextualInversionResult(**{f.name: values[f.name] for f in fields(ti.TextualInversionResult)
                                          if f.name in values})
    if output_dir is not None:
        out = Path(output_dir)
        ti.save_learned_embeds(out / ti.EMBEDS_FILE, token, embeds)
        write_json(out / ti.LOSS_FILE, {"token": token, "class_name": class_name, "losses": losses,
                                        "initial_eval_loss": losses[0], "final_eval_loss": losses[-1],
                                        "init_norm": 0.5 * vocab_norm, "resumed_from": 0, "config": run_config})
        save = getattr(ti, "_save_checkpoint", None)  # the checkpoints the training keeps (its last two)
        if save is not None:
            every = max(1, cfg.checkpoint_every)
            steps = sorted({s for s in range(every, cfg.steps + 1, every)} | {cfg.steps})[-2:]
            try:
                for s in steps:
                    save(out / "checkpoints", s, run_config, embeds.clone(), type("Opt", (), {"state": {}})(),
                         torch.Generator().manual_seed(0), losses[:s])
            except (TypeError, AttributeError) as exc:  # its signature changed: the token files still stand
                say(f"note: checkpoints not written by the stand-in ({exc})")
    return result


def stand_in_train_tokens(classes, *, model, config, threads=None, resume=True, progress=None):
    """train_tokens's interface (ml/train_tokens.py), in this process: each class by the stand-in above,
    a class's own error in its place, as the real one returns it."""
    results = []
    for i, item in enumerate(classes):
        each = None if progress is None else (lambda step, total, loss, i=i: progress(i, step, total, loss))
        try:
            results.append(stand_in_textual_inversion(item.train_path, item.token, item.class_name, model=model,
                                                      config=item.config or config, output_dir=item.output_dir,
                                                      progress=each))
        except (FloatingPointError, ValueError, FileNotFoundError, PermissionError) as exc:
            results.append(exc)
    return results


class StandInPipeline:
    """A StableDiffusionPipeline's call: one small random image per prompt, from its own generator.

    Each image comes from a number drawn from its generator (as the real pipeline draws its noise), so
    an image depends on its seed and, with one generator for several draws (seed_mode="paper"), on
    its place in the sequence. Images are smooth noise at the requested size: they compress like a picture.
    """

    def __init__(self, size: int = 64):
        cfg = type("Config", (), {})
        self.unet = type("UNet", (), {"config": cfg()})()
        self.vae = type("VAE", (), {"config": cfg()})()
        self.unet.config.sample_size, self.vae.config.block_out_channels = size, [size]  # native_resolution

    def __call__(self, prompt, negative_prompt=None, generator=None, height=64, width=64, **settings):
        import torch
        from PIL import Image

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(prompts)
        images = []
        for text, g in zip(prompts, generators):
            draw = int(torch.randint(0, 2**31 - 1, (1,), generator=g)) if g is not None else 0
            small = _rng(text, draw).integers(0, 256, (8, 8, 3), dtype="uint8")
            images.append(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
        return type("Output", (), {"images": images})()

    def set_progress_bar_config(self, **_):
        pass


def stand_in_get_pipeline(encoder_root, model=None, scheduler="euler"):
    """get_pipeline's interface: the encoder root is checked as the real one checks it; no model loads."""
    from di_assets.ml import generate as gen
    from di_assets.ml.encoder_root import root_marker

    gen.model_spec_for(encoder_root, model).resolved()
    root_marker(Path(encoder_root).resolve()).stat()
    return StandInPipeline()


class StandInScorer:
    """ClipScorer's interface; similarities are random in [-1, 1]."""

    def __init__(self, spec):
        self.spec = spec
        self.calls = 0

    @property
    def model_id(self) -> str:
        return f"{self.spec.clip_model}/{self.spec.clip_pretrained}"

    def similarity(self, images, captions):
        import torch

        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        return torch.rand(len(images), len(captions), generator=g) * 2 - 1


_scorers: dict = {}


def stand_in_get_scorer(model=None):
    from di_assets.ml.models import ModelSpec

    spec = (model or ModelSpec()).resolved()
    return _scorers.setdefault(spec, StandInScorer(spec))


REAL_MODEL_LOADS: list[str] = []  # a stand-in missed a path: "loader <- caller", once each


def install_stand_ins() -> None:
    """Patch the module attributes that the code looks up when it runs (see the docstring), and watch
    the real model loaders: a load means the asset code reached a model by a path the stand-ins miss
    (the numbers then include real ML); it is said on stderr and under the table."""
    import di_assets.defs  # noqa: F401 - every module that binds a loader by name is loaded now
    from di_assets.ml import clip_metric, generate, models, textual_inversion

    textual_inversion.run_textual_inversion = stand_in_textual_inversion
    try:  # class_token trains through train_tokens (worker processes would not see a stand-in)
        from di_assets.ml import train_tokens
    except ImportError:  # an older version: class_token called run_textual_inversion itself
        pass
    else:
        train_tokens.train_tokens = stand_in_train_tokens
    generate.get_pipeline = stand_in_get_pipeline
    clip_metric.get_scorer = stand_in_get_scorer
    for name in ("load_diffusion_components", "load_clip", "load_encoder_root"):
        original = getattr(models, name, None) or getattr(generate, name, None)
        if original is None:
            continue

        def watched(*args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            where = f"{_name} <- {caller.f_globals.get('__name__')}.{caller.f_code.co_name}"
            if where not in REAL_MODEL_LOADS:
                REAL_MODEL_LOADS.append(where)
                say(f"WARNING: a real model loads ({where}): a stand-in misses this path; the numbers include real ML")
            return _original(*args, **kwargs)

        for module in [m for k, m in list(sys.modules.items()) if k.startswith("di_assets") and m is not None]:
            if getattr(module, name, None) is original:
                setattr(module, name, watched)


# ------------------------------------------------------------------------------------------ the data

def make_classes(dest: Path, n: int, images: int) -> None:
    """N class folders of `images` tiny PNGs each (16x16, a random colour and a random square)."""
    import numpy as np
    from PIL import Image

    for i in range(n):
        folder = dest / f"class_{i:05d}"
        folder.mkdir(parents=True)
        rng = _rng("class", i)
        for j in range(images):
            a = np.empty((16, 16, 3), dtype="uint8")
            a[:] = rng.integers(0, 256, 3, dtype="uint8")
            x, y = rng.integers(0, 10, 2)
            a[y:y + 6, x:x + 6] = rng.integers(0, 256, 3, dtype="uint8")
            Image.fromarray(a).save(folder / f"{j}.png")


def change_one_class(data: Path) -> str:
    """Rewrite one image of the middle class with other pixels; return the class key."""
    from PIL import Image, ImageOps

    folders = sorted(p for p in data.iterdir() if p.is_dir())
    folder = folders[len(folders) // 2]
    first = sorted(folder.glob("*.png"))[0]
    with Image.open(first) as im:
        changed = ImageOps.invert(im.convert("RGB"))
    changed.save(first)
    return folder.name


def dir_size(path: Path) -> tuple[int, int]:
    """Bytes and files under `path`."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


POSTGRES = {}  # with --postgres: "server", the running test server (di_assets_tests/test_postgres.py)


def use_postgres(work: Path, label: str) -> str:
    """A new database on the server and a DAGSTER_HOME whose instance lives in it, as the README's
    Postgres section says (the project's dagster.yaml plus its snippet); set in this process."""
    POSTGRES["made"] = POSTGRES.get("made", 0) + 1  # the warm-up's configuration may repeat a label
    db = f"bench{POSTGRES['made']}_" + re.sub(r"[^a-z0-9_]", "_", label.lower())[:40]
    os.environ.update(POSTGRES["server"].dagster_home(work / "home", db))
    return db


def instance_size(storage: Path) -> tuple[int, int]:
    """The instance's bytes and files: SQLite under the storage's .dagster, or with --postgres the
    database's size beyond its size with empty tables (and its tables' count)."""
    if not POSTGRES.get("db"):
        return dir_size(storage / ".dagster")
    server, db = POSTGRES["server"], POSTGRES["db"]
    conn = server.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(current_database())")
            (size,) = cur.fetchone()
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            (tables,) = cur.fetchone()
    finally:
        conn.close()
    return size - POSTGRES["empty"], tables


# ------------------------------------------------------------------------------------------ the CLI

class CommandFailed(RuntimeError):
    pass


class Tee(io.StringIO):
    """A command's stdout: kept, and shown on stderr as it comes (`    | `), its first 30 lines and
    then one line in 50 (`run` prints a table with a column per class); every line is in the text."""

    def __init__(self):
        super().__init__()
        self._line, self._lines = "", 0

    def write(self, text: str) -> int:
        self._line += text
        *done, self._line = self._line.split("\n")
        for line in done:
            self._lines += 1
            if self._lines <= 30 or self._lines % 50 == 0 or re.match(r"^\s*\[\s*[\d.]+s\]", line):
                print(f"    | {line[:200]}{' ...' if len(line) > 200 else ''}", file=sys.stderr, flush=True)
        return super().write(text)

    def close(self) -> None:
        if self._line:
            self.write("\n")


def cli(*argv: str) -> tuple[float, str]:
    """Run `di-assets ARGV` in this process; its wall time and stdout (echoed to stderr)."""
    from di_assets import cli as di_cli

    out = Tee()
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            rc = di_cli.main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int) and exc.code:
            out.write(f"{exc.code}\n")
    elapsed = time.perf_counter() - t
    out.close()
    text = out.getvalue()
    if rc:
        raise CommandFailed(f"di-assets {argv[0]} exited with {rc}")
    return elapsed, text


def parse_update(text: str) -> dict[str, list[str]]:
    """What `di-assets update` says it reran: {asset: [partition keys]} ([] for an unpartitioned one)."""
    done = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S+): (.*)$", line)
        if m and not line.startswith("   "):
            done[m.group(1)] = [] if m.group(2).strip() == "rebuilt" else [k.strip() for k in m.group(2).split(",")]
    return done


def describe_reruns(done: dict[str, list[str]], changed: str | None = None) -> str:
    if not done:
        return "nothing"
    parts = []
    for name, keys in done.items():
        if not keys:
            parts.append(name)
            continue
        classes = sorted({k.split("|")[0] for k in keys})
        who = (f"{changed} only" if classes == [changed] else
               f"{len(classes)} classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}")
        parts.append(f"{name} {len(keys)} ({who})")
    return "; ".join(parts)


def stage_lines(text: str) -> list[tuple[str, float]]:
    """`di-assets run`'s per-stage lines: `[  12.3s] label (4.5s)`."""
    return [(m.group(1), float(m.group(2))) for m in re.finditer(r"^\s*\[\s*[\d.]+s\] (.+) \(([\d.]+)s\)\s*$",
                                                                  text, re.M)]


def print_profile(profiler: cProfile.Profile, top: int, what: str) -> None:
    """The costliest functions of a profiled span, on stderr: by cumulative time, then by own time."""
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(max(10, top // 2))
    print(f"--- profile: {what}\n{buf.getvalue()}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ one configuration

def write_settings(path: Path, data: Path, storage: Path, shifts: list[str], grain: str | None,
                   num_samples: int | None) -> None:
    import yaml

    settings = {"dataset": str(data), "storage": str(storage), "models": {"family": "tiny", "device": "cpu"},
                "shifts": shifts, "classifiers": [], "baseline": False}
    if num_samples:
        settings["generation"] = {"num_samples": num_samples}
    if grain is not None:
        settings["partition_grain"] = grain
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def load_settings(path: Path, grain: str, data: Path, storage: Path, shifts: list[str], num_samples):
    """The settings with `partition_grain: grain`; (settings, note), or (None, why) where unsupported."""
    from di_assets.settings import Settings, SettingsError

    write_settings(path, data, storage, shifts, grain, num_samples)
    try:
        return Settings.load(path), None
    except SettingsError as exc:
        if "partition_grain" not in str(exc):
            raise
        why = str(exc).split(": ", 1)[-1]
        if grain != "class_shift":
            return None, (f"partition_grain: {grain} is not supported by this version ({why}); "
                          "skipping this configuration")
    write_settings(path, data, storage, shifts, None, num_samples)
    return Settings.load(path), ("this version has no partition_grain setting: class x shift, its only grain, "
                                 "runs without the key")


def count_events(storage: Path) -> str:
    """The runs in the instance and the events they stored, by type (the instance's own API)."""
    from collections import Counter

    from di_assets.defs.instance import open_instance

    instance = open_instance(storage)
    try:
        runs = instance.get_runs()
        kinds = Counter()
        for run in runs:
            for entry in instance.all_logs(run.run_id):
                kinds[entry.dagster_event_type.value if entry.dagster_event_type else "LOG_MESSAGE"] += 1
    finally:
        instance.dispose()
    top = ", ".join(f"{k} {v}" for k, v in kinds.most_common(8))
    return f"{len(runs)} runs, {sum(kinds.values())} events ({top})"


def requested_summary(requested: dict) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in requested.items()) or "nothing"


def planned_runs(driver, requested: dict) -> tuple[int | None, float]:
    """How many runs the driver makes of what a tick requested (its execute, with the runs not launched)."""
    count = []
    t = time.perf_counter()
    try:
        driver.materialize = lambda selection, partition_key=None, tags=None: count.append(selection)
        driver.execute(requested)
    except Exception as exc:  # noqa: BLE001 - a driver of another shape: say so, measure the rest
        say(f"note: could not plan the tick's runs ({exc.__class__.__name__}: {exc})")
        return None, time.perf_counter() - t
    finally:
        driver.__dict__.pop("materialize", None)
    return len(count), time.perf_counter() - t


def measure(n: int, k: int, grain: str, args, base: Path, row: dict) -> dict | None:
    """Fill `row` as the measurements come (an interrupted one keeps what it has); None: skipped."""
    import dagster as dg

    from di_assets.defs import build_defs
    from di_assets.defs.driver import LocalDriver
    from di_assets.defs.instance import open_instance
    from di_assets.ml.shifts import select_shifts

    label = f"{n} classes x {k} shifts, grain {grain}"
    catalog = [s.key for s in select_shifts(None)]
    if k > len(catalog):
        say(f"{label}: the catalog has {len(catalog)} shifts; skipping")
        return None
    shifts = catalog[:k]
    work = base / f"n{n}_s{k}_{grain}"
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: {work} exists and is not empty; choose an empty --keep folder")
    data, storage, config = work / "data", work / "store", work / "settings.yaml"
    work.mkdir(parents=True, exist_ok=True)
    settings, note = load_settings(config, grain, data, storage, shifts, args.num_samples)
    if settings is None:
        print(f"{label}: {note}", file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)
        return None
    say(f"=== {label}" + (f" ({note})" if note else ""))
    row.update({"classes": n, "shifts": k, "grain": grain, "pairs": n * k, "storage": storage})

    t = time.perf_counter()
    make_classes(data, n, args.images)
    say(f"made {n} class folders of {args.images} images in {time.perf_counter() - t:.1f}s")

    defs = build_defs(settings)
    if POSTGRES:
        POSTGRES["db"], POSTGRES["empty"] = use_postgres(work, label), 0
    instance = open_instance(storage)
    if POSTGRES:
        POSTGRES["empty"] = instance_size(storage)[0]  # the schema that open_instance made
    driver = LocalDriver(defs, instance)
    t = time.perf_counter()
    driver.tick()  # the daemon was already watching: the classes the sensor adds are new to it
    say(f"first tick on the empty instance {time.perf_counter() - t:.2f}s")

    said = io.StringIO()  # the sensor's own log line names every new class: shortened below
    t = time.perf_counter()
    with contextlib.redirect_stderr(said):
        driver.sensor()
    row["sensor"] = time.perf_counter() - t
    for line in said.getvalue().splitlines():
        print(f"    | {line[:200]}{' ...' if len(line) > 200 else ''}", file=sys.stderr)
    added = len(instance.get_dynamic_partitions("classes"))
    say(f"sensor: {added} classes added in {row['sensor']:.2f}s")
    if added != n:
        raise RuntimeError(f"the sensor added {added} classes, not {n}")
    cf = defs.resolve_assets_def(dg.AssetKey("counterfactuals")).partitions_def
    row["partitions"] = len(cf.get_partition_keys(dynamic_partitions_store=instance)) if cf else 1

    t = time.perf_counter()
    requested = driver.tick()
    row["tick"] = time.perf_counter() - t
    runs, plan_s = planned_runs(driver, requested)
    row["tick_requested"] = requested_summary(requested)
    row["tick_runs"] = runs
    say(f"tick: {row['tick']:.2f}s, requested {row['tick_requested']}; the driver would make {runs} runs of it "
        f"(planned in {plan_s:.2f}s)")

    if args.only_add_and_tick:
        instance.dispose()
        row["instance"] = instance_size(storage)
        say(f"instance: {row['instance'][0] / 1e6:.1f} MB in {row['instance'][1]} files")
        return row

    t = row["whole_started"] = time.perf_counter()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    try:
        if args.orchestrate == "run":
            instance.dispose()
            _, text = cli("run", "--config", str(config))
            row["stages"] = stage_lines(text)
        else:
            from di_assets.defs.progress import run_loggers

            log_file = storage / "logs" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.log"
            driver.run_config = run_loggers(log_file, False, log_level="INFO", bar=False)
            driver.execute(requested)
            seen = driver.settle(max_ticks=20)
            say(f"automation ran {driver.runs} runs: {requested_summary(seen)}")
            instance.dispose()
    finally:
        if profiler:
            profiler.disable()
    row["whole"] = time.perf_counter() - t
    say(f"whole orchestration ({args.orchestrate}): {row['whole']:.1f}s")
    if profiler:
        print_profile(profiler, args.profile, "whole orchestration")

    _, text = cli("query", "--config", str(config), "--format", "json",
                  "SELECT count(*) AS images, count(DISTINCT class_key || '|' || shift) AS pairs FROM scores")
    got = json.loads(text)[0]
    if got["pairs"] != n * k:
        raise RuntimeError(f"the scores hold {got['pairs']} class x shift pairs, not {n * k}")
    say(f"scores: {got['images']} images in {got['pairs']} class x shift pairs")
    row["instance"] = instance_size(storage)
    row["artifacts"] = dir_size(storage)
    row["events"] = count_events(storage)
    say(f"event log: {row['events']}")
    say(f"instance: {row['instance'][0] / 1e6:.1f} MB in {row['instance'][1]} files; storage in all "
        f"{row['artifacts'][0] / 1e6:.1f} MB in {row['artifacts'][1]} files")

    elapsed, text = cli("update", "--config", str(config))
    row["update_first_did"], row["update_first"] = describe_reruns(parse_update(text)), elapsed
    say(f"update (first after the run): {row['update_first']:.1f}s, reran {row['update_first_did']}")
    elapsed, text = cli("update", "--config", str(config))
    row["update_nothing_did"], row["update_nothing"] = describe_reruns(parse_update(text)), elapsed
    say(f"update, nothing changed: {row['update_nothing']:.1f}s, reran {row['update_nothing_did']}")

    changed = change_one_class(data)
    profiler = cProfile.Profile() if args.profile_update else None
    if profiler:
        profiler.enable()
    try:
        elapsed, text = cli("update", "--config", str(config))
    finally:
        if profiler:
            profiler.disable()
            print_profile(profiler, args.profile_update, f"update, {changed} changed")
    row["update_one_did"], row["update_one"] = describe_reruns(parse_update(text), changed), elapsed
    say(f"update, {changed} changed: {row['update_one']:.1f}s, reran {row['update_one_did']}")
    if POSTGRES.get("db"):  # last: compacting the tables first would speed the updates up
        row["live"] = POSTGRES["server"].database_size(POSTGRES["db"], compact=True)
        say(f"database after VACUUM FULL (live rows, after the updates): {row['live'] / 1e6:.2f} MB; the "
            "difference between two class counts, per added pair, is what a pair's live rows weigh")
    return row


# ------------------------------------------------------------------------------------------ the table

def table(rows: list[dict]) -> str:
    cols = ["classes", "shifts", "grain", "partitions", "sensor s", "tick s", "whole s", "s/partition",
            "instance MB", "KB/partition", "update-nothing s", "update-one s"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        size = r.get("instance", (None,))[0]  # (bytes, files)
        whole = r.get("whole")
        cells = [r["classes"], r["shifts"], r["grain"], r.get("partitions", "-"), f(r.get("sensor"), ".2f"),
                 f(r.get("tick"), ".2f"),
                 f">{r['stopped']:.0f} (stopped)" if "stopped" in r else f(whole, ".1f"),
                 f(whole / r["pairs"] if whole is not None else None, ".4f"),
                 f(size / 1e6 if size is not None else None, ".1f"),
                 f(size / 1e3 / r["pairs"] if size is not None and "stopped" not in r else None, ".1f"),
                 f(r.get("update_nothing"), ".1f"), f(r.get("update_one"), ".1f")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def grains(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in ("class", "class_shift")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"grain is class or class_shift (or both, comma-separated), got {text!r}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=ints, default=ints("10,100,1000"),
                    help="comma-separated class counts (default: 10,100,1000)")
    ap.add_argument("--shifts", type=ints, default=ints("24"),
                    help="comma-separated shift counts K: the first K keys of the default catalog (default: 24)")
    ap.add_argument("--grain", type=grains, default=["class_shift"],
                    help="partition_grain: class_shift (default) or class, or both comma-separated")
    ap.add_argument("--only-add-and-tick", action="store_true",
                    help="measure the sensor, one tick and the instance size only (e.g. 21000 classes, grain class)")
    ap.add_argument("--orchestrate", choices=["run", "automation"], default="run",
                    help="the whole orchestration: `di-assets run` (default), or automation ticks as the daemon runs them")
    ap.add_argument("--images", type=int, default=3, help="images per class folder (default: 3)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="images per class and shift (default: the settings' default)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="measure from a cold process (by default a throwaway 2 classes x 1 shift first pays the "
                         "imports and model loads, so that the first configuration is not charged for them)")
    ap.add_argument("--postgres", action="store_true",
                    help="the instance in a PostgreSQL database (the README's Postgres set-up) on a server started "
                         "for the benchmark as the tests start it (Debian's postgresql package); instance MB is "
                         "then the database's growth")
    ap.add_argument("--keep", metavar="DIR", help="keep the data, storage and instance under DIR for inspection")
    ap.add_argument("--profile", type=int, metavar="N", default=0,
                    help="print the N costliest functions of the whole orchestration (cProfile) to stderr")
    ap.add_argument("--profile-update", type=int, metavar="N", default=0,
                    help="print the N costliest functions of the update with one class changed to stderr")
    args = ap.parse_args()

    for var in ("DAGSTER_HOME", "DI_ASSETS_CONFIG", "DI_ASSETS_STORAGE", "DI_ASSETS_EXECUTOR"):
        os.environ.pop(var, None)  # the instance under the temporary folder; steps in this process
    import warnings

    warnings.filterwarnings("ignore", message=".*is currently in beta")
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)  # the sensor's lines name every class
    install_stand_ins()

    rows = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            base = Path(args.keep).resolve()
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_scale-")))
        if args.postgres:
            from di_assets_tests.test_postgres import Server, _server_bin

            POSTGRES["server"] = Server(_server_bin())
            stack.callback(POSTGRES["server"].stop)
            POSTGRES["server"].start()
        if not args.no_warmup:
            say("warm-up (not measured): 2 classes x 1 shift")
            measure(2, 1, args.grain[0], argparse.Namespace(**{**vars(args), "profile": 0}), base / "warmup", {})
        for n, k, grain in itertools.product(args.classes, args.shifts, args.grain):
            row: dict = {}
            try:
                if measure(n, k, grain, args, base, row) is None:
                    continue
            except (CommandFailed, RuntimeError) as exc:
                say(f"{n} classes x {k} shifts, grain {grain}: failed: {exc}")
                continue
            except BaseException as exc:  # Ctrl-C (Dagster may wrap it): the table of what was measured
                if not (isinstance(exc, KeyboardInterrupt) or "Interrupt" in type(exc).__name__):
                    raise
                if "whole_started" in row and "whole" not in row:
                    row["stopped"] = time.perf_counter() - row["whole_started"]
                    storage = row["storage"]
                    row["instance"] = instance_size(storage)
                    row["pairs_done"] = sum(1 for _ in (storage / "scores").rglob("*.parquet"))
                    row["images_done"] = sum(1 for _ in (storage / "images").rglob("*.png"))
                say(f"interrupted during {n} classes x {k} shifts" + (
                    f", {row['stopped']:.0f}s into the whole orchestration" if "stopped" in row else ""))
                if "tick" in row:
                    rows.append(row)
                break
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.keep:
            say(f"kept under {base}")

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nstand-in models, {'sensor + one tick only' if args.only_add_and_tick else args.orchestrate}; "
          f"s/partition and KB/partition are per class x shift pair; peak memory {rss:.0f} MB\n")
    print(table(rows), flush=True)
    if REAL_MODEL_LOADS:
        print(f"\nWARNING: real models were loaded ({'; '.join(REAL_MODEL_LOADS)}): a stand-in misses that path, "
              "and these numbers include real ML")
    for r in rows:
        details = [f"tick requested {r.get('tick_requested', '?')} ({r.get('tick_runs', '?')} runs)"]
        if "stopped" in r:
            details.append(f"stopped {r['stopped']:.0f}s into the whole orchestration, with {r['images_done']} "
                           f"images and {r['pairs_done']} score files written; the instance then "
                           f"{r['instance'][0] / 1e6:.1f} MB")
        if "stages" in r:
            details.append("stages: " + ", ".join(f"{label.split(':')[0]} {s:.1f}s" for label, s in r["stages"]))
            if "whole" in r:  # what `run` does around its stages: settings and folder checks, the picture, tables
                details.append(f"outside the stages {r['whole'] - sum(s for _, s in r['stages']):.1f}s")
        if "artifacts" in r:
            details += [f"storage in all {r['artifacts'][0] / 1e6:.1f} MB in {r['artifacts'][1]} files, instance "
                        f"{r['instance'][1]} files", f"event log after the whole orchestration: {r['events']}"]
        for key, what in (("update_first", "first update after the run"), ("update_nothing", "update-nothing"),
                          ("update_one", "update-one")):
            if key in r:
                details.append(f"{what} {r[key]:.1f}s, reran {r[key + '_did']}")
        print(f"\n{r['classes']} x {r['shifts']} ({r['grain']}): " + "; ".join(details), file=sys.stderr)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
