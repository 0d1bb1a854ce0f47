"""Micro-batching: concurrent requests share a session.run and each gets its own answer."""

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image

from service.batcher import MicroBatcher
from service.errors import ModelTimeout, ModelUnavailable, Overloaded
from tests.serving.conftest import make_client, png


def run_identity(batches: list[int], delay: float = 0.0):
    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        batches.append(len(x))
        time.sleep(delay)
        return {"echo": x * 2, "sum": x.reshape(len(x), -1).sum(1)}

    return run


def test_requests_are_gathered_and_answered_separately():
    batches: list[int] = []

    async def main():
        b = MicroBatcher(run_identity(batches, 0.01), max_batch=8, max_wait_ms=20, queue_size=64)
        b.start()
        xs = [np.full((1, 3), i, np.float32) for i in range(20)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.stop()
        return xs, outs

    xs, outs = asyncio.run(main())
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out["echo"], x * 2)
        assert out["sum"].shape == (1,)
    assert sum(batches) == 20 and max(batches) > 1 and max(batches) <= 8


def test_multi_row_requests_keep_their_rows():
    async def main():
        b = MicroBatcher(run_identity([]), max_batch=16, max_wait_ms=10, queue_size=8)
        b.start()
        a, c = np.arange(6, dtype=np.float32).reshape(3, 2), np.full((2, 2), 7, np.float32)
        ra, rc = await asyncio.gather(b.submit(a), b.submit(c))
        await b.stop()
        return a, c, ra, rc

    a, c, ra, rc = asyncio.run(main())
    np.testing.assert_array_equal(ra["echo"], a * 2)
    np.testing.assert_array_equal(rc["echo"], c * 2)


def held_until_set():
    """A model that answers its batch as "y" once the returned event is set (5 s at most), and that event."""
    gate = threading.Event()

    def run(x):
        gate.wait(5)
        return {"y": x}

    return gate, run


def test_full_queue_is_refused_not_grown():
    gate, slow = held_until_set()

    async def main():
        b = MicroBatcher(slow, max_batch=1, max_wait_ms=0, queue_size=3)  # 3 in progress: 1 running, 2 queued
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        await asyncio.sleep(0.05)  # the first request is now running, holding the model
        queued = [asyncio.ensure_future(b.submit(np.zeros((1, 1)))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await b.submit(np.zeros((1, 1)))
        gate.set()
        await asyncio.gather(first, *queued)
        await b.stop()

    asyncio.run(main())


def test_an_idle_model_runs_a_request_at_once_and_a_busy_one_takes_the_whole_queue():
    gate = threading.Event()
    batches: list[int] = []

    def run(x):
        batches.append(len(x))
        if len(batches) == 1:
            gate.wait(5)
        return {"y": x}

    async def main():
        b = MicroBatcher(run, max_batch=8, max_wait_ms=5000, queue_size=64)
        b.start()
        started = time.perf_counter()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        while not batches:
            await asyncio.sleep(0.001)
        waited = time.perf_counter() - started  # nothing else was decoding, so no wait for a fuller batch
        rest = [asyncio.ensure_future(b.submit(np.zeros((1, 1)))) for _ in range(11)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)
        await b.stop()
        return waited

    waited = asyncio.run(main())
    assert waited < 2.5, f"a lone request waited {waited:.2f} s for a batch"
    assert batches == [1, 8, 3], "while the model was busy, the queue was taken whole, up to max_batch"


def test_a_batch_waits_for_requests_still_decoding_at_most_max_wait():
    batches: list[int] = []

    async def main():
        b = MicroBatcher(run_identity(batches), max_batch=8, max_wait_ms=5000, queue_size=64)
        b.start()

        async def decode_then_submit(delay: float):
            async with b.admit():
                await asyncio.sleep(delay)  # stands for decoding in a thread
                return await b.submit_admitted(np.zeros((1, 1)))

        await asyncio.gather(decode_then_submit(0), decode_then_submit(0.2))
        await b.stop()

    asyncio.run(main())
    assert batches == [2], "the first request waited for the one still decoding"


def test_a_failing_batch_fails_only_its_requests():
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"y": x}

    async def main():
        b = MicroBatcher(flaky, max_batch=1, max_wait_ms=0, queue_size=4)
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(np.zeros((1, 1)))
        out = await b.submit(np.ones((1, 1)))
        await b.stop()
        return out

    assert asyncio.run(main())["y"][0, 0] == 1


def test_requests_that_cannot_be_stacked_fail_together_and_the_batcher_goes_on():
    gate, held = held_until_set()

    async def main():
        b = MicroBatcher(held, max_batch=8, max_wait_ms=0, queue_size=8)
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 2))))  # runs while the next two queue
        await asyncio.sleep(0.05)
        mismatched = [asyncio.ensure_future(b.submit(np.zeros((1, n)))) for n in (2, 3)]
        await asyncio.sleep(0.05)
        gate.set()
        await first
        failed = await asyncio.gather(*mismatched, return_exceptions=True)
        out = await b.submit(np.ones((1, 2)))
        await b.stop()
        return failed, out

    failed, out = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in failed), failed
    assert out["y"][0, 0] == 1


def test_a_hung_run_times_its_requests_out_and_refuses_new_ones_until_it_ends():
    gate, held = held_until_set()
    ran: list[float] = []

    def run(x):
        ran.append(float(x[0, 0]))
        return held(x)

    async def main():
        b = MicroBatcher(run, max_batch=1, max_wait_ms=0, queue_size=8, timeout_s=0.3)
        b.start()
        hung = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(b.submit(np.ones((1, 1))))  # queued behind the hung run
        for request in (hung, behind):
            with pytest.raises(ModelTimeout, match="within 0.3 s"):
                await request
        stalled_while_hung, admitted = b.stalled(), b.admitted
        started = time.perf_counter()
        with pytest.raises(ModelUnavailable, match="has not finished its current run"):
            await b.submit(np.full((1, 1), 3.0))
        refused_in = time.perf_counter() - started
        gate.set()
        while b.stalled():
            await asyncio.sleep(0.01)
        out = await b.submit(np.full((1, 1), 2.0))
        await b.stop()
        return stalled_while_hung, admitted, refused_in, out

    stalled_while_hung, admitted, refused_in, out = asyncio.run(main())
    assert stalled_while_hung and admitted == 0
    assert refused_in < 0.1, "a stalled model refuses at once, not at the deadline"
    assert out["y"][0, 0] == 2
    assert ran == [0.0, 2.0], "the request that timed out in the queue never ran, nor the refused one"


def test_a_hung_model_answers_504_then_503_unready_then_recovers(model_path):
    """WARN_MODEL_TIMEOUT_S over HTTP: the request whose run hangs gets 504; while the run goes on, readiness
    is 503 and new requests are refused at once; once it ends, all is as before."""
    with make_client(model_path, MODEL_TIMEOUT_S=0.5) as c:
        rt = c.app.state.runtime
        original, gate = rt.batcher._run, threading.Event()
        rt.batcher._run = lambda x: (gate.wait(10), original(x))[1]
        image = {"content": png(Image.new("RGB", (16, 16))), "headers": {"content-type": "image/png"}}
        try:
            timed_out = c.post("/v1/predict", **image)
            unready = c.get("/v2/health/ready")
            model_unready = c.get(f"/v2/models/{rt.info.name}/ready")
            started = time.perf_counter()
            refused = c.post("/v1/predict", **image)
            refused_in = time.perf_counter() - started
        finally:
            gate.set()
        deadline = time.monotonic() + 10
        while c.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        recovered = c.post("/v1/predict", **image)
    assert timed_out.status_code == 504, timed_out.text
    assert timed_out.json()["code"] == "model_timeout" and "0.5 s" in timed_out.json()["error"]
    assert unready.status_code == 503 and unready.json() == {"ready": False}
    assert model_unready.status_code == 503 and "current run" in model_unready.json()["error"]
    assert refused.status_code == 503 and refused.json()["code"] == "model_unavailable"
    assert refused.headers["retry-after"] == "1" and refused_in < 0.4
    assert recovered.status_code == 200


def test_overloaded_service_answers_503_with_retry_after(model_path):
    import service.pipeline as predictor

    with make_client(model_path, QUEUE_SIZE=1, MAX_BATCH_SIZE=1) as c:
        rt = c.app.state.runtime
        original = rt.batcher._run
        gate = threading.Event()
        rt.batcher._run = lambda x: (gate.wait(5), original(x))[1]
        image = png(predictor.Image.new("RGB", (16, 16)))
        results = []

        def call():
            results.append(c.post("/v1/predict", content=image, headers={"content-type": "image/png"}))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while not any(r.status_code == 503 for r in results) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(10)
        codes = sorted(r.status_code for r in results)
        assert 503 in codes and 200 in codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["code"] == "overloaded"


def test_concurrent_http_requests_are_batched(server):
    import httpx
    from PIL import Image

    images = [png(Image.new("RGB", (40, 40), (i * 20, 255 - i * 20, 90))) for i in range(12)]

    def batch_stats(text: str) -> tuple[float, float]:
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith("warn_batch_size_")
        }
        return values["warn_batch_size_sum"], values["warn_batch_size_count"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            single = [
                (
                    await http.post("/v1/predict?probabilities=true", content=im, headers={"content-type": "image/png"})
                ).json()
                for im in images
            ]
            before = batch_stats((await http.get("/metrics")).text)
            together = await asyncio.gather(
                *(
                    http.post("/v1/predict?probabilities=true", content=im, headers={"content-type": "image/png"})
                    for im in images
                )
            )
            after = batch_stats((await http.get("/metrics")).text)
            return single, [r.json() for r in together], before, after

    single, together, before, after = asyncio.run(main())
    for s, t in zip(single, together):
        assert s["probabilities"] == pytest.approx(t["probabilities"], abs=1e-5)
    assert after[0] - before[0] == 12, "every image ran exactly once"
    assert after[1] - before[1] < 12, "concurrent requests should have shared batches"


def gated_run(threads: list[str], gate: threading.Event):
    """Records each run's thread; a run whose first value is 1 waits for `gate`."""

    def run(x):
        threads.append(threading.current_thread().name)
        if x[0, 0] == 1:
            gate.wait(5)
        return {"y": x * 2}

    return run


def test_a_lone_request_runs_in_the_calling_thread_and_one_among_others_is_batched():
    threads: list[str] = []

    async def main():
        b = MicroBatcher(gated_run(threads, threading.Event()), max_batch=8, max_wait_ms=5000, queue_size=8)
        b.start()
        async with b.admit():
            out = await asyncio.to_thread(b.run_alone, np.full((1, 1), 3, np.float32))
        async with b.admit(), b.admit():  # another request in progress: they may share a batch
            refused = await asyncio.to_thread(b.run_alone, np.zeros((1, 1), np.float32))
        await b.stop()
        return out, refused

    out, refused = asyncio.run(main())
    np.testing.assert_array_equal(out["y"], [[6]])
    assert refused is None
    assert len(threads) == 1 and not threads[0].startswith("inference"), threads


def test_a_lone_request_does_not_run_beside_a_batch_still_running():
    threads: list[str] = []
    gate = threading.Event()

    async def main():
        b = MicroBatcher(gated_run(threads, gate), max_batch=8, max_wait_ms=0, queue_size=8)
        b.start()
        gone = asyncio.ensure_future(b.submit(np.ones((1, 1), np.float32)))
        while not threads:
            await asyncio.sleep(0.001)
        gone.cancel()  # its client gave up: it leaves admission while its batch runs on
        await asyncio.gather(gone, return_exceptions=True)
        async with b.admit():
            refused = await asyncio.to_thread(b.run_alone, np.zeros((1, 1), np.float32))
        gate.set()
        await b.stop()
        return refused

    assert asyncio.run(main()) is None
    assert threads == ["inference_0"], threads


def test_a_batch_does_not_wait_for_a_request_running_alone_as_if_it_were_decoding():
    threads: list[str] = []
    gate = threading.Event()

    async def main():
        b = MicroBatcher(gated_run(threads, gate), max_batch=8, max_wait_ms=5000, queue_size=8)
        b.start()
        started = time.perf_counter()
        async with b.admit():
            lone = asyncio.ensure_future(asyncio.to_thread(b.run_alone, np.ones((1, 1), np.float32)))
            while not threads:
                await asyncio.sleep(0.001)
            batched = asyncio.ensure_future(b.submit(np.zeros((1, 1), np.float32)))
            await asyncio.sleep(0.05)
            gate.set()
            outs = await asyncio.gather(lone, batched)
        await b.stop()
        return outs, time.perf_counter() - started

    (lone, batched), took = asyncio.run(main())
    np.testing.assert_array_equal(lone["y"], [[2]])
    np.testing.assert_array_equal(batched["y"], [[0]])
    assert len(threads) == 2 and threads[1].startswith("inference") and not threads[0].startswith("inference")
    assert took < 2.5, f"the batch waited {took:.2f} s (max_wait 5 s) for a request that was running alone"


def test_a_lone_request_runs_in_its_decoding_thread_except_on_a_local_cuda_session():
    from types import SimpleNamespace

    from service.pipeline import may_run_alone
    from service.shared_session import RemoteModel

    def local(*providers):
        return SimpleNamespace(info=SimpleNamespace(providers=list(providers)))

    assert may_run_alone(local("CPUExecutionProvider"))
    assert not may_run_alone(local("CUDAExecutionProvider", "CPUExecutionProvider"))
    remote = RemoteModel.__new__(RemoteModel)  # a shared session's worker: it only sends batches
    remote.info = local("CUDAExecutionProvider").info
    assert may_run_alone(remote)
