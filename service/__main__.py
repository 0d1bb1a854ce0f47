"""`python -m service [uvicorn options]`: the service on uvicorn, one worker process per core.

WARN_WORKERS sets the number of workers (0, the default: one per core); uvicorn's own options and
UVICORN_* variables (host, port, ...) pass through. Each worker listens on a socket of its own
(WARN_REUSE_PORT) and may run on a core of its own (WARN_PIN_WORKERS; see service/workers.py).
Several workers share stored predictions through the disk (or Redis) store and report metrics
together (Prometheus multiprocess mode). On a GPU (WARN_SHARED_SESSION) they also share one session, in
a process of its own (service/shared_session.py), and one process of its own makes the disk store's
writes (WARN_STORE_WRITER, service/store_writer.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from service import store_writer
from service import workers as workers_module
from service.children import Child
from service.config import Settings
from service.connection import PROTOCOL
from service.errors import StartupError
from service.logs import show_service_logs
from service.shared_session import ADDRESS_ENV, KEY_ENV, SharedSession
from service.store import DiskStore, scratch_dir


def main(argv: list[str] | None = None) -> None:
    show_service_logs()  # the processes it starts beside the workers, and their restarts
    settings = Settings()
    workers = settings.workers()
    os.environ["WARN_WORKERS"] = str(workers)  # each worker sizes its decoding pool by this
    made = []  # directories this run shares between its workers, removed at exit
    if settings.STORE == "disk" and settings.STORE_DIR is None:
        made.append(scratch_dir(DiskStore.file_bound(settings.STORE_MAX_BYTES)))
        os.environ["WARN_STORE_DIR"] = made[-1]
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made.append(tempfile.mkdtemp(prefix="warn-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made[-1]
    children: list[Child] = []
    if settings.shared_session():
        children.append(SharedSession())
    if settings.store_writer() and store_writer.available():
        children.append(store_writer.StoreWriter())
    for name in (ADDRESS_ENV, KEY_ENV, store_writer.ADDRESS_ENV, store_writer.KEY_ENV):  # the workers' own only
        os.environ.pop(name, None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if settings.GRPC_HOST is None:  # gRPC listens where HTTP does
        os.environ["WARN_GRPC_HOST"] = http_host(argv)
    if workers > 1:
        core_locks = None
        if settings.pinned():
            core_locks = tempfile.mkdtemp(prefix="warn-cores-")
            made.append(core_locks)
        workers_module.use(settings.REUSE_PORT and workers_module.available(), core_locks)
    from uvicorn.main import main as uvicorn

    args = [
        "service.main:app",
        "--workers",
        str(workers),
        "--limit-concurrency",
        str(settings.MAX_CONNECTIONS),
        "--timeout-graceful-shutdown",
        str(round(settings.SHUTDOWN_TIMEOUT_S)),
        "--http",  # uvicorn's httptools protocol with a deadline for request heads; a later --http replaces it
        PROTOCOL,
    ]
    try:
        for child in children:
            child.start()  # after the store's and metrics' directories are set: it uses them too
            os.environ.update(child.env())
        uvicorn.main(args + argv, standalone_mode=True)
    except StartupError as e:
        sys.exit(f"cannot start: {e}")
    finally:
        for child in children:
            child.stop()
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


def http_host(argv: list[str]) -> str:
    """uvicorn's --host from its arguments or UVICORN_HOST (its default, 127.0.0.1, otherwise)."""
    host = os.environ.get("UVICORN_HOST", "127.0.0.1")
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    return host


if __name__ == "__main__":
    main()
