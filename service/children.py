"""Processes `python -m service` starts beside its workers: the shared session (service/shared_session.py) and
the store writer (service/store_writer.py). Each serves the workers on a Unix socket in a directory only
this user may enter, a peer must prove the run's random key (multiprocessing's HMAC handshake) before it
is served, and the launcher restarts one that dies."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.errors import StartupError

log = logging.getLogger("service.children")


def as_child_of_the_service(name: bytes) -> None:
    """Named for ps and top; deaf to the SIGINT and SIGTERM sent to the whole process group (Ctrl-C, a
    container's stop), so the workers can finish their requests first (the parent kills it after);
    and killed should the parent die without that."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name)  # PR_SET_NAME
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() == 1:  # the parent died before PDEATHSIG was set
        sys.exit(1)


class Child:
    """A server process for the workers, started before them and restarted should it die. `target(address,
    key)` runs in it and creates the socket at `address` once it serves (its existence says ready)."""

    def __init__(
        self,
        target: Callable[[str, bytes], None],
        what: str,
        address_env: str,
        key_env: str,
        startup_timeout_s: float = 300,
        failure: type[StartupError] = StartupError,
    ) -> None:
        self.target, self.what, self.failure = target, what, failure
        self.address_env, self.key_env = address_env, key_env
        self.folder = tempfile.mkdtemp(prefix="warn-child-")  # mode 0700: only this user connects
        self.address = str(Path(self.folder) / "socket")
        self.key = os.urandom(32)
        self.startup_timeout_s = startup_timeout_s
        self._stopping = threading.Event()
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0

    def _spawn(self) -> None:
        Path(self.address).unlink(missing_ok=True)
        self.process = multiprocessing.get_context("spawn").Process(
            target=self.target, args=(self.address, self.key), name=f"warn {self.what}", daemon=True
        )
        self.process.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not Path(self.address).exists():
            if not self.process.is_alive():
                raise self.failure(f"{self.what}'s process exited with code {self.process.exitcode}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise self.failure(f"{self.what} did not start in {self.startup_timeout_s:.0f} s")
            time.sleep(0.05)

    def env(self) -> dict[str, str]:
        """What tells a worker where the process is, and the key to prove itself with."""
        return {self.address_env: self.address, self.key_env: self.key.hex()}

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, daemon=True, name=f"watchdog {self.what}").start()
        log.info("%s for every worker, in process %s", self.what, self.process.pid)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self.process.join(0.5)
            if self.process.is_alive() or self._stopping.is_set():
                continue
            log.error("%s's process exited with code %s; restarting it", self.what, self.process.exitcode)
            self.restarts += 1
            try:
                self._spawn()
            except StartupError as e:
                log.error("cannot restart %s: %s", self.what, e)
                time.sleep(1)

    def stop(self) -> None:
        self._stopping.set()
        if self.process is not None and self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM; the workers it served have exited
            self.process.join(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def peer_from_env(address_env: str, key_env: str) -> tuple[str, bytes] | None:
    """Where a worker finds the child the launcher started, and its key (b"" where the variable is not the
    key in hex: a stray variable, not the launcher's); None where it started none."""
    address = os.environ.get(address_env)
    if not address:
        return None
    try:
        return address, bytes.fromhex(os.environ.get(key_env, ""))
    except ValueError:
        return address, b""
