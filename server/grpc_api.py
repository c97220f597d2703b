"""gRPC adapter (grpc.aio): protobuf -> ScoreRequest -> service -> protobuf, errors -> status codes.

Also: API-key auth as a server interceptor (health and reflection stay open), the standard health service,
and reflection, so `grpcurl` and load balancers work without the .proto.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from rewardserve.proto import reward_pb2

from .admission import count_protobuf_field
from .errors import (Internal, InvalidInput, Overloaded, RewardServeError, TooManyItems, Unauthorized,
                     describe_validation_errors)
from .schemas import CheckOut, ModelInfo, ReloadRequest, ScoreRequest, ScoreResponse, ServerInfo, TransformOut
from .service import ScoringService

log = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
ITEMS_FIELD = reward_pb2.ScoreRequest.DESCRIPTOR.fields_by_name["items"].number
STREAM_IN_FLIGHT = 8  # a stream's requests being scored at once; the next message is read when one is answered
MAX_STATUS_CHARS = 4000  # a status message travels in a trailer that gRPC caps at 16 KiB
ADMIN_SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


# -- translation ----------------------------------------------------------------------------------------------------
def request_from_proto(message: reward_pb2.ScoreRequest) -> ScoreRequest:
    """Builds the same pydantic request HTTP builds, so the same rules (and messages) apply."""
    items = []
    for item in message.items:
        fields = {name: getattr(item, name) for name in ("prompt", "response", "text", "safety", "reference")
                  if item.HasField(name)}
        if item.messages:
            fields["messages"] = [{"role": m.role, "content": m.content} for m in item.messages]
        if item.input_ids:
            fields["input_ids"] = list(item.input_ids)
        if item.steps:
            fields["steps"] = list(item.steps)
        items.append(fields)
    target = {name: getattr(message, name) for name in ("model", "combination") if message.HasField(name)}
    if message.models:
        target["models"] = list(message.models)
    try:
        transform = message.transform if message.HasField("transform") else None
        return ScoreRequest.model_validate({"items": items, "transform": transform, **target})
    except ValidationError as error:
        raise InvalidInput(describe_validation_errors(error.errors())) from error


def transform_to_proto(described: TransformOut) -> reward_pb2.Transform:
    transform = reward_pb2.Transform(name=described.name)
    if described.statistics is not None:
        transform.statistics.CopyFrom(reward_pb2.RewardStatistics(**described.statistics.model_dump()))
    if described.beta is not None:
        transform.beta = described.beta
    if described.length_fit is not None:
        transform.length_fit.CopyFrom(reward_pb2.LengthFit(**described.length_fit.model_dump()))
    return transform


def response_to_proto(response: ScoreResponse) -> reward_pb2.ScoreResponse:
    message = reward_pb2.ScoreResponse(
        model=response.model,
        scores=response.scores,
        rewards=response.rewards,
        truncated=response.truncated,
        transform=transform_to_proto(response.transform),
        model_version=response.model_version,
        chosen=response.chosen or [],
        std=response.std or [],
        outputs=outputs_to_proto(response.outputs),
        checks=checks_to_proto(response.checks),
        step_scores=values_to_proto(response.step_scores),
    )
    message.components.extend(
        reward_pb2.ComponentScores(name=name, scores=part.scores, rewards=part.rewards, truncated=part.truncated,
                                   transform=transform_to_proto(part.transform), model_version=part.model_version,
                                   outputs=outputs_to_proto(part.outputs), checks=checks_to_proto(part.checks),
                                   step_scores=values_to_proto(part.step_scores))
        for name, part in (response.components or {}).items())
    if response.combination is not None:
        message.combination.CopyFrom(reward_pb2.Combination(
            **response.combination.model_dump(exclude_none=True)))
    return message


def outputs_to_proto(outputs: dict[str, list[float]] | None) -> dict[str, reward_pb2.Values]:
    return {name: reward_pb2.Values(values=values) for name, values in (outputs or {}).items()}


def values_to_proto(rows: list[list[float]] | None) -> list[reward_pb2.Values]:
    return [reward_pb2.Values(values=row) for row in rows or []]


def checks_to_proto(checks: list[CheckOut] | None) -> list[reward_pb2.Check]:
    return [reward_pb2.Check(**check.model_dump(exclude_none=True)) for check in checks or []]


def model_info_to_proto(info: ModelInfo) -> reward_pb2.ModelInfo:
    fields = info.model_dump(exclude={"default_transform", "statistics", "length_fit", "calibration", "steps"},
                             exclude_none=True)
    message = reward_pb2.ModelInfo(**fields, default_transform=transform_to_proto(info.default_transform))
    if info.calibration is not None:
        calibration = info.calibration
        message.calibration.CopyFrom(reward_pb2.Calibration(
            how=calibration.how, seconds=calibration.seconds,
            candidates=[reward_pb2.CalibrationCandidate(**c.model_dump(exclude_none=True))
                        for c in calibration.candidates]))
    if info.statistics is not None:
        message.statistics.CopyFrom(reward_pb2.RewardStatistics(**info.statistics.model_dump()))
    if info.length_fit is not None:
        message.length_fit.CopyFrom(reward_pb2.LengthFit(**info.length_fit.model_dump()))
    if info.steps is not None:
        message.steps.CopyFrom(reward_pb2.Steps(**info.steps.model_dump(exclude_none=True)))
    return message


def info_to_proto(info: ServerInfo) -> reward_pb2.InfoResponse:
    return reward_pb2.InfoResponse(
        json=info.model_dump_json(), default_model=model_info_to_proto(ModelInfo(**info.model_dump())),
        models=[model_info_to_proto(model) for model in info.models], default=info.default,
        combinations=[reward_pb2.Combination(**c.model_dump(exclude_none=True)) for c in info.combinations])


ERROR_TYPE_KEY = "rewardserve-error-type"  # trailing metadata: the error's `type`, as HTTP's body names it


def error_to_proto(error: RewardServeError) -> reward_pb2.Error:
    return reward_pb2.Error(code=error.grpc_code, type=error.kind, message=error.message[:MAX_STATUS_CHARS])


def _status(error: RewardServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code)


async def abort(context, error: RewardServeError) -> None:
    """Ends the call with the error's status and message, its `type` in the trailing metadata (what HTTP's body
    names), and, for an overload or rate limit, when to retry."""
    metadata = [(ERROR_TYPE_KEY, error.kind)]
    if isinstance(error, Overloaded):
        metadata.append(("retry-after", str(max(1, round(error.retry_after)))))
    context.set_trailing_metadata(tuple(metadata))
    await context.abort(_status(error), error.message[:MAX_STATUS_CHARS])


# -- the servicer ---------------------------------------------------------------------------------------------------
class RewardServicer:
    def __init__(self, service: ScoringService):
        self.service = service

    async def Score(self, request, context):
        try:
            return response_to_proto(await self._score(request, context.peer()))
        except RewardServeError as error:
            await abort(context, error)

    async def ScoreStream(self, request_iterator, context):
        """Scores requests concurrently as they arrive and answers each as soon as it is done."""
        answers: asyncio.Queue = asyncio.Queue()
        in_flight: set[asyncio.Task] = set()

        async def answer(message):
            answers.put_nowait(await self._stream_answer(message, context.peer()))

        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)  # bounded: a client that sends faster waits (flow control)

        async def answer_in_slot(message):
            try:
                await answer(message)
            finally:
                slots.release()

        async def read_requests():
            async for message in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(answer_in_slot(message))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                await asyncio.wait(set(in_flight))
            answers.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (answer_message := await answers.get()) is not None:
                yield answer_message
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()

    async def Info(self, request, context):
        try:
            return info_to_proto(self.service.info())
        except RewardServeError as error:  # not ready yet
            self.service.record_error(error, "grpc")
            await abort(context, error)

    async def _score(self, message, client: str) -> ScoreResponse:
        try:
            request = request_from_proto(message)
        except RewardServeError as error:
            self.service.record_error(error, "grpc")
            raise
        return await self.service.score(request, request_id=message.request_id or None, protocol="grpc",
                                        client=client)

    async def _stream_answer(self, message, client: str) -> reward_pb2.ScoreStreamResponse:
        if isinstance(message, RewardServeError):  # a message that did not parse, or came too fast
            if isinstance(message, (InvalidInput, TooManyItems, Overloaded)):
                self.service.record_error(message, "grpc")  # (admit() records its own)
            return reward_pb2.ScoreStreamResponse(error=error_to_proto(message))
        try:
            response = response_to_proto(await self._score(message, client))
            return reward_pb2.ScoreStreamResponse(request_id=message.request_id, response=response)
        except RewardServeError as error:
            return reward_pb2.ScoreStreamResponse(request_id=message.request_id, error=error_to_proto(error))
        except Exception:  # never let one request end everyone's stream
            log.exception("stream request %s failed", message.request_id)
            internal = Internal("unexpected error; the server logged it")
            return reward_pb2.ScoreStreamResponse(request_id=message.request_id, error=error_to_proto(internal))


def parse_request(raw: bytes, max_items: int) -> reward_pb2.ScoreRequest:
    """Bytes -> ScoreRequest here rather than in gRPC's deserializer, whose failures reach the client as UNKNOWN.
    The items are counted on the wire first, stopping past the limit: a message of a million empty items is refused
    before it becomes a million objects."""
    count = count_protobuf_field(raw, ITEMS_FIELD, max_items)
    if count > max_items:
        raise TooManyItems(f"more than {max_items} items in one request, over the limit of {max_items}"
                           " (--max-items-per-request): split the request")
    try:
        return reward_pb2.ScoreRequest.FromString(raw)
    except DecodeError as error:
        raise InvalidInput(f"the message is not a valid rewardserve.v1.ScoreRequest ({error})") from error


def _peer_address(context) -> str:
    """ipv4:127.0.0.1:54321 -> ipv4:127.0.0.1 (the client's address, whatever its port)."""
    return context.peer().rsplit(":", 1)[0]


def reward_service_handlers(servicer: RewardServicer) -> grpc.GenericRpcHandler:
    """The RewardService methods, taking raw request bytes so that a corrupt message is an INVALID_ARGUMENT."""

    async def score(raw: bytes, context):
        try:
            servicer.service.admit(_peer_address(context), "grpc")
            servicer.service.refuse_before_parsing(len(raw))
            request = parse_request(raw, servicer.service.max_items_per_request)
        except (InvalidInput, TooManyItems, Overloaded) as error:  # (admit() records its own)
            servicer.service.record_error(error, "grpc")
            await abort(context, error)
        except RewardServeError as error:
            await abort(context, error)
        try:
            return await servicer.Score(request, context)
        finally:
            servicer.service.after_request(len(raw))

    async def score_stream(raw_iterator, context):
        async def parsed():
            async for raw in raw_iterator:
                try:
                    servicer.service.admit(_peer_address(context), "grpc")  # each message counts against the rate limit
                    servicer.service.refuse_before_parsing(len(raw))
                    yield parse_request(raw, servicer.service.max_items_per_request)
                except RewardServeError as error:  # answered in the stream; the stream goes on
                    yield error
        async for answer in servicer.ScoreStream(parsed(), context):
            yield answer

    serialize = reward_pb2.ScoreResponse.SerializeToString
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(score, response_serializer=serialize),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            score_stream, response_serializer=reward_pb2.ScoreStreamResponse.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=reward_pb2.InfoRequest.FromString,
            response_serializer=reward_pb2.InfoResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def admin_service_handlers(service: ScoringService) -> grpc.GenericRpcHandler:
    """AdminService.Reload: the admin key comes in the metadata, checked by the service (not the API-key
    interceptor, which guards RewardService alone)."""
    async def reload(request: reward_pb2.ReloadRequest, context):
        metadata = dict(context.invocation_metadata() or ())
        key = metadata.get("authorization", "").removeprefix("Bearer ").strip() or None
        fields = {name: getattr(request, name) for name in ("model", "path") if request.HasField(name)}
        try:
            try:
                body = ReloadRequest(**fields)
            except ValidationError as error:
                raise InvalidInput(describe_validation_errors(error.errors())) from error
            answer = await service.reload(body, key, "grpc")
        except RewardServeError as error:
            await abort(context, error)
        return reward_pb2.ReloadResponse(**answer.model_dump())

    handlers = {"Reload": grpc.unary_unary_rpc_method_handler(
        reload, request_deserializer=reward_pb2.ReloadRequest.FromString,
        response_serializer=reward_pb2.ReloadResponse.SerializeToString)}
    return grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, handlers)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks metadata `authorization: Bearer <key>` (or `x-api-key`) on RewardService calls only."""

    def __init__(self, service: ScoringService):
        self.service = service

    async def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        token = metadata.get("authorization", "").removeprefix("Bearer ").strip() or metadata.get("x-api-key")
        try:
            self.service.check_api_key(token)
        except Unauthorized as error:
            self.service.record_error(error, "grpc")
            return _denying_handler(handler_call_details.method, error)
        return await continuation(handler_call_details)


def _denying_handler(method: str, error: Unauthorized) -> grpc.RpcMethodHandler:
    async def deny(_request, context):
        await abort(context, error)

    if method.endswith("/ScoreStream"):
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


async def create_grpc_server(service: ScoringService, address: str, max_message_bytes: int,
                             tls: tuple[bytes, bytes] | None = None):
    """Builds the server with health and reflection, over TLS when given (key, chain) in PEM; returns
    (server, bound port, health servicer)."""
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(service)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    server.add_generic_rpc_handlers((reward_service_handlers(RewardServicer(service)), admin_service_handlers(service)))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server
    )
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        key, chain = tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    return server, port, health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)

