"""Where a model's time goes in onnxruntime (CPU): kernel time per node, from onnxruntime's profiler.

    python -m bench.ops                              # the default model and its AD=0 backbone, batch 32
    python -m bench.ops --batch 1
    git show c5bd860:default_model/model.onnx > /tmp/before.onnx
    python -m bench.ops --baseline /tmp/before.onnx   # also against another export of the model

Prints each graph's kernel time per run and the costliest nodes of the WARN graph, so the attention's
share (mask convolutions, the NCHW copies of attended stages, the pooling products) can be read off,
then the img/s of the three graphs taken in turn. The three: WARN as exported, WARN with every mask
logit as one 3x3 convolution (the export before the reordered forms), and the AD=0 backbone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.run import interleaved, ort_session
from export.onnx_export import INPUT_NAME, _export
from models import checkpoint
from models.warn import plain_backbone

ROOT = Path(__file__).resolve().parents[1]


def kernel_ms(path: Path, batch: int, threads: int, runs: int) -> tuple[float, Counter]:
    """(kernel ms per run, ms per run by (op type, node name))."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        shape = [batch, *session.get_inputs()[0].shape[1:]]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        for _ in range(3):  # warm-up, profiled too: dropped below by counting only the last `runs`
            session.run(None, {"image": x})
        for _ in range(runs):
            session.run(None, {"image": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 3)
    by_node: Counter = Counter()
    for e in nodes[-per_run * runs :]:
        by_node[(e["args"]["op_name"], e["name"].removesuffix("_kernel_time"))] += e["dur"] / 1e3 / runs
    return sum(by_node.values()), by_node


def baseline_session(
    p: argparse.ArgumentParser, path: Path, threads: int, size: tuple[int, int]
) -> ort.InferenceSession:
    """--baseline's session, checked before the exports and profiles take their minutes."""
    try:
        session = ort_session(path, threads)
    except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        p.error(f"--baseline: onnxruntime cannot load {path}: {str(e)[:200]}")
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].shape[2:] != list(size):
        got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        p.error(f"--baseline: expected one input {INPUT_NAME!r} of {size[0]}x{size[1]} images, got {got or 'none'}")
    return session


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "default_model/model.pt"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--seconds", type=float, default=12.0, help="img/s: per graph, over all turns")
    p.add_argument("--baseline", type=Path, help="another ONNX export of the same model, to take turns with")
    a = p.parse_args(argv)
    if a.batch < 1 or a.threads < 0 or a.runs < 1 or a.top < 0 or not a.seconds > 0:
        p.error("--batch and --runs must be at least 1, --threads and --top at least 0, --seconds positive")
    if a.baseline is not None and not a.baseline.is_file():
        p.error(f"--baseline: no such file: {a.baseline}")
    model, _ = checkpoint.load(a.checkpoint)
    model.eval()
    baseline = None if a.baseline is None else baseline_session(p, a.baseline, a.threads, model.config.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("warn", "single-conv masks", "backbone")}
        _export(model, paths["warn"])
        _export(model, paths["single-conv masks"], reordered=False)
        _export(plain_backbone(model), paths["backbone"])
        totals = {}
        for name, path in paths.items():
            totals[name], by_node = kernel_ms(path, a.batch, a.threads, a.runs)
            if name == "warn":
                top = by_node.most_common(a.top)
        sessions = {name: ort_session(path, a.threads) for name, path in paths.items()}
        if baseline is not None:
            sessions["baseline"] = baseline
        x = np.random.default_rng(0).random((a.batch, 3, *model.config.input_size), dtype=np.float32)
        rates = interleaved(sessions, x, a.seconds, rounds=6)
    print(f"kernel time per run at batch {a.batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in totals.items()))
    print(f"backbone / WARN: {totals['backbone'] / totals['warn']:.2f}x")
    for (op, node), ms in top:
        print(f"{ms:8.3f} ms {ms / totals['warn']:6.1%}  {op:16s} {node}")
    print("img/s, six turns each, in turn: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    print(
        f"WARN vs backbone {rates['warn'] / rates['backbone']:.3f}x; "
        f"single-conv masks vs backbone {rates['single-conv masks'] / rates['backbone']:.3f}x; "
        f"WARN vs single-conv masks {rates['warn'] / rates['single-conv masks']:.3f}x"
        + (f"; WARN vs baseline {rates['warn'] / rates['baseline']:.3f}x" if "baseline" in rates else "")
    )


if __name__ == "__main__":
    main()
