"""Textual inversion over worker processes (ml/train_tokens.py): each class ends as in one process."""

import multiprocessing
import os
import pickle
import signal

import pytest
import torch

from di_assets.ml.defaults import default_workers
from di_assets.ml.models import ModelSpec
from di_assets.ml.textual_inversion import (
    EMBEDS_FILE, NonFiniteTokenError, TextualInversionConfig, TokenClass, load_learned_embeds,
    run_textual_inversion_many,
)
from di_assets.ml.threads import cpu_budget
from di_assets.ml.train_tokens import train_tokens
from di_assets_tests.conftest import copy_classes, token_classes

SHAPES = ("circle", "square", "star")
# Not bitwise: the tokens differ from one process at one thread by ~5e-7 (losses by 1.5e-8), float noise
# of kernels whose dispatch differs between the two processes; the same tolerance as test_multi_class_ti.
TOL = dict(atol=1e-5, rtol=1e-4)
CONFIG = TextualInversionConfig.for_family("tiny", steps=4, batch_size=2, checkpoint_every=2, learning_rate=0.1,
                                           workers=2)


def _classes(data, out):
    return token_classes(data, out, SHAPES)


def test_workers_train_every_class_as_one_process_does(tmp_path, tiny):
    data = copy_classes(tmp_path / "shapes", SHAPES, per_class=4)
    (data / "empty").mkdir()  # a class's own problem comes back in its place; the others train
    classes = _classes(data, tmp_path / "workers") + [TokenClass(data / "empty", "<empty>", "empty")]
    seen = []
    results = train_tokens(classes, model=tiny, config=CONFIG, threads=1,
                           progress=lambda i, step, total, loss: seen.append((i, step, total)))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, so the same floats
    try:
        alone = run_textual_inversion_many(_classes(data, tmp_path / "alone"), model=tiny, config=CONFIG)
    finally:
        torch.set_num_threads(previous)
    for name, a, b in zip(SHAPES, results, alone):
        assert a.token == f"<{name}>"
        assert torch.allclose(a.embeds, b.embeds, **TOL) and a.losses == pytest.approx(b.losses, abs=1e-6)
        assert a.final_eval_loss == pytest.approx(b.final_eval_loss, abs=1e-6)
        token, embeds = load_learned_embeds(tmp_path / "workers" / name / EMBEDS_FILE)
        assert token == f"<{name}>" and torch.equal(embeds, a.embeds)
    assert isinstance(results[3], ValueError) and "empty" in str(results[3])
    # every step of every class reached the caller, in order per class
    for i in range(3):
        assert [step for j, step, _ in seen if j == i] == [1, 2, 3, 4]
    assert not multiprocessing.active_children()  # no worker outlives the call


class Stop(Exception):
    pass


@pytest.fixture
def sigterm_ignored():
    """The parent ignores SIGTERM, as a process under Dagster's interrupt handling may (it maps SIGTERM to
    SIGINT's handler); a spawned worker inherits the ignoring."""
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGTERM, old)


def test_an_exception_from_progress_stops_every_worker(tmp_path, tiny, sigterm_ignored):
    data = copy_classes(tmp_path / "shapes", SHAPES, per_class=4)

    def progress(i, step, total, loss):
        raise Stop(f"stopped at {i}/{step}")

    with pytest.raises(Stop):
        train_tokens(_classes(data, tmp_path / "out"), model=tiny,
                     config=TextualInversionConfig.for_family("tiny", steps=400, batch_size=2, workers=2),
                     progress=progress)
    assert not multiprocessing.active_children()  # terminated, not left training for 400 steps


def test_a_killed_worker_fails_the_call_while_the_others_train(tmp_path, tiny):
    data = copy_classes(tmp_path / "shapes", SHAPES[:2], per_class=4)
    killed = []

    def progress(i, step, total, loss):
        if not killed:  # the first step anywhere: kill one worker, as the kernel's OOM killer would
            victim = multiprocessing.active_children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    with pytest.raises(RuntimeError, match="exited with code -9"):  # noticed while the other still trains
        train_tokens(_classes(data, tmp_path / "out")[:2], model=tiny,
                     config=TextualInversionConfig.for_family("tiny", steps=2000, batch_size=2, workers=2),
                     progress=progress)
    assert not multiprocessing.active_children()


def test_a_worker_error_that_is_no_class_problem_is_raised(tmp_path):
    data = copy_classes(tmp_path / "shapes", SHAPES[:2], per_class=2)
    broken = ModelSpec(family="tiny", device="cpu", diffusion=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception) as info:  # the loader's own error, raised as in one process
        train_tokens(_classes(data, tmp_path / "out")[:2], model=broken, config=CONFIG)
    assert "no-such-model" in str(info.value)
    assert not multiprocessing.active_children()


def test_a_diverged_token_keeps_its_fields_across_processes():
    err = pickle.loads(pickle.dumps(NonFiniteTokenError("loss is nan", token="<star>", step=7, loss=float("nan"))))
    assert (str(err), err.token, err.step) == ("loss is nan", "<star>", 7)


def test_default_workers_by_family_and_device():
    cpus = cpu_budget()
    assert default_workers("tiny", "cpu") == cpus  # one single-threaded process per CPU
    assert default_workers("tiny", "cpu", groups=cpus + 1) == cpus + 1  # no CPU idle while one class is left
    assert default_workers("tiny", "cpu", groups=2 * cpus + 1) == cpus
    assert default_workers("sd", "cpu") == 1  # large operations keep one process's threads busy
    assert default_workers("tiny", "cuda:1") == default_workers("sd", "cuda") == 1
    assert TextualInversionConfig(workers=3).workers_on("tiny", "cpu") == 3
    with pytest.raises(ValueError, match="workers"):
        TextualInversionConfig(workers=0)
