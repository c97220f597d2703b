"""One-method transports to the reward server: `send(request: dict) -> dict`, one attempt, no retries.

Chosen by URL scheme: http:// and https:// speak JSON to POST /score; grpc:// and grpcs:// call
RewardService.Score. Each raises `RequestRejected` when the server refused the request (never worth retrying) and
`RetryableError` when another attempt may succeed (connection refused, timeout, 5xx, 503 with Retry-After).
"""
from __future__ import annotations

import ssl
from urllib.parse import urlparse

import grpc
import httpx

from rewardserve.proto import reward_pb2, reward_pb2_grpc


class RewardClientError(Exception):
    """Base of the client's errors.

    RewardClientError
    ├── RequestRejected   the server answered 4xx / a non-retryable gRPC status: fix the request
    ├── UntrustedServer   the server's TLS certificate is not trusted: fix the client's CA, at once (no retries)
    └── RewardUnavailable no answer after every retry (raised by the client, not by transports)
    """


class RequestRejected(RewardClientError):
    def __init__(self, status: str, kind: str, message: str):
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


class RewardUnavailable(RewardClientError):
    pass


class UntrustedServer(RewardClientError):
    """A configuration error, not an outage: retrying cannot make an untrusted certificate trusted."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: the server's TLS certificate is not trusted ({reason}); give the client the CA"
                         " that signed it (--reward-ca-file / ca_file=, or the system's trust store), or a certificate"
                         " whose names include this host")


class RetryableError(Exception):
    """Another attempt may succeed. `unreachable`: nothing answered at all (refused, reset, timed out), so the URL
    leaves the rotation until its health check passes; a server that answered (5xx, 503, 429) stays in it."""

    def __init__(self, message: str, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


# -- HTTP ------------------------------------------------------------------------------------------------------------
def _http_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _http_result(response: httpx.Response) -> dict:
    if response.status_code == 200:
        return response.json()
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    message = error.get("message") or response.text[:500]
    if response.status_code >= 500 or response.status_code == 429:
        retry_after = response.headers.get("Retry-After")
        raise RetryableError(f"HTTP {response.status_code}: {message}", float(retry_after) if retry_after else None)
    raise RequestRejected(f"HTTP {response.status_code}", error.get("type", "error"), message)


def _tls_context(ca_file: str | None):
    """Trust the system's CAs, or only `ca_file` (a private CA or a self-signed server certificate)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def _certificate_failure(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure somewhere in an httpx error's chain of causes, if that is what it is."""
    while error is not None:
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _http_unreachable(url: str, error: httpx.TransportError) -> Exception:
    if (untrusted := _certificate_failure(error)) is not None:
        return UntrustedServer(url, untrusted.verify_message or str(untrusted))
    return RetryableError(f"{url}: {type(error).__name__}: {error}", unreachable=True)


def http_ready(url: str, ca_file: str | None = None, timeout: float = 2.0) -> bool:
    """The health probe: GET /ready answers 200 (loaded, warm, not draining)."""
    try:
        return httpx.get(f"{url}/ready", timeout=timeout, verify=_tls_context(ca_file)).status_code == 200
    except httpx.HTTPError:
        return False


class HttpTransport:
    def __init__(self, url: str, timeout: float, api_key: str | None = None, ca_file: str | None = None):
        self.url = url
        self._client = httpx.Client(base_url=url, timeout=timeout, headers=_http_headers(api_key),
                                    verify=_tls_context(ca_file))

    def send(self, request: dict) -> dict:
        try:
            return _http_result(self._client.post("/score", json=request))
        except httpx.TransportError as error:  # refused, reset, timed out, or a certificate not trusted
            raise _http_unreachable(self.url, error) from error

    def close(self) -> None:
        self._client.close()


class AsyncHttpTransport:
    def __init__(self, url: str, timeout: float, api_key: str | None = None, ca_file: str | None = None):
        self.url = url
        self._client = httpx.AsyncClient(base_url=url, timeout=timeout, headers=_http_headers(api_key),
                                         verify=_tls_context(ca_file))

    async def send(self, request: dict) -> dict:
        try:
            return _http_result(await self._client.post("/score", json=request))
        except httpx.TransportError as error:
            raise _http_unreachable(self.url, error) from error

    async def close(self) -> None:
        await self._client.aclose()


# -- gRPC ------------------------------------------------------------------------------------------------------------
_RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
}
# Spread calls over every address a DNS name resolves to (e.g. `docker compose --scale reward-server=N`).
_CHANNEL_OPTIONS = [("grpc.lb_policy_name", "round_robin"), ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]


def request_to_proto(request: dict) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(**item) for item in request["items"]], transform=request.get("transform"),
        model=request.get("model"), models=request.get("models") or [], combination=request.get("combination"),
    )


def _transform_from_proto(transform: reward_pb2.Transform) -> dict:
    fit = transform.length_fit
    return {
        "name": transform.name,
        "statistics": {"mean": transform.statistics.mean, "std": transform.statistics.std,
                       "source": transform.statistics.source} if transform.HasField("statistics") else None,
        "beta": transform.beta if transform.HasField("beta") else None,
        "length_fit": {"slope": fit.slope, "mean_length": fit.mean_length, "responses": fit.responses}
        if transform.HasField("length_fit") else None,
    }


def response_from_proto(message: reward_pb2.ScoreResponse) -> dict:
    """The same dict HTTP's JSON gives."""
    combination = None
    if message.HasField("combination"):
        c = message.combination
        combination = {"name": c.name, "kind": c.kind, "models": list(c.models),
                       "weights": list(c.weights) if c.kind == "sum" else None,
                       "threshold": c.threshold if c.HasField("threshold") else None,
                       "conservative_lambda": c.conservative_lambda if c.HasField("conservative_lambda") else None,
                       "otherwise": c.otherwise if c.HasField("otherwise") else None}
    components = {part.name: {"scores": list(part.scores), "rewards": list(part.rewards),
                              "truncated": list(part.truncated), "transform": _transform_from_proto(part.transform),
                              "model_version": part.model_version, "outputs": _outputs_from_proto(part.outputs),
                              "checks": _checks_from_proto(part.checks),
                              "step_scores": _rows_from_proto(part.step_scores)}
                  for part in message.components}
    return {
        "model": message.model,
        "scores": list(message.scores),
        "rewards": list(message.rewards),
        "truncated": list(message.truncated),
        "transform": _transform_from_proto(message.transform),
        "model_version": message.model_version,
        "components": components or None,
        "combination": combination,
        "chosen": list(message.chosen) or None,
        "std": list(message.std) or None,
        "outputs": _outputs_from_proto(message.outputs),
        "checks": _checks_from_proto(message.checks),
        "step_scores": _rows_from_proto(message.step_scores),
    }


def _outputs_from_proto(outputs) -> dict[str, list[float]] | None:
    return {name: list(values.values) for name, values in outputs.items()} or None


def _rows_from_proto(rows) -> list[list[float]] | None:
    return [list(row.values) for row in rows] or None


def _checks_from_proto(checks) -> list[dict] | None:
    return [{"verdict": c.verdict, "answer": c.answer if c.HasField("answer") else None} for c in checks] or None


def _grpc_failure(error: grpc.RpcError, target: str) -> Exception:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in details:
        return UntrustedServer(target, "CERTIFICATE_VERIFY_FAILED")
    retry_after = dict(error.trailing_metadata() or ()).get("retry-after")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not retry_after:
        return RetryableError(f"{target}: {code.name}: {details}", unreachable=True)
    # RESOURCE_EXHAUSTED with a retry-after is a rate limit (wait and retry); without one, an oversized message.
    if code in _RETRYABLE_CODES or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after):
        return RetryableError(f"{target}: {code.name}: {error.details()}", float(retry_after) if retry_after else None)
    kind = dict(error.trailing_metadata() or ()).get("rewardserve-error-type") or code.name.lower()
    return RequestRejected(code.name, kind, details)


def _grpc_target(url: str) -> tuple[str, bool]:
    """grpc://host:port -> host:port; grpc://dns:///name:port keeps gRPC's resolver syntax (every address of name)."""
    scheme, _, target = url.partition("://")
    return target, scheme == "grpcs"


def grpc_ready(url: str, ca_file: str | None = None, timeout: float = 2.0) -> bool:
    """The health probe: the standard gRPC health service answers SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target, secure = _grpc_target(url)
    channel = grpc.secure_channel(target, _grpc_credentials(ca_file)) if secure else grpc.insecure_channel(target)
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _grpc_credentials(ca_file: str | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=open(ca_file, "rb").read() if ca_file else None)


class GrpcTransport:
    def __init__(self, url: str, timeout: float, api_key: str | None = None, ca_file: str | None = None):
        self.url = url
        self.target, secure = _grpc_target(url)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = (grpc.secure_channel(self.target, _grpc_credentials(ca_file), _CHANNEL_OPTIONS) if secure
                         else grpc.insecure_channel(self.target, _CHANNEL_OPTIONS))
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    def send(self, request: dict) -> dict:
        try:
            reply = self._stub.Score(request_to_proto(request), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _grpc_failure(error, self.target) from error
        return response_from_proto(reply)

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    def __init__(self, url: str, timeout: float, api_key: str | None = None, ca_file: str | None = None):
        self.url = url
        self.target, secure = _grpc_target(url)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = (grpc.aio.secure_channel(self.target, _grpc_credentials(ca_file), _CHANNEL_OPTIONS)
                         if secure else grpc.aio.insecure_channel(self.target, _CHANNEL_OPTIONS))
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def send(self, request: dict) -> dict:
        try:
            reply = await self._stub.Score(request_to_proto(request), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _grpc_failure(error, self.target) from error
        return response_from_proto(reply)

    async def close(self) -> None:
        await self._channel.close()


_SYNC = {"http": HttpTransport, "https": HttpTransport, "grpc": GrpcTransport, "grpcs": GrpcTransport}
_ASYNC = {"http": AsyncHttpTransport, "https": AsyncHttpTransport, "grpc": AsyncGrpcTransport,
          "grpcs": AsyncGrpcTransport}


def _pick(table: dict, url: str):
    scheme = urlparse(url).scheme
    if scheme not in table:
        raise ValueError(f"{url!r}: the reward URL must start with http://, https://, grpc:// or grpcs://")
    return table[scheme]


def probe_for(url: str):
    """The health probe of a reward URL's protocol: `probe(url, ca_file) -> bool`."""
    return grpc_ready if urlparse(url).scheme.startswith("grpc") else http_ready


def make_transport(url: str, timeout: float, api_key: str | None = None, ca_file: str | None = None):
    return _pick(_SYNC, url)(url, timeout, api_key, ca_file)


def make_async_transport(url: str, timeout: float, api_key: str | None = None, ca_file: str | None = None):
    return _pick(_ASYNC, url)(url, timeout, api_key, ca_file)
