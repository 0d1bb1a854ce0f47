"""`bench.compare --gc` puts this directory on the service's PYTHONPATH: each of its processes times its
garbage collections (gc.callbacks) and writes the totals to $BENCH_GC_DIR/<pid>.json twice a second."""

import gc
import json
import os
import threading
import time

_began = [0.0]
_seconds = [0.0, 0.0, 0.0]  # by generation
_counts = [0, 0, 0]
_pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection over 1 ms


def _time(phase: str, info: dict) -> None:
    now = time.perf_counter()
    if phase == "start":
        _began[0] = now
        return
    took, generation = now - _began[0], info["generation"]
    _seconds[generation] += took
    _counts[generation] += 1
    if took > 1e-3:
        _pauses.append((generation, took))


def _write(path: str) -> None:
    while True:
        time.sleep(0.5)
        with open(path + ".tmp", "w") as f:
            json.dump({"seconds": _seconds, "counts": _counts, "pauses": _pauses}, f)
        os.replace(path + ".tmp", path)


if _dir := os.environ.get("BENCH_GC_DIR"):
    gc.callbacks.append(_time)
    threading.Thread(target=_write, args=(os.path.join(_dir, f"{os.getpid()}.json"),), daemon=True).start()
