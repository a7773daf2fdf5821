"""Credentials found and refreshed as botocore 1.43 finds and refreshes them, without botocore.

Why: importing botocore to find credentials costs a process's first load ~0.3-0.6 s (the S3
stack and the full garbage collection its objects trigger). The plain case (``_native``) asks
this module where the credentials come from; the store (``_store``) fetches and refreshes them.

Data flow::

    resolve_chain(env, files, profile, ...)       botocore's provider order, for one profile
        -> Credentials                            static: environment, credentials/config file
        -> a Source (not fetched yet)             AssumeRoleSource   STS AssumeRole (a profile's
                                                                     role_arn)
                                                  WebIdentitySource  STS AssumeRoleWithWebIdentity
                                                  ProcessSource      credential_process
                                                  ContainerSource    ECS / EKS Pod Identity
                                                  ImdsSource         EC2 instance role (IMDSv2)
        -> a reason (str)                         what only botocore resolves: the store uses it
    await source.fetch(context) -> Credentials (with their expiry), or FetchError
    Refresher(source, credentials).get()          the current credentials, refreshed in the
                                                  background from 15 min before they expire and
                                                  awaited from 10 min before (botocore's windows)
    Refresher.refused(access_key)                 after the store refused them (ExpiredToken):
                                                  fetched again, once per refused key

The order (``botocore.credentials.create_credential_resolver``): environment (skipped when a
profile is passed explicitly), assume-role from the profile, web identity, SSO, the shared
credentials file, ``aws login``, ``credential_process``, the config file, the boto2 files,
container credentials, instance metadata. A provider that applies ends the walk, as in
botocore; one that botocore would refuse or that is not reproduced here (SSO, login, an MFA
prompt, boto2 files with keys, expiring environment credentials, a profile setting not in
``PROFILE_KEYS``) makes the store not plain, so botocore resolves it (correct first, fast
second).

HTTP (``request``): one request per connection (``Connection: close``) over asyncio streams,
each step under a timeout; proxies never (the plain case excludes them). Timeouts and attempts
are botocore's: instance metadata 1 s and 1 attempt (``AWS_METADATA_SERVICE_TIMEOUT`` /
``_NUM_ATTEMPTS``), container credentials 2 s and 3 attempts, STS the store's connect and read
timeouts with 3 attempts on errors a new request can fix. A ``credential_process`` gets
``PROCESS_TIMEOUT_S`` (botocore waits for it without a limit).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlencode, urlsplit

from ._awsconfig import AwsFiles, Section, raw_parse
from ._sigv4 import Credentials, Presigner, signed_host

__all__ = [
    "AWS_REGION_RE",
    "AssumeRoleSource",
    "ContainerSource",
    "FetchContext",
    "FetchError",
    "ImdsSource",
    "ProcessSource",
    "Refresher",
    "Source",
    "WebIdentitySource",
    "parse_expiry",
    "request",
    "resolve_chain",
]

logger = logging.getLogger(__name__)

ADVISORY_REFRESH_S = 15 * 60.0
"""Seconds before expiry from which credentials are refreshed in the background (botocore's
``_DEFAULT_ADVISORY_REFRESH_TIMEOUT``)."""
MANDATORY_REFRESH_S = 10 * 60.0
"""Seconds before expiry from which requests wait for refreshed credentials (botocore's
``_DEFAULT_MANDATORY_REFRESH_TIMEOUT``)."""
PROCESS_TIMEOUT_S = 300.0
"""Seconds a ``credential_process`` may run before it is killed (botocore has no limit)."""
_MAX_BODY_BYTES = 1024 * 1024
_STS_ATTEMPTS = 3
_STS_RETRY_CODES = frozenset(
    {"IDPCommunicationError", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
)
_CONTAINER_HOST = "169.254.170.2"
_CONTAINER_ALLOWED_HOSTS = frozenset(
    {_CONTAINER_HOST, "169.254.170.23", "fd00:ec2::23", "localhost"}
)
_CONTAINER_TIMEOUT_S = 2.0
_CONTAINER_ATTEMPTS = 3
_CONTAINER_SLEEP_S = 1.0
_IMDS_URL = "http://169.254.169.254/"
_IMDS_URL_IPV6 = "http://[fd00:ec2::254]/"
_IMDS_ROLE_PATH = "latest/meta-data/iam/security-credentials/"
_IMDS_CREDENTIAL_FIELDS = ("AccessKeyId", "SecretAccessKey", "Token", "Expiration")
_IMDS_EXTENSION_S = 15 * 60
"""IMDS credentials that expire within this (plus 2-10 min of jitter) are refreshed no sooner
than that from now (botocore's ``_evaluate_expiration``, "static stability")."""

PROFILE_KEYS = frozenset(
    {
        "region",
        "output",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_security_token",
        "aws_account_id",
        "credential_process",
        "web_identity_token_file",
        "role_arn",
        "role_session_name",
        "source_profile",
        "credential_source",
        "external_id",
        "duration_seconds",
        "metadata_service_timeout",
        "metadata_service_num_attempts",
        "ec2_metadata_service_endpoint",
        "ec2_metadata_service_endpoint_mode",
        "ec2_metadata_v1_disabled",
        "imds_use_ipv6",
        "sts_regional_endpoints",
        # no effect on the S3 client the store makes (it sets its retries itself), nor on the
        # credentials: the AWS CLI's own settings, and retries of the STS client
        "max_attempts",
        "retry_mode",
        "cli_pager",
        "cli_auto_prompt",
        "cli_timestamp_format",
        "cli_binary_format",
        "cli_history",
    }
)
"""Settings of the selected profile this module and ``_native`` resolve as botocore does; any
other one (SSO, ``aws login``, ``s3`` settings, endpoints, a CA bundle...) is botocore's."""

AWS_REGION_RE = re.compile(r"^(?:us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-[0-9]+$")
"""The aws partition's regions: its ``regionRegex`` in botocore 1.43's ``partitions.json``
(``^(us|eu|ap|sa|ca|me|af|il|mx)\\-\\w+\\-\\d+$``), narrowed to letters in the middle. It
matches no region of another partition (``us-gov-west-1``, ``us-iso-east-1``, ``cn-north-1``,
``eu-isoe-west-1``...) nor ``aws-global``; tests/test_native.py checks it against every region
botocore lists."""


class FetchError(Exception):
    """Credentials could not be fetched from their source (the message says what was asked)."""


class FetchContext(NamedTuple):
    """What a fetch needs from the store: TLS contexts (by ``verify`` setting: True, False or
    a CA bundle path), the User-Agent, and the store's timeouts for STS."""

    ssl_context: Callable[[bool | str], ssl.SSLContext]
    user_agent: str = "aiodcp"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


class Source(Protocol):
    """Where refreshable credentials come from."""

    @property
    def method(self) -> str:
        """botocore's name of the provider (``credentials.method``)."""
        ...

    async def fetch(self, context: FetchContext) -> Credentials:
        """Fetch the credentials once; raises ``FetchError``."""
        ...

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        """When to consider ``credentials`` expired for refreshing (usually their expiry)."""
        ...


def parse_expiry(text: Any, what: str) -> datetime.datetime:
    """An ISO 8601 time with its offset (``2026-12-02T01:00:00Z``) as an aware datetime."""
    if not isinstance(text, str):
        raise FetchError(f"{what}: Expiration is not a string: {text!r}")
    try:
        value = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise FetchError(f"{what}: Expiration {text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        # botocore would compare it with an aware "now" and fail: leave it to botocore
        raise FetchError(f"{what}: Expiration {text!r} has no time zone")
    return value.astimezone(datetime.UTC)


# --------------------------------------------------------------------------- HTTP


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class ReadTimeout(FetchError):
    """The server accepted the connection but did not answer in time."""


async def request(
    method: str,
    url: str,
    context: FetchContext,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    connect_timeout_s: float,
    read_timeout_s: float,
    verify: bool | str = True,
) -> Response:
    """One HTTP/1.1 request on a connection of its own; raises ``FetchError`` (connection,
    timeout, malformed response) naming the URL, or ``TimeoutError`` subclass ``ReadTimeout``
    when the answer did not come within ``read_timeout_s``."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise FetchError(f"{url!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError(f"{url!r} has a malformed port") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{parts.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
    lines += [f"User-Agent: {context.user_agent}", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    tls = context.ssl_context(verify) if parts.scheme == "https" else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None),
            connect_timeout_s,
        )
    except TimeoutError:
        raise FetchError(
            f"no connection to {url} within {connect_timeout_s:g} s (connect timeout)"
        ) from None
    except OSError as exc:
        raise FetchError(f"could not connect to {url}: {exc}") from exc
    try:
        writer.write(head + body)
        try:
            raw = await asyncio.wait_for(_read_all(reader), read_timeout_s)
        except TimeoutError:
            raise ReadTimeout(
                f"{url} sent no complete answer within {read_timeout_s:g} s (read timeout)"
            ) from None
        except OSError as exc:
            raise FetchError(f"{method} {url} failed: {exc}") from exc
    finally:
        writer.close()
    return _parse_response(raw, url)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > _MAX_BODY_BYTES:
            raise FetchError(f"an answer of more than {_MAX_BODY_BYTES} bytes")


def _parse_response(raw: bytes, url: str) -> Response:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise FetchError(f"{url} closed the connection before a complete HTTP response")
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if (
        len(status_line) < 2
        or not status_line[0].startswith("HTTP/")
        or not status_line[1].isdigit()
    ):
        raise FetchError(f"{url} answered something that is not HTTP: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(rest, url)
    elif headers.get("content-length", "").isdigit():
        length = int(headers["content-length"])
        if len(rest) < length:
            raise FetchError(f"{url} sent {len(rest)} of the {length} bytes it announced")
        body = rest[:length]
    else:
        body = rest
    return Response(int(status_line[1]), headers, body)


def _dechunk(data: bytes, url: str) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise FetchError(f"{url} sent a malformed chunked body")
        size_text = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise FetchError(f"{url} sent a malformed chunked body") from None
        if size == 0:
            return bytes(out)
        start = end + 2
        if len(data) < start + size:
            raise FetchError(f"{url} sent a truncated chunked body")
        out += data[start : start + size]
        pos = start + size + 2


# --------------------------------------------------------------------------- sources


async def _read_file(path: str) -> str:
    """A file's text (off the loop), as botocore reads tokens: ``open(path).read()``."""

    def read() -> str:
        with open(path) as f:
            return f.read()

    try:
        return await asyncio.to_thread(read)
    except OSError as exc:
        raise FetchError(f"could not read {path}: {exc}") from exc


def _credentials(
    data: Mapping[str, Any], token_key: str, what: str, *, token_required: bool, expires: bool
) -> Credentials:
    """Credentials from a source's answer (JSON or STS's XML, as a mapping)."""
    missing = [k for k in ("AccessKeyId", "SecretAccessKey") if k not in data]
    if token_required and token_key not in data:
        missing.append(token_key)
    if expires and "Expiration" not in data:
        missing.append("Expiration")
    if missing:
        raise FetchError(f"{what}: the answer has no {', '.join(missing)}")
    access_key, secret_key, token = (
        data["AccessKeyId"],
        data["SecretAccessKey"],
        data.get(token_key),
    )
    for name, value in (("AccessKeyId", access_key), ("SecretAccessKey", secret_key)):
        if not isinstance(value, str) or not value:
            raise FetchError(f"{what}: {name} is not a non-empty string")
    if token is not None and not isinstance(token, str):
        raise FetchError(f"{what}: {token_key} is not a string")
    expiry = None
    if data.get("Expiration") is not None:
        expiry = parse_expiry(data["Expiration"], what)
    return Credentials(access_key, secret_key, token or None, expiry)


class ProcessSource(NamedTuple):
    """``credential_process``: a command whose output is the credentials (JSON, version 1),
    split as botocore splits it (``shlex``, no shell) and run again to refresh them."""

    command: str
    profile: str
    method: str = "custom-process"

    async def fetch(self, context: FetchContext) -> Credentials:
        import shlex

        what = f"the credential_process of profile {self.profile!r}"
        try:
            argv = shlex.split(self.command)
        except ValueError as exc:
            raise FetchError(f"{what} cannot be split into arguments: {exc}") from None
        if not argv:
            raise FetchError(f"{what} is empty")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise FetchError(f"{what} could not start ({argv[0]!r}): {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT_S)
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise FetchError(
                    f"{what} did not finish within {PROCESS_TIMEOUT_S:g} s; it was killed"
                ) from None
            raise
        if proc.returncode != 0:
            detail = err.decode("utf-8", "replace").strip()[-500:]
            raise FetchError(f"{what} exited with status {proc.returncode}: {detail}")
        try:
            parsed = json.loads(out.decode("utf-8"))
        except ValueError as exc:
            raise FetchError(f"{what} printed no JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise FetchError(f"{what} printed JSON that is not an object")
        if parsed.get("Version") != 1:
            raise FetchError(f"{what} printed Version {parsed.get('Version')!r}; only 1 is known")
        return _credentials(parsed, "SessionToken", what, token_required=False, expires=False)

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        return credentials.expiry


class WebIdentitySource(NamedTuple):
    """IRSA and other OIDC federations: the token file's token exchanged with STS
    (``AssumeRoleWithWebIdentity``, an unsigned POST) for temporary credentials."""

    token_file: str
    role_arn: str
    session_name: str
    sts_url: str
    verify: bool | str
    method: str = "assume-role-with-web-identity"

    async def fetch(self, context: FetchContext) -> Credentials:
        token = await _read_file(self.token_file)
        form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", self.role_arn),
            ("RoleSessionName", self.session_name),
            ("WebIdentityToken", token),
        ]
        what = f"STS AssumeRoleWithWebIdentity at {self.sts_url} for {self.role_arn}"
        response = await _sts(self.sts_url, context, self.verify, what, form=form)
        return _sts_credentials(response, "AssumeRoleWithWebIdentityResult", what)

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        return credentials.expiry


class AssumeRoleSource(NamedTuple):
    """A profile's ``role_arn`` assumed with STS ``AssumeRole``, signed with the source
    credentials (a ``source_profile``'s, or a ``credential_source``'s: the environment,
    container credentials, instance metadata; a source that is itself a source is fetched at
    each refresh). The call is a presigned GET of STS's query API (SigV4, ``_sigv4``)."""

    role_arn: str
    session_name: str
    external_id: str | None
    duration_s: int | None
    source: Credentials | Source
    sts_url: str
    region: str
    verify: bool | str
    method: str = "assume-role"

    async def fetch(self, context: FetchContext) -> Credentials:
        source = self.source
        credentials = source if isinstance(source, Credentials) else await source.fetch(context)
        query = [
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", self.role_arn),
            ("RoleSessionName", self.session_name),
        ]
        if self.external_id is not None:
            query.append(("ExternalId", self.external_id))
        if self.duration_s is not None:
            query.append(("DurationSeconds", str(self.duration_s)))
        parts = urlsplit(self.sts_url)
        presigner = Presigner(credentials, self.region, service="sts")
        base = f"{parts.scheme}://{parts.netloc}"
        path = parts.path or "/"
        host = signed_host(parts.scheme, parts.hostname or "", parts.port)

        def presign() -> str:
            now = datetime.datetime.now(datetime.UTC)
            return presigner.presign(base, path, host, now=now, expires=300, query=query)

        what = f"STS AssumeRole at {self.sts_url} for {self.role_arn}"
        response = await _sts(self.sts_url, context, self.verify, what, presign=presign)
        return _sts_credentials(response, "AssumeRoleResult", what)

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        return credentials.expiry


async def _sts(
    url: str,
    context: FetchContext,
    verify: bool | str,
    what: str,
    *,
    form: list[tuple[str, str]] | None = None,
    presign: Callable[[], str] | None = None,
) -> Response:
    """One STS call, ``_STS_ATTEMPTS`` attempts for errors a new request can fix: a POST of
    ``form`` to ``url`` (unsigned calls), or a GET of the URL ``presign()`` signs anew for each
    attempt (signed calls)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    last: Exception | None = None
    attempt = 0
    for attempt in range(_STS_ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0, 0.1 * 2**attempt))
        try:
            if presign is not None:
                response = await request(
                    "GET",
                    presign(),
                    context,
                    connect_timeout_s=context.connect_timeout_s,
                    read_timeout_s=context.read_timeout_s,
                    verify=verify,
                )
            else:
                response = await request(
                    "POST",
                    url,
                    context,
                    headers=headers,
                    body=urlencode(form or []).encode("ascii"),
                    connect_timeout_s=context.connect_timeout_s,
                    read_timeout_s=context.read_timeout_s,
                    verify=verify,
                )
        except FetchError as exc:
            last = exc
            continue
        if response.status == 200:
            return response
        code = _xml_text(response.text, "Code") or str(response.status)
        message = _xml_text(response.text, "Message") or response.text[:300]
        last = FetchError(f"{what}: {response.status} {code}: {message}")
        if response.status < 500 and code not in _STS_RETRY_CODES:
            break
    raise FetchError(f"{last} (after {attempt + 1} attempt{'s' if attempt else ''})")


def _xml_text(text: str, tag: str) -> str | None:
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    end = text.find(f"</{tag}>", start)
    return None if end < 0 else text[start + len(tag) + 2 : end]


def _sts_credentials(response: Response, result: str, what: str) -> Credentials:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(response.body)
    except ET.ParseError as exc:
        raise FetchError(f"{what}: the answer is not XML: {exc}") from None
    found: dict[str, str] = {}
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "Credentials":
            for child in element:
                found[child.tag.rsplit("}", 1)[-1]] = (child.text or "").strip()
            break
    if not found:
        raise FetchError(f"{what}: the answer has no {result}/Credentials")
    return _credentials(found, "SessionToken", what, token_required=True, expires=True)


class ContainerSource(NamedTuple):
    """ECS task roles and EKS Pod Identity: JSON credentials from a local endpoint
    (``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` on 169.254.170.2, or ``..._FULL_URI``), with
    the authorization token (``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``, read at each fetch,
    else ``AWS_CONTAINER_AUTHORIZATION_TOKEN``)."""

    url: str
    token: str | None
    token_file: str | None
    method: str = "container-role"

    async def fetch(self, context: FetchContext) -> Credentials:
        headers = {"Accept": "application/json"}
        token = await _read_file(self.token_file) if self.token_file is not None else self.token
        if token is not None:
            if "\r" in token or "\n" in token:
                raise FetchError(
                    "the container authorization token contains a line break (botocore refuses "
                    "it as a header value)"
                )
            headers["Authorization"] = token
        what = f"container credentials from {self.url}"
        last: Exception | None = None
        for attempt in range(_CONTAINER_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_CONTAINER_SLEEP_S)
            try:
                response = await request(
                    "GET",
                    self.url,
                    context,
                    headers=headers,
                    connect_timeout_s=_CONTAINER_TIMEOUT_S,
                    read_timeout_s=_CONTAINER_TIMEOUT_S,
                )
                if response.status != 200:
                    raise FetchError(f"{what}: {response.status}: {response.text[:300]}")
                try:
                    data = json.loads(response.text)
                except ValueError:
                    raise FetchError(f"{what}: the answer is not JSON") from None
            except FetchError as exc:
                last = exc
                continue
            if not isinstance(data, dict):
                raise FetchError(f"{what}: the answer is not a JSON object")
            return _credentials(data, "Token", what, token_required=True, expires=True)
        raise FetchError(f"{last} (after {_CONTAINER_ATTEMPTS} attempts)")

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        return credentials.expiry


class ImdsSource(NamedTuple):
    """An EC2 instance role from the instance metadata service: IMDSv2 (a session token from
    ``PUT /latest/api/token``, then the role's name and its credentials), or IMDSv1 when the
    token request is refused (403, 404, 405) or times out and v1 is not disabled."""

    base_url: str
    timeout_s: float
    attempts: int
    v1_disabled: bool
    method: str = "iam-role"
    extension_s: float = 0.0
    """Seconds beyond botocore's 15 min of static stability, drawn per source (120-600)."""

    def _url(self, path: str) -> str:
        sep = "" if self.base_url.endswith("/") else "/"
        return f"{self.base_url}{sep}{path}"

    async def _call(
        self, method: str, path: str, context: FetchContext, headers: dict[str, str]
    ) -> Response:
        return await request(
            method,
            self._url(path),
            context,
            headers=headers,
            connect_timeout_s=self.timeout_s,
            read_timeout_s=self.timeout_s,
        )

    async def _token(self, context: FetchContext) -> str | None:
        headers = {"x-aws-ec2-metadata-token-ttl-seconds": "21600"}
        for _ in range(self.attempts):
            try:
                response = await self._call("PUT", "latest/api/token", context, headers)
            except ReadTimeout:
                return None
            except FetchError:
                continue
            if response.status == 200:
                return response.text
            if response.status in (403, 404, 405):
                return None
            if response.status == 400:
                raise FetchError("the instance metadata service refused the token request (400)")
        return None

    async def _get(
        self, path: str, context: FetchContext, token: str | None, json_body: bool
    ) -> str:
        headers = {} if token is None else {"x-aws-ec2-metadata-token": token}
        last = "no answer"
        for _ in range(self.attempts):
            try:
                response = await self._call("GET", path, context, headers)
            except FetchError as exc:
                last = str(exc)
                continue
            if response.status != 200 or not response.body:
                last = f"{response.status} with {len(response.body)} bytes"
                continue
            if json_body:
                try:
                    json.loads(response.text)
                except ValueError:
                    last = "an answer that is not JSON"
                    continue
            return response.text
        raise FetchError(f"instance metadata {self._url(path)}: {last}")

    async def fetch(self, context: FetchContext) -> Credentials:
        token = await self._token(context)
        if token is None and self.v1_disabled:
            raise FetchError(
                "no IMDSv2 token from the instance metadata service, and IMDSv1 is disabled"
            )
        role = await self._get(_IMDS_ROLE_PATH, context, token, json_body=False)
        data = json.loads(await self._get(_IMDS_ROLE_PATH + role, context, token, json_body=True))
        what = f"instance metadata credentials of role {role!r}"
        if not isinstance(data, dict) or any(k not in data for k in _IMDS_CREDENTIAL_FIELDS):
            code = data.get("Code") if isinstance(data, dict) else None
            raise FetchError(f"{what}: the answer has no credentials (Code {code!r})")
        return _credentials(data, "Token", what, token_required=True, expires=True)

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        """botocore's static stability: credentials close to expiry (IMDS may serve them up
        to its own refresh) count as valid for another 15 min + jitter, so they are not
        fetched again at every request; their real expiry still bounds every URL."""
        expiry = credentials.expiry
        if expiry is None:
            return None
        offset = datetime.timedelta(seconds=_IMDS_EXTENSION_S + self.extension_s)
        now = datetime.datetime.now(datetime.UTC)
        if now >= expiry - offset:
            return now + offset
        return expiry


# --------------------------------------------------------------------------- the chain


def _boolean(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "true"


def _setting(env: Mapping[str, str], profile: Section, env_name: str, key: str) -> Any:
    """A session setting as botocore's config chain reads it: the variable, else the
    profile's key (None if neither)."""
    if env_name in env:
        return env[env_name]
    return profile.get(key)


def sts_url(env: Mapping[str, str], profile: Section, region: str) -> str | None:
    """The STS endpoint botocore's credential providers call for ``region``: a configured one
    (``AWS_ENDPOINT_URL_STS``, else ``AWS_ENDPOINT_URL``), else the regional endpoint of an aws
    partition region (``sts_regional_endpoints`` "regional", botocore 1.43's default); None when
    it is something else (left to botocore's endpoint rules)."""
    if not _boolean(env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "")):
        for name in ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"):
            if env.get(name):
                return env[name]
    mode = _setting(env, profile, "AWS_STS_REGIONAL_ENDPOINTS", "sts_regional_endpoints")
    if mode not in (None, "regional") or not AWS_REGION_RE.match(region):
        return None
    return f"https://sts.{region}.amazonaws.com/"


def resolve_chain(
    env: Mapping[str, str],
    files: AwsFiles,
    *,
    profile: str,
    explicit_profile: bool,
    region: str,
    now: Callable[[], float] = time.time,
) -> Credentials | Source | str:
    """The credentials botocore's default chain finds for ``profile`` (``"default"`` when none
    is selected; ``explicit_profile``: passed to the session, which drops the environment's
    credentials and web identity), or the source to fetch them from, or why this is left to
    botocore (a reason string). ``region`` is the client's (STS is called in it)."""
    scoped = files.profiles.get(profile, {})
    # 1. the environment
    if not explicit_profile:
        found = _environment(env)
        if found is not None:
            return found
    # 2. assume-role from the profile
    if _assumes_role(scoped):
        return _assume_role(env, files, profile, scoped, region, [profile], now)
    # 3. web identity, 5. the credentials file, 7. credential_process, 8. the config file
    provided = _profile_providers(env, files, profile, scoped, explicit_profile, region, now)
    if provided is not None:
        return provided
    # 9. AWS_CREDENTIAL_FILE is not understood by ``_native``; 10. the boto2 files
    boto = _boto2_reason(env)
    if boto is not None:
        return boto
    # 11. container credentials
    container = _container(env)
    if container is not None:
        return container
    # 12. instance metadata
    if env.get("AWS_EC2_METADATA_DISABLED", "false").lower() == "true":
        return "no credentials found (and instance metadata is disabled): botocore's error"
    return _imds(env, scoped)


def _environment(env: Mapping[str, str]) -> Credentials | str | None:
    """botocore's ``EnvProvider``: None when ``AWS_ACCESS_KEY_ID`` is unset or empty."""
    if not env.get("AWS_ACCESS_KEY_ID", ""):
        return None
    if not env.get("AWS_SECRET_ACCESS_KEY", ""):
        return "AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY (botocore's error)"
    if env.get("AWS_CREDENTIAL_EXPIRATION", ""):
        return "AWS_CREDENTIAL_EXPIRATION is set (expiring environment credentials)"
    token = env.get("AWS_SECURITY_TOKEN", "") or env.get("AWS_SESSION_TOKEN", "") or None
    return Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], token)


def _assumes_role(profile: Section) -> bool:
    return "role_arn" in profile and "web_identity_token_file" not in profile


def _has_static(profile: Section) -> bool:
    return "aws_access_key_id" in profile or "aws_secret_access_key" in profile


def _assume_role(
    env: Mapping[str, str],
    files: AwsFiles,
    profile: str,
    scoped: Section,
    region: str,
    visited: list[str],
    now: Callable[[], float],
) -> AssumeRoleSource | str:
    """botocore's ``AssumeRoleProvider`` for ``profile`` (``scoped``: the session's profile,
    whose settings the instance metadata source reads): the role, its source credentials
    (``source_profile``, followed as botocore follows it, or ``credential_source``) and the
    call's parameters; or why it is botocore's (an MFA prompt, a configuration botocore
    refuses)."""
    config = files.profiles[profile]
    unknown = sorted(set(config) - PROFILE_KEYS)
    if unknown:
        return f"profile {profile!r} sets {unknown}"
    role_arn = config["role_arn"]
    source_profile = config.get("source_profile")
    credential_source = config.get("credential_source")
    if (source_profile is None) == (credential_source is None):
        return f"profile {profile!r} needs one of source_profile and credential_source"
    source: Credentials | Source | str | None
    if credential_source is not None:
        if credential_source == "Environment":
            source = _environment(env)
        elif credential_source == "EcsContainer":
            source = _container(env)
        elif credential_source == "Ec2InstanceMetadata":
            disabled = env.get("AWS_EC2_METADATA_DISABLED", "false").lower() == "true"
            source = None if disabled else _imds(env, scoped)
        else:
            return f"credential_source {credential_source!r} (botocore's error)"
        if source is None:
            return f"no credentials from credential_source {credential_source!r} (botocore's)"
    else:
        if source_profile not in files.profiles:
            return f"source_profile {source_profile!r} does not exist (botocore's error)"
        base = files.profiles[source_profile]
        if source_profile in visited and (source_profile != profile or not _has_static(base)):
            return f"source_profile {source_profile!r} makes a loop (botocore's error)"
        visited.append(source_profile)
        unknown = sorted(set(base) - PROFILE_KEYS)
        if unknown:
            return f"profile {source_profile!r} sets {unknown}"
        if _has_static(base) or not _assumes_role(base):
            source = _profile_chain(env, files, source_profile, region, now)
        else:
            source = _assume_role(env, files, source_profile, scoped, region, visited, now)
        if source is None:
            return f"source_profile {source_profile!r} has no credentials (botocore's error)"
    if isinstance(source, str):
        return source
    session_name = config.get("role_session_name") or f"botocore-session-{int(now())}"
    external_id = config.get("external_id")
    if not all(isinstance(v, str) for v in (role_arn, session_name, external_id or "")):
        return f"profile {profile!r}: an assume-role setting is a nested block"
    duration = config.get("duration_seconds")
    try:
        duration_s = int(duration) if duration is not None else None
    except (TypeError, ValueError):
        duration_s = None  # botocore ignores a duration it cannot read
    url = sts_url(env, scoped, region)
    if url is None:
        return f"STS in region {region!r} is resolved by botocore's endpoint rules"
    verify: bool | str = env["AWS_CA_BUNDLE"] if env.get("AWS_CA_BUNDLE") else True
    return AssumeRoleSource(
        role_arn, session_name, external_id, duration_s, source, url, region, verify
    )


def _profile_chain(
    env: Mapping[str, str], files: AwsFiles, profile: str, region: str, now: Callable[[], float]
) -> Credentials | Source | str | None:
    """A source profile's credentials: botocore's profile providers for it, with the
    environment's variables ignored (web identity, credentials file, process, config file);
    None when none applies."""
    return _profile_providers(
        env, files, profile, files.profiles.get(profile, {}), True, region, now
    )


def _profile_providers(
    env: Mapping[str, str],
    files: AwsFiles,
    profile: str,
    scoped: Section,
    explicit_profile: bool,
    region: str,
    now: Callable[[], float],
) -> Credentials | Source | str | None:
    """botocore's providers of one profile, in its order: web identity (each setting from the
    environment unless ``explicit_profile``, else the profile), (SSO and ``aws login``: their
    settings are not PROFILE_KEYS, so never here) the credentials file's section of that name,
    ``credential_process`` of the merged profile ``scoped``, the config file's profile; None
    when none applies."""
    web = _web_identity(env, scoped, profile, explicit_profile, region, now)
    if web is not None:
        return web
    section = files.credentials.get(profile, {})
    if "aws_access_key_id" in section:
        return _static(section, f"the credentials file's [{profile}]")
    if "credential_process" in scoped:
        command = scoped["credential_process"]
        if not isinstance(command, str):
            return f"profile {profile!r}: credential_process is a nested block"
        return ProcessSource(command, profile)
    section = files.config.get(profile, {})
    if "aws_access_key_id" in section:
        return _static(section, f"the config file's profile {profile!r}")
    return None


def _static(section: Section, where: str) -> Credentials | str:
    """Static keys from a file's section (``SharedCredentialProvider``, ``ConfigProvider``)."""
    access_key = section.get("aws_access_key_id")
    secret_key = section.get("aws_secret_access_key")
    if not isinstance(secret_key, str) or not isinstance(access_key, str):
        return f"{where} has no aws_secret_access_key (botocore's error)"
    token = None
    for name in ("aws_security_token", "aws_session_token"):
        if name in section:
            token = section[name]
            break
    if token is not None and not isinstance(token, str):
        return f"{where}: the session token is a nested block"
    return Credentials(access_key, secret_key, token)


def _web_identity(
    env: Mapping[str, str],
    scoped: Section,
    profile: str,
    explicit_profile: bool,
    region: str,
    now: Callable[[], float],
) -> WebIdentitySource | str | None:
    def setting(key: str, env_name: str) -> Any:
        if not explicit_profile and env_name in env:
            return env[env_name]
        return scoped.get(key)

    token_file = setting("web_identity_token_file", "AWS_WEB_IDENTITY_TOKEN_FILE")
    if not token_file:
        return None
    role_arn = setting("role_arn", "AWS_ROLE_ARN")
    if not role_arn:
        return "web identity without a role ARN (botocore's error)"
    session_name = setting("role_session_name", "AWS_ROLE_SESSION_NAME")
    if not session_name:  # botocore generates one when it is unset or empty
        session_name = f"botocore-session-{int(now())}"
    if not all(isinstance(v, str) for v in (token_file, role_arn, session_name)):
        return f"profile {profile!r}: a web identity setting is a nested block"
    url = sts_url(env, scoped, region)
    if url is None:
        return f"STS in region {region!r} is resolved by botocore's endpoint rules"
    verify: bool | str = env["AWS_CA_BUNDLE"] if env.get("AWS_CA_BUNDLE") else True
    return WebIdentitySource(token_file, role_arn, session_name, url, verify)


def _boto2_reason(env: Mapping[str, str]) -> str | None:
    paths = [env["BOTO_CONFIG"]] if "BOTO_CONFIG" in env else ["/etc/boto.cfg", "~/.boto"]
    for path in paths:
        try:
            parsed = raw_parse(os.path.expanduser(os.path.expandvars(path)))
        except Exception as exc:
            return f"the boto2 config file {path} ({exc})"
        if parsed is not None and "aws_access_key_id" in parsed.get("Credentials", {}):
            return f"credentials in the boto2 config file {path}"
    return None


def _container(env: Mapping[str, str]) -> ContainerSource | str | None:
    relative = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
    full = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    if relative in env:
        url = f"http://{_CONTAINER_HOST}{env[relative]}"
    elif full in env:
        url = env[full]
    else:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    allowed = parts.scheme == "https" or host in _CONTAINER_ALLOWED_HOSTS
    if not allowed:
        try:
            allowed = ipaddress.ip_address(host).is_loopback
        except ValueError:
            allowed = False
    if not allowed or parts.scheme not in ("http", "https"):
        return f"container credentials URL {url!r} is not one botocore accepts"
    token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    token = None if token_file is not None else env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    return ContainerSource(url, token, token_file)


def _imds(env: Mapping[str, str], scoped: Section) -> ImdsSource | str:
    timeout = _setting(env, scoped, "AWS_METADATA_SERVICE_TIMEOUT", "metadata_service_timeout")
    attempts = _setting(
        env, scoped, "AWS_METADATA_SERVICE_NUM_ATTEMPTS", "metadata_service_num_attempts"
    )
    try:  # botocore's conversion: int(), which refuses "1.5" and ""
        timeout = 1 if timeout is None else int(timeout)
        attempts = 1 if attempts is None else int(attempts)
    except (TypeError, ValueError):
        return "an instance metadata timeout or attempt count that is not an integer"
    endpoint = _setting(
        env, scoped, "AWS_EC2_METADATA_SERVICE_ENDPOINT", "ec2_metadata_service_endpoint"
    )
    mode = _setting(
        env, scoped, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "ec2_metadata_service_endpoint_mode"
    )
    if mode is not None:
        if not isinstance(mode, str) or mode.lower() not in ("ipv4", "ipv6"):
            return f"instance metadata endpoint mode {mode!r} (botocore's error)"
        ipv6 = mode.lower() == "ipv6"
    else:
        ipv6 = _boolean(_setting(env, scoped, "AWS_IMDS_USE_IPV6", "imds_use_ipv6"))
    if endpoint:
        if not isinstance(endpoint, str):
            return "the instance metadata endpoint is a nested block"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"instance metadata endpoint {endpoint!r} (botocore's error)"
        base = endpoint
    else:
        base = _IMDS_URL_IPV6 if ipv6 else _IMDS_URL
    v1_disabled = _boolean(
        _setting(env, scoped, "AWS_EC2_METADATA_V1_DISABLED", "ec2_metadata_v1_disabled")
    )
    return ImdsSource(
        base,
        float(timeout),
        max(attempts, 1),
        v1_disabled,
        extension_s=float(random.randint(120, 600)),
    )


# --------------------------------------------------------------------------- refreshing


class Refresher:
    """The current credentials of one source, refreshed as botocore refreshes them.

    ``get()``: fresh credentials at once; within ``advisory_s`` of their expiry a refresh
    starts in the background and the current ones are returned (a failed advisory refresh is
    logged, as botocore logs it); within ``mandatory_s`` the caller waits for the refresh and
    its failure is raised (``FetchError``). Concurrent callers share one refresh. Static
    credentials (no source, or no expiry) are returned as they are.
    """

    def __init__(
        self,
        source: Source | None,
        credentials: Credentials,
        context: FetchContext,
        *,
        advisory_s: float = ADVISORY_REFRESH_S,
        mandatory_s: float = MANDATORY_REFRESH_S,
    ) -> None:
        self.source = source
        self.credentials = credentials
        self._context = context
        self._advisory_s = advisory_s
        self._mandatory_s = mandatory_s
        self._refresh_expiry = self._expiry_for_refresh(credentials)
        self._task: asyncio.Task[Credentials] | None = None
        self.refreshes = 0
        """Refreshes that replaced the credentials (for the statistics and tests)."""

    def _expiry_for_refresh(self, credentials: Credentials) -> datetime.datetime | None:
        if self.source is None:
            return None
        return self.source.refresh_expiry(credentials)

    def seconds_left(self) -> float | None:
        """Seconds until the current credentials really expire (None: they do not)."""
        return _left(self.credentials.expiry)

    async def get(self) -> Credentials:
        left = _left(self._refresh_expiry)
        if left is None or left >= self._advisory_s:
            return self.credentials
        task = self._start()
        if left >= self._mandatory_s:
            return self.credentials  # advisory: the refresh runs in the background
        return await asyncio.shield(task)

    async def refused(self, access_key: str | None) -> bool:
        """The store refused ``access_key``'s credentials as expired: fetch new ones (one
        fetch for a burst of refusals) unless they were replaced already. Whether the store
        now has other credentials (static ones cannot change)."""
        if self.source is None or access_key is None:
            return False
        if self.credentials.access_key == access_key:
            try:
                await asyncio.shield(self._start())
            except FetchError:
                logger.warning(
                    "refreshing credentials after an expired-token reply failed", exc_info=True
                )
                return False
        return self.credentials.access_key != access_key

    async def refresh(self) -> Credentials:
        """Fetch new credentials now (sharing a refresh in progress); raises ``FetchError``."""
        return await asyncio.shield(self._start())

    def _start(self) -> asyncio.Task[Credentials]:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._refresh())
            self._task.add_done_callback(_log_failed)
        return self._task

    async def _refresh(self) -> Credentials:
        if self.source is None:
            return self.credentials
        credentials = await self.source.fetch(self._context)
        left = _left(credentials.expiry)
        if left is not None and left <= 0:
            raise FetchError(
                f"{self.source.method}: the refreshed credentials are already expired "
                f"(at {credentials.expiry})"
            )
        self.credentials = credentials
        self._refresh_expiry = self._expiry_for_refresh(credentials)
        self.refreshes += 1
        logger.debug(
            "credentials from %s refreshed; they expire at %s",
            self.source.method,
            credentials.expiry,
        )
        return credentials

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _log_failed(task: asyncio.Task[Credentials]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.warning("refreshing temporary credentials failed: %s", exc)


def _left(expiry: datetime.datetime | None) -> float | None:
    if expiry is None:
        return None
    return (expiry - datetime.datetime.now(datetime.UTC)).total_seconds()
