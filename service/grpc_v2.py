"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, as Triton and KServe serve it).

It runs on the HTTP app's event loop and shares its runtime: the same model, micro-batcher,
decoding and limits. The service definition is tritonclient's generated `service_pb2`.
Errors map to gRPC status codes as Triton maps them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.auth import bearer_token, key_matches
from service.config import Settings
from service.errors import (
    BodyTooLarge,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelTimeout,
    ModelUnavailable,
    NotFound,
    Overloaded,
    ServiceError,
    Unauthorized,
    UnsupportedMedia,
)
from service.limits import BodyBudget
from service.metrics import Metrics
from service.pipeline import Runtime
from service.protocol import INLINE_BYTES, check_model, input_limits, model_metadata, server_metadata, to_model_input
from service.request_id import kept_or_new
from service.tensors import DTYPES, Tensor, check_spec, element_limit, from_raw, select_outputs, shaped

log = logging.getLogger("service.grpc")

STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMedia: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    BodyTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ImageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
}

# InferTensorContents' field for each datatype (the protocol packs the small integers into 32 bits)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def read_inputs(request: pb.ModelInferRequest, max_elements: int, max_strings: int) -> list[Tensor]:
    """The request's input tensors, from raw_input_contents or typed contents (CPU work: off the loop);
    none may hold more than `max_elements` elements, nor a BYTES one more than `max_strings`."""
    if not request.inputs:
        raise InvalidRequest("inference request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one each, or none")
    tensors = []
    for i, spec in enumerate(request.inputs):
        name, datatype, shape = spec.name, spec.datatype, list(spec.shape)
        check_spec(name, datatype, shape, element_limit(datatype, max_elements, max_strings))
        if raw:
            data = from_raw(name, datatype, shape, raw[i])
        elif datatype == "FP16":
            raise InvalidRequest(f"input {name[:64]!r}: FP16 has no typed contents; send it in raw_input_contents")
        else:
            values = getattr(spec.contents, CONTENTS[datatype])
            if datatype == "BYTES":
                data = np.empty(len(values), dtype=object)
                data[:] = list(values)
            else:
                try:
                    data = np.asarray(values, dtype=DTYPES[datatype])
                except OverflowError as e:
                    raise InvalidRequest(f"input {name[:64]!r}: contents are not {datatype}: {e}") from None
        tensors.append(Tensor(name, datatype, shape, shaped(name, shape, data)))
    return tensors


def infer_response(
    rt: Runtime, request: pb.ModelInferRequest, names: list[str], outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name=rt.info.name, model_version=rt.info.version, id=request.id[:256])
    for name in names:
        array = np.ascontiguousarray(outputs[name], dtype=np.float32)
        reply.outputs.add(name=name, datatype="FP32", shape=array.shape)
        reply.raw_output_contents.append(array.tobytes())
    return reply


def fail(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, error: BaseException) -> None:
    """Ends the call with `code` (its method's return value is then discarded), and drops `error`'s frames.

    Those frames hold the request, and some hold the error in turn (anyio's worker-thread call keeps the
    future it failed). Such cycles wait for a full garbage collection, which is rare (service/memory.py),
    and so did `context.abort()`'s AbortError, raised while the error was handled: a worker refusing
    15 MiB messages one after another grew by 30 MB a call."""
    context.set_code(code)
    context.set_details(message)
    chained, seen = [error], set()
    while chained:
        e = chained.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            chained += (e.__cause__, e.__context__)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 calls this service supports; the rest (repository, shared memory, tracing) answer UNIMPLEMENTED."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: Metrics, budget: BodyBudget) -> None:
        self.rt = runtime
        self.settings = settings
        self.api_keys = settings.api_keys()
        self.metrics = metrics
        self.budget = budget  # the HTTP app's: bodies and messages, one count per worker
        self.serving = True

    @asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext, guarded: bool = True) -> AsyncIterator[None]:
        """Gives the call its request id, checks the key, and turns the service's errors into gRPC status
        codes (the one place that does)."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("x-request-id")
        rid = kept_or_new(given.encode("latin-1", "replace") if isinstance(given, str) else None).decode()
        trailer = (("x-request-id", rid),)
        context.set_trailing_metadata(trailer)
        try:
            if guarded:
                self._authorize(metadata)
            yield
        except ServiceError as e:
            code = STATUS.get(type(e), grpc.StatusCode.INTERNAL)
            fail(context, code, e.message, e)
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            code = grpc.StatusCode.INTERNAL
            log.error("unhandled error in gRPC %s, request id %s", method, rid, exc_info=e)
            message = f"internal server error (logged under request id {rid}); please report it with that id"
            fail(context, code, message, e)
        finally:
            self.metrics.grpc_requests.labels(method, code.name).inc()
            self.metrics.grpc_latency.labels(method).observe(time.perf_counter() - started)

    def _authorize(self, metadata: dict[str, str | bytes]) -> None:
        keys = self.api_keys
        if not keys:
            return
        header = metadata.get("authorization", "")
        token = bearer_token(header if isinstance(header, str) else "")
        if token is None or not key_matches(token, keys):
            raise Unauthorized("missing or wrong API key: send the metadata 'authorization: Bearer <key>'")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        async with self._call("ServerLive", context, guarded=False):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        async with self._call("ServerReady", context, guarded=False):
            return pb.ServerReadyResponse(ready=self.serving and self.rt.unready() is None)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        async with self._call("ModelReady", context):
            check_model(self.rt, request.name, request.version or None)
            return pb.ModelReadyResponse(ready=self.serving and self.rt.unready() is None)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        async with self._call("ServerMetadata", context):
            return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        async with self._call("ModelMetadata", context):
            check_model(self.rt, request.name, request.version or None)
            m = model_metadata(self.rt)
            tensors = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=m["name"],
                versions=m["versions"],
                platform=m["platform"],
                inputs=[tensors(**t) for t in m["inputs"]],
                outputs=[tensors(**t) for t in m["outputs"]],
            )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        async with self._call("ModelInfer", context):
            rt = self.rt
            check_model(rt, request.model_name, request.model_version or None)
            names = select_outputs([o.name for o in request.outputs], rt.model.output_names)
            limits = input_limits(rt)
            size = request.ByteSize()
            small = size <= INLINE_BYTES
            # grpc has read the message by now, and holds it, as HTTP does a body: in the same count, until answered
            self.budget.take(size)
            try:
                async with rt.batcher.admit():
                    if small:
                        tensors = read_inputs(request, *limits)
                    else:
                        tensors = await run_in_threadpool(read_inputs, request, *limits)
                    x = await to_model_input(rt, tensors)
                    outputs = await rt.batcher.submit_admitted(x)
            finally:
                self.budget.give(size)
            if small:
                return infer_response(rt, request, names, outputs)
            return await run_in_threadpool(infer_response, rt, request, names, outputs)


IDLE_CLOSE_MS = 300_000


def with_message_deadline(handler: grpc.RpcMethodHandler, seconds: float) -> grpc.RpcMethodHandler:
    """A unary method served so that its request message must arrive within `seconds` of the call starting.

    grpc counts a call against `maximum_concurrent_rpcs` from its first frame, and reads a unary call's
    message before the method runs, with no bound on how long that takes: calls that never sent theirs held
    every slot, health checks included. Served as stream-unary, which is the same on the wire (one message,
    then the client's half-close), the method runs at once and waits for that message with a deadline."""
    if handler.request_streaming or handler.response_streaming:
        return handler
    method = handler.unary_unary

    async def with_deadline(_: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(seconds):
                request = await context.read()
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the request message did not arrive within {seconds:g} s"
            )
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
        return await method(request, context)

    return grpc.stream_unary_rpc_method_handler(
        with_deadline,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _Handlers:
    """Takes the method handlers that generated code registers on a server."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


class GrpcServer:
    """A grpc.aio server on the running event loop; `start()` in the app's lifespan, `stop()` at its end."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: Metrics, budget: BodyBudget) -> None:
        host = settings.GRPC_HOST or "127.0.0.1"
        self.address = f"[{host}]:{settings.GRPC_PORT}" if ":" in host else f"{host}:{settings.GRPC_PORT}"
        self.grace = settings.SHUTDOWN_TIMEOUT_S
        self.servicer = Servicer(runtime, settings, metrics, budget)
        options = [
            # a message past the body limit is refused with RESOURCE_EXHAUSTED before it is read whole
            ("grpc.max_receive_message_length", settings.MAX_BODY_BYTES),
            ("grpc.max_send_message_length", -1),
            # as the HTTP port's request heads (service/connection.py): a connection that never sends gRPC's
            # preface closes, and one without a call for IDLE_CLOSE_MS is told to go (clients reconnect)
            ("grpc.server_handshake_timeout_ms", round(settings.HEADER_TIMEOUT_S * 1000)),
            ("grpc.max_connection_idle_ms", IDLE_CLOSE_MS),
            # the workers of `python -m service` (which sets WORKERS) share the port, as they share the HTTP one
            ("grpc.so_reuseport", int(settings.WORKERS > 1)),
        ]
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.MAX_CONNECTIONS)
        generated = _Handlers()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, generated)
        handlers = {k: with_message_deadline(h, settings.BODY_READ_TIMEOUT_S) for k, h in generated.handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(generated.service, handlers),))
        self.server.add_registered_method_handlers(generated.service, handlers)

    async def start(self) -> None:
        try:
            self.server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise OSError(f"cannot listen for gRPC on {self.address} (WARN_GRPC_PORT; 0 turns it off): {e}") from e
        await self.server.start()
        log.info("Open Inference Protocol over gRPC on %s", self.address)

    async def stop(self) -> None:
        self.servicer.serving = False
        await self.server.stop(self.grace)
