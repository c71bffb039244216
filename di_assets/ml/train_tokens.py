"""Train the tokens of many classes: groups of `classes_per_batch` classes, each group one training loop
(`run_textual_inversion_many`), and on a CPU the groups spread over worker processes.

Why processes on a CPU: the tiny model's operations are too small for a team of threads to pay off
when idle threads sleep (this 2-core machine, one textual-inversion step of the tiny model: one thread
0.14 s, two threads that sleep when idle 0.17 s, two that spin 0.09 s, but spinning threads made a step
10x slower beside another busy process; see ml/threads.py). Independent single-threaded processes, one
per CPU, have no team to wait for: each class trains at the one-thread speed, several at once, and
beside another process each simply gets its share of the CPUs. Every class ends exactly as in one
process at one thread (same draws, same operations), each in its own output folder.

No Dagster here: `progress(index, step, steps, loss)` reaches the caller in its own thread, as from
`run_textual_inversion_many`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue as queue_module
import time
from typing import Callable, Sequence

from .textual_inversion import TextualInversionConfig, TokenClass, run_textual_inversion_many
from .threads import thread_count

log = logging.getLogger("di_assets")

POLL_S = 0.5  # how often the parent checks that its workers are alive while it reads their messages
DRAIN_S = 2.0  # how long it reads a dead worker's last messages before it calls the worker lost
STOP_S = 3.0  # how long a stopped worker has to end before it is killed


def train_tokens(
    classes: Sequence[TokenClass],
    *,
    model,
    config: TextualInversionConfig,
    threads: int | None = None,
    resume: bool = True,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> list:
    """Learn every class's token; one result or class error per class, in order (as
    `run_textual_inversion_many`, whose contract each group follows).

    Groups of `config.classes_per_batch` classes train in one loop. With more than one of
    `config.workers` (both by default for the model's family and device) the groups run in that many
    fresh processes (spawned, so the caller's threads and open files are not copied), which share the
    `threads` CPU threads (default: ml/threads.py's count) with at least one each; an error that is not
    a class's own stops them all and is raised here, as is an exception from `progress`.
    """
    spec = model.resolved()  # `auto` made the device it runs on
    items = list(classes)
    per_loop = config.classes_per_batch_on(spec.family, spec.device)
    groups = [list(range(i, min(i + per_loop, len(items)))) for i in range(0, len(items), per_loop)]
    workers = max(1, min(config.workers_on(spec.family, spec.device, len(groups)), len(groups)))
    threads = max(1, thread_count(threads) // workers)
    results: list = [None] * len(items)
    if workers == 1:
        for group in groups:
            each = None if progress is None else (lambda i, step, total, loss, g=group: progress(g[i], step, total, loss))
            for index, r in zip(group, run_textual_inversion_many([items[i] for i in group], model=model,
                                                                 config=config, resume=resume, progress=each)):
                results[index] = r
        return results

    # The groups, dealt out so that each worker gets about as many classes (largest groups first).
    shares: list[list[list[int]]] = [[] for _ in range(workers)]
    for group in sorted(groups, key=len, reverse=True):
        min(shares, key=lambda share: sum(map(len, share))).append(group)
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_worker, name=f"di-assets-ti-{n}", daemon=True,
                         args=(n, [[(i, items[i]) for i in group] for group in share], model, config, resume,
                               threads, messages, os.getpid()))
             for n, share in enumerate(shares)]
    log.info("textual inversion of %d classes in %d worker processes (%d thread%s each)", len(items), workers,
             threads, "" if threads == 1 else "s")
    finished: set[int] = set()

    def handle(message) -> None:
        kind, n, *body = message
        if kind == "progress":
            if progress is not None:
                progress(*body)
        elif kind == "result":
            index, r = body
            results[index] = pickle.loads(r)
        elif kind == "error":  # not a class's own problem: the whole step fails, as in one process
            raise pickle.loads(body[0])
        elif kind == "done":
            finished.add(n)

    try:
        for p in procs:
            p.start()
        checked = time.monotonic()
        while len(finished) < len(procs):
            try:
                handle(messages.get(timeout=POLL_S))
            except queue_module.Empty:
                pass
            if time.monotonic() - checked < POLL_S:
                continue
            checked = time.monotonic()  # a killed worker: noticed within POLL_S, while the others go on
            if any(n not in finished and not p.is_alive() for n, p in enumerate(procs)):
                # what a worker sent is in the pipe before it exits: read that first
                until = time.monotonic() + DRAIN_S
                while time.monotonic() < until:
                    try:
                        handle(messages.get(timeout=0.1))
                    except queue_module.Empty:
                        break
                for n, p in enumerate(procs):
                    if n not in finished and not p.is_alive():
                        raise RuntimeError(f"textual-inversion worker {n} exited with code {p.exitcode} "
                                           "before it finished its classes (killed, or out of memory?)")
        lost = [items[i].token for i, r in enumerate(results) if r is None]
        if lost:
            raise RuntimeError(f"textual-inversion workers ended without a result for {', '.join(lost)}")
    finally:
        _stop(procs)  # a failure, or the caller stopping us (an exception from progress): stop them all
        messages.close()
    return results


def _stop(procs) -> None:
    """End every worker still running: SIGTERM, then SIGKILL for one that outlives STOP_S. A worker
    inherits an ignored SIGTERM from a parent that ignores it (exec keeps SIG_IGN), and it may not yet
    have reached its own code, which restores the default."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    until = time.monotonic() + STOP_S
    for p in procs:
        p.join(timeout=max(0.0, until - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=STOP_S)


def _worker(n: int, share, model, config, resume: bool, threads: int, messages, parent: int) -> None:
    """One worker process: its groups one after another, every step's progress and every class's result
    sent to the parent; it stops at the next step once the parent is gone."""
    import signal

    import torch

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() ends us (see _stop)
    torch.set_num_threads(threads)

    def report(group):
        def each(i, step, total, loss):
            if os.getppid() != parent:
                raise SystemExit(f"textual-inversion worker {n}: its parent process ended")
            messages.put(("progress", n, group[i][0], step, total, loss))
        return each

    try:
        for group in share:
            outcomes = run_textual_inversion_many([item for _, item in group], model=model, config=config,
                                                  resume=resume, progress=report(group))
            for (index, _), r in zip(group, outcomes):
                messages.put(("result", n, index, _sendable(r)))
    except BaseException as exc:  # noqa: BLE001 - sent to the parent, which raises it
        messages.put(("error", n, _sendable(exc)))
    else:
        messages.put(("done", n))


def _sendable(obj) -> bytes:
    """`obj` pickled by the plain pickler: a queue's own pickler would share a tensor's memory through
    this process, which may have ended when the parent reads it, and drops silently what does not
    pickle (that becomes a RuntimeError naming it)."""
    try:
        return pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - e.g. an exception holding an open file
        return pickle.dumps(RuntimeError(f"{type(obj).__name__}: {obj}"))
