"""Device leases: on a machine with several GPUs, each concurrent step holds one GPU of its own.

A lease is an exclusive `flock` on one lock file per device. The kernel drops the lock when
its file is closed, which also happens when the holding process dies, so a crashed or killed
step never keeps a device. Works across processes (the multiprocess executor's steps) and
within one (each lease opens its own file description).

No torch import at module level: the Dagster layer imports this while loading definitions.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger("di_assets")

DEVICES_ENV = "DI_ASSETS_DEVICES"  # e.g. "cuda:0,cuda:1"
LOCK_DIR_ENV = "DI_ASSETS_LOCK_DIR"


def device_list(devices: Sequence[str] | str | None = None) -> list[str]:
    """The devices that steps lease: as given, else $DI_ASSETS_DEVICES, else every visible CUDA device.

    Empty without CUDA: a CPU (or an Apple GPU) is shared by the steps, not leased.
    """
    if devices is None:
        devices = os.environ.get(DEVICES_ENV) or None
    if isinstance(devices, str):
        devices = devices.split(",")
    if devices is not None:
        return [d.strip() for d in devices if d.strip()]
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def default_lock_dir() -> Path:
    # One folder per machine (not per user): the GPUs are per machine.
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "di_assets_device_locks")


def _lock_file(lock_dir: Path, device: str) -> Path:
    return lock_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock")


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


@contextmanager
def lease_device(
    devices: Sequence[str] | str | None = None,
    lock_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    poll: float = 0.2,
) -> Iterator[str]:
    """Hold one free device of `devices` for the duration of the block; wait while all are held.

    Released when the block ends, by return or by exception, and by the OS if the process dies.
    `timeout` (seconds, None: wait forever) raises TimeoutError naming the holders.
    """
    devices = device_list(devices)
    if not devices:
        raise ValueError(f"no device to lease: list some in ${DEVICES_ENV} (e.g. cuda:0,cuda:1) or in the config")
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    paths = {d: _lock_file(lock_dir, d) for d in devices}
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = False
    while True:
        for device, path in paths.items():
            fd = _try_lock(path)
            if fd is None:
                continue
            try:
                # Who holds it, for the messages of those who wait.
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
                log.info("leased %s (lock %s)", device, path)
                yield device
            finally:
                os.close(fd)  # closing drops the lock
            return
        holders = ", ".join(f"{d} ({_holder(p)})" for d, p in paths.items())
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free device after {timeout:g} s; all are held: {holders}")
        if not waiting:
            log.info("waiting for a free device; all are held: %s", holders)
            waiting = True
        time.sleep(poll)


@contextmanager
def leased_spec(spec, devices: Sequence[str] | str | None = None, lock_dir=None, timeout: float | None = None):
    """`spec` (a ModelSpec) on a leased GPU for the duration of the block.

    Only `device: auto` leases. A device named in the config is used as given, and without
    GPUs to lease (`device_list` empty) the spec is yielded unchanged.
    """
    if spec.device != "auto" or not (devices := device_list(devices)):
        yield spec
        return
    with lease_device(devices, lock_dir, timeout) as device:
        yield replace(spec, device=device)
