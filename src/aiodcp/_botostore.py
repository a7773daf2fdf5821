"""The botocore side of the store: imported only when a store needs an aiobotocore client.

Why a module of its own: importing botocore, aiobotocore and aiohttp costs a process ~0.25 s,
and their ~45,000 objects trigger a full garbage collection beside torch's. The plain case
(``_native``) never needs them, so ``_store`` imports this module only when a store first needs
its client (a configuration that is not plain, ``fast_http=False``, a fallback, a region
refusal), in a worker thread (``S3Store.botocore_client``), and never at its own import.

Data flow: ``create_client(config, stack)`` -> an aiobotocore S3 client (retries off: ``_store``
retries; S3's models parsed once per process, ``_load_loader``; SSL contexts shared,
``_SharedSSLSession``) -> ``fast_http_settings(client, config)`` -> the proxy configuration
and ``verify`` of the client's HTTP session when the fast path may be used with it, and
``presign_as_requests(client)`` makes its presigned URLs sign as its requests do.
``RangeStream`` wraps the body of a botocore ranged GET. ``translate(exc, ...)`` gives the
aiodcp error of a botocore or aiohttp exception (``_store.translate_error`` asks it only when
this module was imported).

Invariant: nothing here runs at the import of ``_store``; whatever this module does at import
(parsing S3's models) runs in the thread that first needs a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import threading
from typing import Any

import aiohttp
import botocore.exceptions
import botocore.loaders
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import AioSession
from botocore import UNSIGNED
from botocore.httpsession import get_cert_path

from ._config import ReaderConfig
from ._errors import AiodcpError, NoCredentialsError
from ._store import _shared_ssl_context, classify

__all__ = [
    "RangeStream",
    "create_client",
    "current_access_key",
    "error_facts",
    "fast_http_settings",
    "is_checksum_error",
    "is_no_credentials",
    "is_ssl_error",
    "is_transient",
    "presign_as_requests",
    "seconds_left",
    "signer_credentials",
    "translate",
]

# Errors a new request can fix: the connection broke, the body stalled, the stream was cut short.
# (botocore's ConnectionError covers EndpointConnectionError, ConnectTimeoutError,
# ReadTimeoutError, ConnectionClosedError and ProxyConnectionError; SSLError is excluded.)
TRANSIENT = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)


def is_checksum_error(exc: BaseException) -> bool:
    """Whether botocore found a response body that differs from the checksum the store sent
    with it (``ChecksumMode="ENABLED"``)."""
    return isinstance(exc, botocore.exceptions.FlexibleChecksumError)


def translate(exc: BaseException, where: str, ctx: dict[str, Any]) -> AiodcpError | None:
    """The aiodcp error for a botocore exception that says what went wrong (missing
    credentials, an error response); None for others (``_store.translate_error`` sorts them)."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return NoCredentialsError(
            f"no AWS credentials found to read {where}: set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, a profile, or pass unsigned=True for a public bucket",
            retryable=False,
            **ctx,
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.get("Message", "") or exc)
        return classify(status, str(error.get("Code", "")), message, where, ctx)
    return None


def error_facts(exc: BaseException) -> tuple[int, str, str] | None:
    """(HTTP status, S3 code, message) of a botocore error response; None for other errors."""
    if not isinstance(exc, botocore.exceptions.ClientError):
        return None
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status, str(error.get("Code", "")), str(error.get("Message", "") or exc)


def is_transient(exc: BaseException) -> bool:
    """A botocore/aiohttp failure a new request can fix (never an SSL error)."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, botocore.exceptions.SSLError)


def is_ssl_error(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.SSLError)


def is_no_credentials(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.NoCredentialsError)


class RangeStream:
    """The body of one ranged GET, chunk by chunk as received (no joins, no copies)."""

    __slots__ = ("_body", "_content", "bucket", "end", "etag", "key", "start")

    def __init__(
        self, body: Any, *, bucket: str, key: str, start: int, end: int, etag: str | None
    ) -> None:
        self._body = body
        self._content: aiohttp.StreamReader = body.raw_stream.content
        self.bucket = bucket
        self.key = key
        self.start = start
        self.end = end
        self.etag = etag

    async def read_chunk(self) -> bytes:
        """The next chunk of the body; ``b""`` at its end. Raises translated errors."""
        try:
            data, _ = await self._content.readchunk()
        except Exception as exc:
            raise _translate_error(exc, self.bucket, self.key, (self.start, self.end)) from exc
        return data

    def close(self) -> None:
        """Release the connection (drops it if the body was not read to its end)."""
        self._body.close()


def _translate_error(exc: BaseException, bucket: str, key: str, byte_range: Any) -> AiodcpError:
    from ._store import translate_error

    return translate_error(exc, bucket, key, byte_range)


async def create_client(config: ReaderConfig, stack: contextlib.AsyncExitStack) -> Any:
    """An aiobotocore S3 client for ``config``, entered on ``stack`` (which closes it)."""
    cfg = config
    options: dict[str, Any] = {
        "connect_timeout": cfg.connect_timeout_s,
        "read_timeout": cfg.read_timeout_s,
        "max_pool_connections": cfg.max_concurrency,
        # One attempt per call: retries (and resumes) are ours, see _store's docstring.
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        # botocore asks for (and checks) a response's checksum only where aiodcp asks
        # (ChecksumMode: the .metadata GET of a load that verifies), not on every GET it can:
        # verify_checksums=False then turns every check off on this path too.
        "response_checksum_validation": "when_required",
        "s3": {"addressing_style": cfg.addressing_style},
    }
    if cfg.unsigned:
        options["signature_version"] = UNSIGNED
    if _SharedSSLSession is not None:
        options["http_session_cls"] = _SharedSSLSession  # unless ``extra`` names another
    options.update(cfg.extra)
    session = AioSession(profile=cfg.profile)
    # botocore parses S3's service model (~0.1-0.3 s of JSON) for every new session; share
    # one parsed copy per process. (Parsing it in a thread was worse for the loop: json's C
    # parser holds the GIL throughout, and the two threads then convoy on the GIL.)
    session.register_component("data_loader", _load_loader())
    try:
        return await stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=cfg.region,
                endpoint_url=cfg.endpoint_url,
                verify=cfg.verify,
                config=AioConfig(**options),
            )
        )
    except botocore.exceptions.ProfileNotFound as exc:
        raise NoCredentialsError(
            f"botocore profile {cfg.profile!r} does not exist; check ~/.aws/config",
            bucket="",
            key="",
            retryable=False,
        ) from exc


def fast_http_settings(client: Any, config: ReaderConfig) -> tuple[Any, bool | str] | None:
    """(proxy configuration, verify) of the client's HTTP session when data GETs may take the
    fast path with this client; None when its set-up needs botocore's HTTP stack (a client
    certificate, settings we cannot see, ``fast_http=False``). Proxies are checked per URL."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    proxy_config = getattr(session, "_proxy_config", None)
    if (
        session is None
        or proxy_config is None
        or not hasattr(proxy_config, "proxy_url_for")
        or getattr(session, "_cert_file", None)
        or not config.fast_http
    ):
        return None
    verify: bool | str = getattr(session, "_verify", config.verify)
    return proxy_config, verify


def presign_as_requests(client: Any) -> None:
    """Make ``generate_presigned_url`` sign as the client signs its own requests.

    botocore presigns S3 URLs with Signature Version 2 in the regions that once accepted it
    (``us-east-1``, ``us-west-2``...), points them at the global endpoint ``s3.amazonaws.com``,
    and signs them for the client's region even after its region redirector learnt that the
    bucket lives elsewhere. S3 refuses SigV2 for every bucket created since 2020. These two
    handlers keep the client's own signature version (SigV4, or S3 Express session auth), its
    endpoint, and the bucket's region as botocore resolved it for the request.
    """
    events = client.meta.events
    region = client.meta.region_name

    def keep_signature_version(signature_version: Any, **kwargs: Any) -> Any:
        # The presign of a SigV4 client arrives as "v4-query" (generic SigV4, which would sign
        # an empty payload hash: S3 refuses that) or "s3v4-query": S3's query form signs
        # UNSIGNED-PAYLOAD. S3 Express ("v4-s3express-query") is botocore's as it is.
        if signature_version in ("v4-query", "s3v4-query"):
            return "s3v4-query"
        if isinstance(signature_version, str) and signature_version.startswith("v4-s3express"):
            return signature_version
        return None

    def client_endpoint(context: Any = None, **kwargs: Any) -> None:
        # read when the endpoint is resolved, so set before: at parameter build
        if isinstance(context, dict) and context.get("is_presign_request"):
            context["use_global_endpoint"] = False

    def resolved_region(builtins: Any = None, context: Any = None, **kwargs: Any) -> None:
        # the region redirector has put the bucket's known region into the builtins by now
        if not isinstance(context, dict) or not context.get("is_presign_request"):
            return
        resolved = builtins.get("AWS::Region") if isinstance(builtins, dict) else None
        if resolved and resolved != region and resolved != "aws-global":
            context.setdefault("signing", {})["region"] = resolved

    events.register_first("choose-signer.s3", keep_signature_version)
    events.register_last("before-parameter-build.s3", client_endpoint)
    events.register_last("before-endpoint-resolution.s3", resolved_region)


def signer_credentials(client: Any) -> Any:
    """The credentials object the client signs with (refreshable or not), or None."""
    return getattr(getattr(client, "_request_signer", None), "_credentials", None)


async def current_access_key(credentials: Any) -> str | None:
    if credentials is None:
        return None
    frozen = credentials.get_frozen_credentials()
    if asyncio.iscoroutine(frozen):
        frozen = await frozen
    return getattr(frozen, "access_key", None)


def seconds_left(credentials: Any) -> float | None:
    """Seconds until temporary credentials expire (None: they do not, or we cannot tell)."""
    expiry = getattr(credentials, "_expiry_time", None)
    if not isinstance(expiry, datetime.datetime):
        return None
    now = datetime.datetime.now(expiry.tzinfo or datetime.UTC)
    return (expiry - now).total_seconds()


_LOADER_LOCK = threading.Lock()
_LOADER: tuple[int, Any] | None = None  # (pid, botocore Loader with S3's data parsed)
_S3_MODELS = ("service-2", "endpoint-rule-set-1")
_DATA = ("endpoints", "partitions", "_retry", "sdk-default-configuration")


class _PlainJSONFileLoader(botocore.loaders.JSONFileLoader):  # type: ignore[misc]
    """botocore's JSON file loader, parsing into plain dicts instead of ``OrderedDict``s.

    Dicts keep insertion order, which is all botocore relies on. A plain dict whose values are
    all strings or numbers is not tracked by the garbage collector, an ``OrderedDict`` always
    is: what an S3 client needs parses in ~36 ms of CPU instead of ~46 ms and leaves 21,000
    tracked objects instead of 32,000. (Beside torch's ~250,000, every ~50,000 new ones cost
    a full collection of 0.12-0.2 s; the S3 stack still makes ~45,000.)
    """

    def _load_file(self, full_path: str, open_method: Any) -> Any:
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as fp:
            payload = fp.read().decode("utf-8")
        return json.loads(payload)


def _load_loader() -> Any:
    """A botocore Loader with everything an S3 client needs already parsed (blocking)."""
    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is not None and _LOADER[0] == os.getpid():
            return _LOADER[1]
        loader = botocore.loaders.Loader(file_loader=_PlainJSONFileLoader())
        for name in _S3_MODELS:
            with contextlib.suppress(botocore.exceptions.DataNotFoundError):
                loader.load_service_model("s3", name)
        for name in _DATA:
            with contextlib.suppress(botocore.exceptions.DataNotFoundError):
                loader.load_data(name)
        _LOADER = (os.getpid(), loader)
        return loader


# Parsed when this module is imported (in the worker thread ``S3Store.botocore_client``
# imports it in), not when a store creates its client on its event loop: json's C parser holds
# the GIL throughout, and on the I/O thread it would stall every other thread mid-load,
# including the loop of an ``await load_checkpoint`` caller (a 1 ms heartbeat measured a
# 244 ms gap on CI when the parse ran there).
_load_loader()


def _shared_ssl_session_class() -> Any:
    """aiobotocore's aiohttp session, with the SSL contexts of its connection pool built once
    per process (``_shared_ssl_context``) instead of at each client's first request (aiobotocore
    builds them even for ``http://`` endpoints); a proxy still gets contexts of its own. None
    when this aiobotocore builds them elsewhere (older versions: in the session's constructor).
    """
    build = getattr(AIOHTTPSession, "_build_ssl_contexts", None)
    if build is None:
        return None

    class SharedSSLSession(AIOHTTPSession):  # type: ignore[misc]
        def _build_ssl_contexts(self, proxy_url: Any, *args: Any, **kwargs: Any) -> Any:
            if proxy_url is not None or args or kwargs:
                return super()._build_ssl_contexts(proxy_url, *args, **kwargs)
            key = ("aiobotocore", self._verify, self._cert_file, self._key_file)
            files = (
                get_cert_path(self._verify) if self._verify else None,
                self._cert_file,
                self._key_file,
            )
            return _shared_ssl_context(
                key, lambda: super(SharedSSLSession, self)._build_ssl_contexts(None), *files
            )

    return SharedSSLSession


_SharedSSLSession = _shared_ssl_session_class()
