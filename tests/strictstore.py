"""A loopback S3 server as strict as AWS S3 about authentication: a WSGI middleware over moto.

Run: ``python tests/strictstore.py --log FILE --ca-dir DIR`` prints ``PORTS <http> <https>`` once
both listen on 127.0.0.1. Both ports serve the same middleware in front of one in-process moto S3
app (so one moto backend); the HTTPS port uses a certificate issued at start-up by a fresh test CA
whose certificate is written to ``DIR/ca.pem`` (SANs ``127.0.0.1``, ``localhost``,
``*.localhost``).

Data flow, per request (werkzeug threaded servers, one thread per connection)::

    environ -> /_strict/... ? -> control API (JSON, unauthenticated, never logged or counted)
            -> find bucket/key (path style; or virtual-hosted ``<bucket>.localhost``)
            -> auth mechanism: Authorization header and query auth both -> InvalidArgument;
               SigV2 (header ``AWS ak:sig`` or query ``AWSAccessKeyId``) -> InvalidRequest;
               unknown scheme -> InvalidArgument "Unsupported Authorization Type"
            -> per-bucket throttle (token bucket, burst = rate) -> 503 SlowDown
            -> anonymous: public bucket and GET/HEAD of an object -> moto; else AccessDenied
            -> SigV4 parse: header components / query parameters, algorithm, X-Amz-Date,
               X-Amz-Expires, Credential ak/date/region/s3/aws4_request, x-amz-content-sha256
            -> bucket region (moto's record) vs credential region -> 400 / 301, x-amz-bucket-region
            -> access key known?  -> session token (missing / wrong / expired or revoked)
            -> clock: header form +-15 min (RequestTimeTooSkewed); query form not yet valid,
               then X-Amz-Date + X-Amz-Expires passed ("Request has expired")
            -> host signed, every x-amz-* header signed
            -> signature recomputed with botocore's S3SigV4Auth (canonical_request,
               string_to_sign, signature) over exactly the SignedHeaders -> SignatureDoesNotMatch
            -> hex x-amz-content-sha256: read the body, compare -> XAmzContentSHA256Mismatch;
               UNSIGNED-PAYLOAD and STREAMING-* bodies go to moto unread and unchanged
            -> requester-pays bucket without x-amz-request-payer=requester -> AccessDenied
            -> uploads (check_upload): a PutObject or UploadPart with x-amz-checksum-crc64nvme
               has its body read and CRC64NVME'd -> 400 BadDigest on a mismatch; the parts of
               an upload created with x-amz-checksum-algorithm CRC64NVME and type FULL_OBJECT
               are CRC'd as they arrive, and a CompleteMultipartUpload's
               x-amz-checksum-crc64nvme must be the CRC of the parts it lists, combined
               -> 400 BadDigest; a conditional write (If-None-Match / If-Match on PutObject or
               CompleteMultipartUpload) while another conditional write of the same key is in
               progress -> 409 ConditionalRequestConflict (moto answers the 412s)
            -> moto
    every S3 request -> one JSON line in --log (method, path, query, range, if_match, status,
               code, auth, region, access_key, payload) and the counters
    moto's answers -> ``ChecksumAnswers`` (between the checks and moto): a GET or HEAD of an
               object with ``x-amz-checksum-mode: ENABLED`` and no Range gets the object's
               full-object checksum (the one it was uploaded with, else the CRC64NVME S3 gives
               every new object) and ``x-amz-checksum-type``; a ranged GET, or a request without
               the mode, gets no ``x-amz-checksum-*`` header

Refusals are S3's XML ``<Error><Code/><Message/>...<RequestId/><HostId/></Error>`` with S3's
status; a refused HEAD has no body (as S3). A refused request's body is drained first so the
keep-alive connection stays usable.

Canonicalisation: the canonical URI is each raw path segment percent-decoded and re-encoded with
S3's UriEncode (an encoded ``/`` stays encoded); the canonical query is every pair decoded and
re-encoded, sorted, without X-Amz-Signature; ``+`` in a query is taken literally (``%2B``). The Host
header is used exactly as received.

Control API (JSON in and out, unauthenticated; ``_`` cannot start a bucket name)::

    POST   /_strict/credentials      {"ttl": s, "advertised_ttl": s?} -> credential_process JSON
                                     {"Version": 1, "AccessKeyId": "ASIA...", "SecretAccessKey",
                                      "SessionToken", "Expiration": now + advertised_ttl (UTC)};
                                     the server enforces now + ttl
    POST   /_strict/revoke           {"access_key_id": id} or {"all_temporary": true}
                                     -> {"revoked": [ids]}
    GET|PUT /_strict/buckets/<name>  {"rate": n|null, "requester_pays": b, "public": b} (any
                                     subset) -> the bucket's settings
    GET|PUT /_strict/config          {"region_mode": 400|301, "path_prefix": "/s3"|"",
                                     "hold_conditional": b} (any subset) -> the settings; with
                                     a path prefix, S3 is served under it (``/s3/bucket/key``),
                                     as by a gateway: the signature is checked over the whole
                                     path received, moto sees the rest; while hold_conditional
                                     is true, a conditional write waits (in progress) until it
                                     is false
    GET    /_strict/counters         -> {"requests": n, "accepted": n, "refused": {code: n},
                                         "held": conditional writes waiting now}
    DELETE /_strict/counters         reset them
    POST   /_strict/reset            bucket settings cleared, region mode 400, no path prefix,
                                     "testing" restored

Credentials known from the start: access key ``testing``, secret ``testing``, session token
``testing``, no expiry (what tests/conftest.py puts in the environment). ``payload`` in the log is
the x-amz-content-sha256 keyword, ``"sha256"`` for a hex hash, or null.

Choices and uncertainties (where this store may differ from S3):

* Check order is the list above. In particular the bucket-region check comes before the access key
  lookup, and token expiry (ExpiredToken) before presigned URL expiry ("Request has expired").
* Messages believed exact: SignatureDoesNotMatch, InvalidAccessKeyId, InvalidToken, ExpiredToken,
  RequestTimeTooSkewed, "Request has expired", the region-wrong messages, PermanentRedirect,
  SlowDown, SigV2 refusal, XAmzContentSHA256Mismatch, "Missing required header for this request:
  x-amz-content-sha256", "AWS authentication requires a valid Date or x-amz-date header",
  "There were headers present in the request which were not signed".
  Less sure (wording reconstructed from memory of S3 answers): the credential-date mismatch and
  service/terminal messages in the query form, "X-Amz-Date must be in the ISO8601 Long Format",
  "Unsupported Authorization Type", InvalidToken for a token sent with a key that has none,
  "Request is not valid yet" (presigned X-Amz-Date more than 15 minutes ahead), the
  x-amz-content-sha256 InvalidArgument message, and "host" reported in HeadersNotSigned when the
  host header is not signed.
* STREAMING-AWS4-HMAC-SHA256-PAYLOAD chunk signatures are not verified (the body goes to moto as
  is). SigV4A (AWS4-ECDSA-P256-SHA256) is refused as an unsupported type.
* Content-Type is not required to be signed.
* Requester pays: S3 exempts the bucket owner; here every caller is treated as a non-owner.
  Anonymous requests to a requester-pays bucket are refused even when it is public.
* moto itself refuses anonymous reads of objects that are not public-read; an anonymous read
  this store lets through (public flag) reaches moto with a dummy Authorization header.
* Revoking a temporary credential makes it expire now (ExpiredToken); revoking a key without a
  session token deletes it (InvalidAccessKeyId).
* The certificate names ``*.localhost``, but OpenSSL (3.0 here) does not match a wildcard over a
  single label, so TLS clients verifying ``<bucket>.localhost`` fail; use path addressing or
  plain HTTP for virtual-hosted requests.
* The PermanentRedirect ``<Endpoint>`` is the Host header received (this server serves every
  region); S3 names a regional endpoint such as ``s3.eu-west-1.amazonaws.com``.
* Checksums: only CRC64NVME is verified (what aiodcp sends), and only in a plain body; an
  aws-chunked body's trailer checksum goes to moto unverified. A CompleteMultipartUpload whose
  upload was created with CRC64NVME FULL_OBJECT but lists a part this store never received
  whole is left to moto (InvalidPart). The 409 window is the time moto takes to apply the write
  (plus any hold_conditional): S3's is similar, its length unknown.
* PUT /bucket with no query string (CreateBucket) skips the region check; moto then applies S3's
  LocationConstraint rules against the signature's region (a us-east-1 signature may create a
  bucket in any region, another region's signature only in that region).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import email.utils
import hmac
import io
import ipaddress
import json
import re
import secrets
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit
from xml.sax.saxutils import escape

import awscrt.checksums
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from moto.core.request import PRESERVED_HEADER_NAMES_ENVIRON_KEY
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

__all__ = [
    "ChecksumAnswers",
    "ControlError",
    "S3Error",
    "StrictState",
    "StrictStore",
    "make_tls_files",
    "main",
]

CONTROL_PREFIX = "/_strict/"
MAX_SKEW_S = 900
MAX_PRESIGN_EXPIRES_S = 604800
ALGORITHM = "AWS4-HMAC-SHA256"
PAYLOAD_KEYWORDS = frozenset(
    {
        "UNSIGNED-PAYLOAD",
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
    }
)
HEX64 = re.compile(r"^[0-9a-f]{64}$")
AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")
QUERY_AUTH_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "X-Amz-Date",
    "X-Amz-SignedHeaders",
    "X-Amz-Expires",
)

MSG_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method."
)
MSG_UNKNOWN_KEY = "The AWS Access Key Id you provided does not exist in our records."
MSG_BAD_TOKEN = "The provided token is malformed or otherwise invalid."
MSG_EXPIRED_TOKEN = "The provided token has expired."
MSG_SKEW = "The difference between the request time and the current time is too large."
MSG_SIGV2 = (
    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256."
)
MSG_REDIRECT = (
    "The bucket you are attempting to access must be addressed using the specified endpoint. "
    "Please send all future requests to this endpoint."
)
MSG_NOT_SIGNED = "There were headers present in the request which were not signed"
MSG_NO_DATE = "AWS authentication requires a valid Date or x-amz-date header"
MSG_CRED_FORMAT = (
    'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".'
)
HEADER_MALFORMED = "The authorization header is malformed; "
QUERY_CREDENTIAL = "Error parsing the X-Amz-Credential parameter; "


def crc64_header(crc: int) -> str:
    """A CRC64NVME as S3 spells it in x-amz-checksum-crc64nvme (8 bytes big-endian, base64)."""
    return base64.b64encode(crc.to_bytes(8, "big")).decode("ascii")


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class S3Error(Exception):
    """An S3 refusal: status, Code, Message, extra XML elements and extra response headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        extra: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or []
        self.headers = headers or {}


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- state


@dataclass
class Credential:
    access_key: str
    secret_key: str
    token: str | None = None
    expires_at: float | None = None  # server clock; None = never
    temporary: bool = False  # minted through the control API


@dataclass
class BucketSettings:
    rate: float | None = None
    tokens: float = 0.0
    stamp: float = 0.0
    requester_pays: bool = False
    public: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "requester_pays": self.requester_pays, "public": self.public}


@dataclass
class Upload:
    """A multipart upload created with a CRC64NVME full-object checksum: its parts' CRCs."""

    parts: dict[int, tuple[int, int]] = field(default_factory=dict)  # number -> (crc, size)


@dataclass
class StrictState:
    """Everything the control API sets; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    credentials: dict[str, Credential] = field(default_factory=dict)
    buckets: dict[str, BucketSettings] = field(default_factory=dict)
    region_mode: int = 400
    path_prefix: str = ""
    requests: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    writing: set[tuple[str, str]] = field(default_factory=set)
    """(bucket, key) of the conditional writes in progress."""
    hold_conditional: bool = False
    released: threading.Condition = field(default_factory=threading.Condition)
    held: int = 0

    def __post_init__(self) -> None:
        self.add_default_credentials()

    def add_default_credentials(self) -> None:
        self.credentials["testing"] = Credential("testing", "testing", "testing", None)

    def lookup(self, access_key: str) -> Credential | None:
        with self.lock:
            return self.credentials.get(access_key)

    def bucket(self, name: str) -> BucketSettings:
        with self.lock:
            return self.buckets.setdefault(name, BucketSettings())

    def take_token(self, name: str) -> bool:
        """Token bucket: ``rate`` per second, burst ``max(rate, 1)``; True when it may pass."""
        now = time.monotonic()
        with self.lock:
            s = self.buckets.get(name)
            if s is None or s.rate is None:
                return True
            s.tokens = min(max(s.rate, 1.0), s.tokens + (now - s.stamp) * s.rate)
            s.stamp = now
            if s.tokens >= 1.0:
                s.tokens -= 1.0
                return True
            return False

    def count(self, code: str | None) -> None:
        with self.lock:
            self.requests += 1
            if code is None:
                self.accepted += 1
            else:
                self.refused[code] = self.refused.get(code, 0) + 1

    def counters(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "accepted": self.accepted,
                "refused": dict(self.refused),
                "held": self.held,
            }


def bucket_region(name: str) -> str | None:
    """The region moto recorded for ``name`` at CreateBucket, or None if there is no bucket."""
    where = s3_backends.bucket_accounts.get(name)
    if where is None:
        return None
    partition, account_id = where
    bucket = s3_backends[account_id][partition].buckets.get(name)
    return None if bucket is None else str(bucket.region_name)


# --------------------------------------------------------------------------- signing


class _Verifier(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 SigV4 signer, fed exactly what the request said it signed.

    ``request.context`` carries ``timestamp`` (X-Amz-Date), ``signed_headers`` (the names from
    SignedHeaders), ``canonical_query`` and ``payload_hash``; botocore's canonical_request,
    string_to_sign and signature do the rest.
    """

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        headers = HTTPHeaders()
        for name in request.context["signed_headers"]:
            headers[name] = request.headers.get(name, "")
        return headers

    def canonical_query_string(self, request: AWSRequest) -> str:
        return str(request.context["canonical_query"])

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_hash"])


def _uri_encode(raw: bytes) -> str:
    return quote(unquote_to_bytes(raw), safe="")


def canonical_path(raw_path: bytes) -> str:
    return "/".join(_uri_encode(seg) for seg in raw_path.split(b"/")) or "/"


def canonical_query(raw_query: bytes, presigned: bool) -> str:
    """Every pair decoded and UriEncoded, sorted; a presigned URL's X-Amz-Signature left out."""
    pairs = []
    for pair in raw_query.split(b"&"):
        if not pair:
            continue
        k, _, v = pair.partition(b"=")
        key = _uri_encode(k)
        if presigned and key == "X-Amz-Signature":
            continue
        pairs.append((key, _uri_encode(v)))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def wire_bytes(value: str) -> bytes:
    """Undo the WSGI encoding dance (latin-1 str of UTF-8-encoded latin-1) to the raw bytes."""
    try:
        return value.encode("latin-1").decode("utf-8").encode("latin-1")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value.encode("utf-8", "replace")


# --------------------------------------------------------------------------- requests


@dataclass
class Incoming:
    method: str
    host: str
    raw_path: bytes
    raw_query: bytes
    params: dict[str, str]
    headers: dict[str, str]  # lower-case names
    bucket: str | None
    key: str
    record: dict[str, Any]


def read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        body = stream.read()
    else:
        remaining = int(environ.get("CONTENT_LENGTH") or 0)
        parts = []
        while remaining > 0:
            chunk = stream.read(min(remaining, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            remaining -= len(chunk)
        body = b"".join(parts)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return bytes(body)


def environ_headers(environ: dict[str, Any]) -> dict[str, str]:
    """Request headers by lower-case name (MotoRequestHandler keeps underscored names)."""
    spelled: dict[str, str] = environ.get(PRESERVED_HEADER_NAMES_ENVIRON_KEY) or {}
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[spelled.get(key, key[5:].replace("_", "-")).lower()] = value
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value != "":
            headers[key.lower().replace("_", "-")] = value
    return headers


def strip_prefix(environ: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The request as moto must see it, without the gateway's path prefix; the path received
    (what the client signed) stays in ``aiodcp.signed_uri``. A path outside the prefix is left
    as it is (moto will not find its bucket)."""
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    if "://" in raw_uri.split("?", 1)[0]:
        parts = urlsplit(raw_uri)
        raw_uri = parts.path + ("?" + parts.query if parts.query else "")
    path_info = environ.get("PATH_INFO", "")
    if not (raw_uri.startswith(prefix + "/") and path_info.startswith(prefix + "/")):
        return environ
    stripped = dict(environ)
    stripped["aiodcp.signed_uri"] = raw_uri
    stripped["RAW_URI"] = stripped["REQUEST_URI"] = raw_uri[len(prefix) :]
    stripped["PATH_INFO"] = path_info[len(prefix) :]
    return stripped


def parse_request(environ: dict[str, Any]) -> Incoming:
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    if "://" in raw_uri.split("?", 1)[0]:
        parts = urlsplit(raw_uri)
        raw_uri = parts.path + ("?" + parts.query if parts.query else "")
    raw = wire_bytes(raw_uri)
    raw_path, _, raw_query = raw.partition(b"?")
    params: dict[str, str] = {}
    for pair in raw_query.split(b"&"):
        if pair:
            k, _, v = pair.partition(b"=")
            params.setdefault(
                unquote_to_bytes(k).decode("utf-8", "replace"),
                unquote_to_bytes(v).decode("utf-8", "replace"),
            )
    host = environ.get("HTTP_HOST", "")
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
    bucket: str | None
    if hostname.endswith(".localhost") and hostname != ".localhost":
        bucket, key = hostname[: -len(".localhost")], path[1:]
    else:
        name, _, key = path[1:].partition("/")
        bucket = name or None
    record = {
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "query": environ.get("QUERY_STRING", ""),
        "range": environ.get("HTTP_RANGE"),
        "if_match": environ.get("HTTP_IF_MATCH"),
        "status": None,
        "code": None,
        "auth": "anonymous",
        "region": None,
        "access_key": None,
        "payload": None,
    }
    signed_uri = environ.get("aiodcp.signed_uri")
    if signed_uri is not None:  # behind a path prefix: the client signed the whole path
        raw_path = wire_bytes(signed_uri).partition(b"?")[0]
        record["path"] = unquote_to_bytes(raw_path).decode("utf-8", "replace")
    return Incoming(
        method=str(environ.get("REQUEST_METHOD", "GET")).upper(),
        host=host,
        raw_path=raw_path or b"/",
        raw_query=raw_query,
        params=params,
        headers=environ_headers(environ),
        bucket=bucket,
        key=key,
        record=record,
    )


@dataclass
class SigV4:
    query: bool
    access_key: str
    date: str
    region: str
    service: str
    terminal: str
    signed_headers: list[str]
    signature: str
    amz_date: str
    timestamp: float
    expires: int | None
    token: str | None


def _malformed(query: bool, detail: str) -> S3Error:
    if query:
        return S3Error(400, "AuthorizationQueryParametersError", detail)
    return S3Error(400, "AuthorizationHeaderMalformed", HEADER_MALFORMED + detail)


def parse_v4(req: Incoming, query: bool) -> SigV4:
    if query:
        p = req.params
        if any(name not in p for name in QUERY_AUTH_PARAMS):
            raise S3Error(
                400,
                "AuthorizationQueryParametersError",
                "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
                "and X-Amz-Expires parameters.",
            )
        if p["X-Amz-Algorithm"] != ALGORITHM:
            raise S3Error(
                400,
                "AuthorizationQueryParametersError",
                'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"',
            )
        credential = p["X-Amz-Credential"]
        signed = p["X-Amz-SignedHeaders"]
        signature = p["X-Amz-Signature"]
        amz_date = p["X-Amz-Date"]
        if not AMZ_DATE.match(amz_date):
            raise S3Error(
                400,
                "AuthorizationQueryParametersError",
                "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"",
            )
        try:
            expires = int(p["X-Amz-Expires"])
        except ValueError:
            raise S3Error(
                400, "AuthorizationQueryParametersError", "X-Amz-Expires should be a number"
            ) from None
        if expires < 0:
            raise S3Error(
                400, "AuthorizationQueryParametersError", "X-Amz-Expires must be non-negative"
            )
        if expires > MAX_PRESIGN_EXPIRES_S:
            raise S3Error(
                400,
                "AuthorizationQueryParametersError",
                "X-Amz-Expires must be less than a week (in seconds) that is; 604800",
            )
        token = p.get("X-Amz-Security-Token")
    else:
        value = req.headers["authorization"][len(ALGORITHM) :]
        fields: dict[str, str] = {}
        for part in value.split(","):
            k, sep, v = part.strip().partition("=")
            if sep:
                fields[k.strip()] = v.strip()
        if not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
            raise _malformed(
                False,
                "the authorization header requires three components: "
                "Credential, SignedHeaders, and Signature.",
            )
        credential = fields["Credential"]
        signed = fields["SignedHeaders"]
        signature = fields["Signature"]
        expires = None
        token = req.headers.get("x-amz-security-token")
        amz_date = req.headers.get("x-amz-date", "")
        if not amz_date and "date" in req.headers:
            try:
                parsed = email.utils.parsedate_to_datetime(req.headers["date"])
                amz_date = parsed.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            except (TypeError, ValueError):
                amz_date = ""
        if not AMZ_DATE.match(amz_date):
            raise S3Error(403, "AccessDenied", MSG_NO_DATE)
    try:
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        if query:
            raise S3Error(
                400,
                "AuthorizationQueryParametersError",
                "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"",
            ) from None
        raise S3Error(403, "AccessDenied", MSG_NO_DATE) from None
    scope = credential.split("/")
    if len(scope) != 5 or not all(scope):
        raise _malformed(query, (QUERY_CREDENTIAL if query else "") + MSG_CRED_FORMAT)
    access_key, date, region, service, terminal = scope
    req.record["access_key"] = access_key
    req.record["region"] = region
    prefix = QUERY_CREDENTIAL if query else ""
    if service != "s3":
        raise _malformed(
            query, f'{prefix}incorrect service "{service}". This endpoint belongs to "s3".'
        )
    if terminal != "aws4_request":
        raise _malformed(
            query, f'{prefix}incorrect terminal "{terminal}". This endpoint uses "aws4_request".'
        )
    if date != amz_date[:8]:
        raise _malformed(
            query, f"{prefix}Invalid credential date. Date is not the same as X-Amz-Date."
        )
    names = [n for n in signed.split(";")]
    if not signed or any(not n for n in names):
        raise _malformed(
            query,
            "X-Amz-SignedHeaders is malformed" if query else "SignedHeaders is malformed.",
        )
    return SigV4(
        query=query,
        access_key=access_key,
        date=date,
        region=region,
        service=service,
        terminal=terminal,
        signed_headers=[n.lower() for n in names],
        signature=signature,
        amz_date=amz_date,
        timestamp=when.timestamp(),
        expires=expires,
        token=token,
    )


# --------------------------------------------------------------------------- the middleware


class StrictStore:
    """WSGI middleware enforcing S3's authentication rules in front of moto's app."""

    def __init__(self, app: Any, state: StrictState, log_path: str) -> None:
        self.app = app
        self.state = state
        self.log_path = log_path
        self.log_lock = threading.Lock()

    # ------------------------------------------------------------------ WSGI entry

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "").startswith(CONTROL_PREFIX) and not environ.get(
            "HTTP_HOST", ""
        ).split(":")[0].endswith(".localhost"):
            return self.control(environ, start_response)
        prefix = self.state.path_prefix
        if prefix:
            environ = strip_prefix(environ, prefix)
        req = parse_request(environ)
        try:
            self.check(req, environ)
            self.check_upload(req, environ)
        except S3Error as err:
            self.drain(environ)
            req.record["code"] = err.code
            self.state.count(err.code)
            return self.refuse(req, err, start_response)
        conditional = self.conditional_write(req)
        if conditional is not None:
            with self.state.lock:
                busy = conditional in self.state.writing
                if not busy:
                    self.state.writing.add(conditional)
            if busy:
                self.drain(environ)
                err = S3Error(
                    409,
                    "ConditionalRequestConflict",
                    "A conflicting conditional operation is currently in progress against "
                    "this resource. Please try again.",
                )
                req.record["code"] = err.code
                self.state.count(err.code)
                return self.refuse(req, err, start_response)
        self.state.count(None)
        captured: dict[str, Any] = {}

        def logging_start_response(status: str, headers: Any, *args: Any) -> Any:
            req.record["status"] = int(status.split()[0])
            captured["status"] = req.record["status"]
            self.log(req.record)
            return start_response(status, headers, *args)

        with contextlib.ExitStack() as stack:
            if conditional is not None:
                stack.callback(self.end_conditional, conditional)
                self.hold(conditional)
            body = self.app(environ, logging_start_response)
            if req.method == "POST" and "uploads" in req.params:
                body = list(body)
                self.created(req, b"".join(body), captured.get("status"))
            return body

    # ------------------------------------------------------------------ uploads

    @staticmethod
    def conditional_write(req: Incoming) -> tuple[str, str] | None:
        """(bucket, key) of a conditional PutObject or CompleteMultipartUpload, else None."""
        if req.bucket is None or not req.key:
            return None
        if "if-none-match" not in req.headers and "if-match" not in req.headers:
            return None
        put = req.method == "PUT" and "uploadId" not in req.params
        complete = req.method == "POST" and "uploadId" in req.params
        return (req.bucket, req.key) if put or complete else None

    def hold(self, conditional: tuple[str, str]) -> None:
        """While ``hold_conditional`` is set, a conditional write waits (in progress)."""
        state = self.state
        with state.released:
            if not state.hold_conditional:
                return
            with state.lock:
                state.held += 1
            try:
                state.released.wait_for(lambda: not state.hold_conditional, timeout=60)
            finally:
                with state.lock:
                    state.held -= 1

    def end_conditional(self, conditional: tuple[str, str]) -> None:
        with self.state.lock:
            self.state.writing.discard(conditional)

    def created(self, req: Incoming, body: bytes, status: int | None) -> None:
        """A CreateMultipartUpload moto answered: remember a CRC64NVME FULL_OBJECT upload."""
        match = re.search(rb"<UploadId>([^<]+)</UploadId>", body)
        if status != 200 or match is None:
            return
        algorithm = req.headers.get("x-amz-checksum-algorithm", "").upper()
        kind = req.headers.get("x-amz-checksum-type", "").upper()
        if algorithm == "CRC64NVME" and kind in ("", "FULL_OBJECT"):
            with self.state.lock:
                self.state.uploads[match.group(1).decode()] = Upload()

    def check_upload(self, req: Incoming, environ: dict[str, Any]) -> None:
        """S3's checks of what a body holds: CRC64NVME of a PutObject or UploadPart, and the
        full-object CRC64NVME of a CompleteMultipartUpload (see the module docstring)."""
        if req.bucket is None or not req.key or req.method not in ("PUT", "POST"):
            return
        streaming = req.headers.get("x-amz-content-sha256", "").startswith("STREAMING-")
        claimed = req.headers.get("x-amz-checksum-crc64nvme")
        upload_id = req.params.get("uploadId")
        if req.method == "PUT":
            upload = None
            if upload_id is not None and "partNumber" in req.params:
                with self.state.lock:
                    upload = self.state.uploads.get(upload_id)
            if streaming or (claimed is None and upload is None):
                return
            body = read_body(environ)
            crc = awscrt.checksums.crc64nvme(body)
            if claimed is not None and claimed != crc64_header(crc):
                raise S3Error(
                    400,
                    "BadDigest",
                    "The CRC64NVME you specified did not match the calculated checksum.",
                )
            if upload is not None:
                with self.state.lock:
                    upload.parts[int(req.params["partNumber"])] = (crc, len(body))
            return
        if upload_id is None:
            return
        with self.state.lock:
            upload = self.state.uploads.get(upload_id)
        if upload is None or claimed is None:
            return
        body = read_body(environ)
        numbers = [int(n) for n in re.findall(rb"<PartNumber>\s*(\d+)\s*</PartNumber>", body)]
        if any(n not in upload.parts for n in numbers):
            return  # a part this store never received whole: moto answers InvalidPart
        combined = 0
        for n in numbers:
            crc, size = upload.parts[n]
            combined = awscrt.checksums.combine_crc64nvme(combined, crc, size) if size else combined
        if claimed != crc64_header(combined):
            raise S3Error(
                400,
                "BadDigest",
                "The CRC64NVME you specified did not match the calculated checksum.",
            )

    def log(self, record: dict[str, Any]) -> None:
        with self.log_lock, open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def drain(environ: dict[str, Any]) -> None:
        try:
            read_body(environ)
        except (OSError, ValueError):
            pass

    def refuse(self, req: Incoming, err: S3Error, start_response: Any) -> list[bytes]:
        request_id = secrets.token_hex(8).upper()
        host_id = base64.b64encode(secrets.token_bytes(57)).decode()
        elements = [("Code", err.code), ("Message", err.message), *err.extra]
        elements += [("RequestId", request_id), ("HostId", host_id)]
        xml = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in elements)
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{xml}</Error>'.encode()
        headers = [
            ("Content-Type", "application/xml"),
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", host_id),
            *err.headers.items(),
        ]
        if req.method == "HEAD":
            body = b""
        else:
            headers.append(("Content-Length", str(len(body))))
        req.record["status"] = err.status
        self.log(req.record)
        reason = {
            301: "Moved Permanently",
            400: "Bad Request",
            403: "Forbidden",
            503: "Slow Down",
        }.get(err.status, "Error")
        start_response(f"{err.status} {reason}", headers)
        return [body]

    # ------------------------------------------------------------------ the checks

    def check(self, req: Incoming, environ: dict[str, Any]) -> None:
        authz = req.headers.get("authorization")
        v4_query = "X-Amz-Algorithm" in req.params
        v2_query = "AWSAccessKeyId" in req.params or (
            "Signature" in req.params and "Expires" in req.params
        )
        if authz is not None:
            if authz.startswith(ALGORITHM + " "):
                req.record["auth"] = "v4-header"
            elif authz.startswith("AWS "):
                req.record["auth"] = "v2-header"
            else:
                req.record["auth"] = "unsupported"
        elif v4_query:
            req.record["auth"] = "v4-query"
        elif v2_query:
            req.record["auth"] = "v2-query"
        if authz is not None and (v4_query or v2_query):
            raise S3Error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be "
                "specified",
                [("ArgumentName", "Authorization"), ("ArgumentValue", authz)],
            )
        auth = req.record["auth"]
        if auth in ("v2-header", "v2-query"):
            if auth == "v2-header":
                req.record["access_key"] = authz[4:].split(":", 1)[0] if authz else None
            else:
                req.record["access_key"] = req.params.get("AWSAccessKeyId")
            raise S3Error(400, "InvalidRequest", MSG_SIGV2)
        if auth == "unsupported":
            raise S3Error(
                400,
                "InvalidArgument",
                "Unsupported Authorization Type",
                [("ArgumentName", "Authorization"), ("ArgumentValue", authz or "")],
            )

        if req.bucket is not None and not self.state.take_token(req.bucket):
            raise S3Error(503, "SlowDown", "Please reduce your request rate.")

        settings = self.state.bucket(req.bucket) if req.bucket is not None else None
        if auth == "anonymous":
            if (
                settings is not None
                and settings.public
                and not settings.requester_pays
                and req.key
                and req.method in ("GET", "HEAD")
            ):
                # moto refuses anonymous reads of objects whose ACL is not public-read; the
                # public flag is this store's to enforce, so moto sees an (unchecked) signature.
                region = bucket_region(req.bucket or "") or "us-east-1"
                environ["HTTP_AUTHORIZATION"] = (
                    f"{ALGORITHM} Credential=anonymous/20000101/{region}/s3/aws4_request, "
                    "SignedHeaders=host, Signature=0"
                )
                return
            raise S3Error(403, "AccessDenied", "Access Denied")

        query = auth == "v4-query"
        sig = parse_v4(req, query)

        payload_hash = "UNSIGNED-PAYLOAD"
        if not query:
            declared = req.headers.get("x-amz-content-sha256")
            if declared is None:
                raise S3Error(
                    400,
                    "InvalidRequest",
                    "Missing required header for this request: x-amz-content-sha256",
                )
            if declared not in PAYLOAD_KEYWORDS and not HEX64.match(declared):
                raise S3Error(
                    400,
                    "InvalidArgument",
                    "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                    "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
                    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, "
                    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD, "
                    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER or a valid sha256 value.",
                    [("ArgumentName", "x-amz-content-sha256"), ("ArgumentValue", declared)],
                )
            payload_hash = declared
            req.record["payload"] = declared if declared in PAYLOAD_KEYWORDS else "sha256"
        elif "x-amz-content-sha256" in req.headers:
            payload_hash = req.headers["x-amz-content-sha256"]

        self.check_region(req, sig)

        cred = self.state.lookup(sig.access_key)
        if cred is None:
            raise S3Error(
                403, "InvalidAccessKeyId", MSG_UNKNOWN_KEY, [("AWSAccessKeyId", sig.access_key)]
            )
        now = time.time()
        if cred.token is None:
            if sig.token is not None:
                raise S3Error(400, "InvalidToken", MSG_BAD_TOKEN, [("Token-0", sig.token)])
        else:
            if sig.token is None:
                raise S3Error(
                    403,
                    "InvalidAccessKeyId",
                    MSG_UNKNOWN_KEY,
                    [("AWSAccessKeyId", sig.access_key)],
                )
            if not hmac.compare_digest(sig.token.encode(), cred.token.encode()):
                raise S3Error(400, "InvalidToken", MSG_BAD_TOKEN, [("Token-0", sig.token)])
            if cred.expires_at is not None and now >= cred.expires_at:
                raise S3Error(400, "ExpiredToken", MSG_EXPIRED_TOKEN, [("Token-0", sig.token)])

        if not query:
            if abs(now - sig.timestamp) > MAX_SKEW_S:
                raise S3Error(
                    403,
                    "RequestTimeTooSkewed",
                    MSG_SKEW,
                    [
                        ("RequestTime", sig.amz_date),
                        ("ServerTime", iso(now)),
                        ("MaxAllowedSkewMilliseconds", str(MAX_SKEW_S * 1000)),
                    ],
                )
        else:
            assert sig.expires is not None
            if sig.timestamp - now > MAX_SKEW_S:
                raise S3Error(403, "AccessDenied", "Request is not valid yet")
            if now > sig.timestamp + sig.expires:
                raise S3Error(
                    403,
                    "AccessDenied",
                    "Request has expired",
                    [
                        ("X-Amz-Expires", str(sig.expires)),
                        ("Expires", iso(sig.timestamp + sig.expires)),
                        ("ServerTime", iso(now)),
                    ],
                )

        signed = set(sig.signed_headers)
        unsigned = [n for n in sorted(req.headers) if n.startswith("x-amz-") and n not in signed]
        if "host" not in signed:
            unsigned.insert(0, "host")
        if unsigned:
            raise S3Error(
                403, "AccessDenied", MSG_NOT_SIGNED, [("HeadersNotSigned", ", ".join(unsigned))]
            )

        self.check_signature(req, sig, cred, payload_hash)

        if not query and HEX64.match(payload_hash):
            body = read_body(environ)
            actual = sha256(body).hexdigest()
            if actual != payload_hash:
                raise S3Error(
                    400,
                    "XAmzContentSHA256Mismatch",
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                    [
                        ("ClientComputedContentSHA256", payload_hash),
                        ("S3ComputedContentSHA256", actual),
                    ],
                )

        if settings is not None and settings.requester_pays and not self.is_create_bucket(req):
            payer = req.headers.get("x-amz-request-payer") or req.params.get("x-amz-request-payer")
            if payer != "requester":
                raise S3Error(403, "AccessDenied", "Access Denied")

    @staticmethod
    def is_create_bucket(req: Incoming) -> bool:
        return req.method == "PUT" and not req.key and not req.raw_query

    def check_region(self, req: Incoming, sig: SigV4) -> None:
        if req.bucket is None or self.is_create_bucket(req):
            return
        expected = bucket_region(req.bucket)
        if expected is None or expected == sig.region:
            return
        headers = {"x-amz-bucket-region": expected}
        if self.state.region_mode == 301:
            raise S3Error(
                301,
                "PermanentRedirect",
                MSG_REDIRECT,
                [("Endpoint", req.host), ("Bucket", req.bucket)],
                headers,
            )
        wrong = f"the region '{sig.region}' is wrong; expecting '{expected}'"
        if sig.query:
            raise S3Error(
                400,
                "AuthorizationQueryParametersError",
                QUERY_CREDENTIAL + wrong,
                [("Region", expected)],
                headers,
            )
        raise S3Error(
            400,
            "AuthorizationHeaderMalformed",
            HEADER_MALFORMED + wrong,
            [("Region", expected)],
            headers,
        )

    @staticmethod
    def check_signature(req: Incoming, sig: SigV4, cred: Credential, payload_hash: str) -> None:
        headers = {name: req.headers.get(name, "") for name in sig.signed_headers}
        request = AWSRequest(
            method=req.method,
            url="http://strict.invalid" + canonical_path(req.raw_path),
            headers=headers,
            data=b"",
        )
        request.context.update(
            timestamp=sig.amz_date,
            signed_headers=sig.signed_headers,
            canonical_query=canonical_query(req.raw_query, sig.query),
            payload_hash=payload_hash,
        )
        signer = _Verifier(
            Credentials(cred.access_key, cred.secret_key, cred.token), "s3", sig.region
        )
        canonical = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical)
        expected = signer.signature(string_to_sign, request)
        if not hmac.compare_digest(expected.encode(), sig.signature.encode()):
            raise S3Error(
                403,
                "SignatureDoesNotMatch",
                MSG_SIGNATURE,
                [
                    ("AWSAccessKeyId", sig.access_key),
                    ("StringToSign", string_to_sign),
                    ("SignatureProvided", sig.signature),
                    ("StringToSignBytes", " ".join(f"{b:02x}" for b in string_to_sign.encode())),
                    ("CanonicalRequest", canonical),
                    ("CanonicalRequestBytes", " ".join(f"{b:02x}" for b in canonical.encode())),
                ],
            )

    # ------------------------------------------------------------------ control API

    def control(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ["PATH_INFO"][len(CONTROL_PREFIX) :].strip("/")
        try:
            raw = read_body(environ)
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ControlError(400, "JSON object expected")
            status, answer = self.control_action(method, path, body)
        except ControlError as err:
            status, answer = err.status, {"error": str(err)}
        except (ValueError, TypeError) as err:
            status, answer = 400, {"error": str(err)}
        data = json.dumps(answer).encode()
        start_response(
            f"{status} {'OK' if status == 200 else 'Error'}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def control_action(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        state = self.state
        if path == "credentials" and method == "POST":
            return 200, self.mint(float(body["ttl"]), body.get("advertised_ttl"))
        if path == "revoke" and method == "POST":
            return 200, {
                "revoked": self.revoke(body.get("access_key_id"), body.get("all_temporary"))
            }
        if path.startswith("buckets/") and method in ("GET", "PUT", "POST"):
            name = path[len("buckets/") :]
            settings = state.bucket(name)
            with state.lock:
                if "rate" in body:
                    rate = body["rate"]
                    if rate is not None and float(rate) <= 0:
                        raise ControlError(400, "rate must be positive or null")
                    settings.rate = None if rate is None else float(rate)
                    settings.tokens = max(settings.rate or 0.0, 1.0)
                    settings.stamp = time.monotonic()
                if "requester_pays" in body:
                    settings.requester_pays = bool(body["requester_pays"])
                if "public" in body:
                    settings.public = bool(body["public"])
                return 200, settings.as_json()
        if path == "config" and method in ("GET", "PUT", "POST"):
            if "region_mode" in body:
                mode = int(body["region_mode"])
                if mode not in (400, 301):
                    raise ControlError(400, "region_mode must be 400 or 301")
                with state.lock:
                    state.region_mode = mode
            if "path_prefix" in body:
                prefix = str(body["path_prefix"]).rstrip("/")
                if prefix and not prefix.startswith("/"):
                    raise ControlError(400, "path_prefix must start with /")
                with state.lock:
                    state.path_prefix = prefix
            if "hold_conditional" in body:
                with state.released:
                    state.hold_conditional = bool(body["hold_conditional"])
                    state.released.notify_all()
            return 200, {
                "region_mode": state.region_mode,
                "path_prefix": state.path_prefix,
                "hold_conditional": state.hold_conditional,
            }
        if path == "counters" and method == "GET":
            return 200, state.counters()
        if path == "counters" and method == "DELETE":
            with state.lock:
                state.requests = state.accepted = 0
                state.refused = {}
            return 200, state.counters()
        if path == "reset" and method == "POST":
            with state.lock:
                state.buckets.clear()
                state.region_mode = 400
                state.path_prefix = ""
                state.add_default_credentials()
            with state.released:
                state.hold_conditional = False
                state.released.notify_all()
            return 200, {}
        raise ControlError(404, f"no control action {method} /_strict/{path}")

    def mint(self, ttl: float, advertised_ttl: Any) -> dict[str, Any]:
        now = time.time()
        advertised = ttl if advertised_ttl is None else float(advertised_ttl)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
        cred = Credential(
            access_key="ASIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
            secret_key=base64.b64encode(secrets.token_bytes(30)).decode(),
            token=base64.b64encode(secrets.token_bytes(120)).decode(),
            expires_at=now + ttl,
            temporary=True,
        )
        with self.state.lock:
            self.state.credentials[cred.access_key] = cred
        return {
            "Version": 1,
            "AccessKeyId": cred.access_key,
            "SecretAccessKey": cred.secret_key,
            "SessionToken": cred.token,
            "Expiration": iso(now + advertised),
        }

    def revoke(self, access_key: Any, all_temporary: Any) -> list[str]:
        now = time.time()
        revoked = []
        with self.state.lock:
            for key, cred in list(self.state.credentials.items()):
                if key == access_key or (all_temporary and cred.temporary):
                    if cred.token is None:
                        del self.state.credentials[key]
                    else:
                        cred.expires_at = now
                    revoked.append(key)
        return revoked


# --------------------------------------------------------------------------- TLS


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA (``ca.pem``) and a server certificate it issued; returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiodcp strictstore test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    x509.DNSName("localhost"),
                    x509.DNSName("*.localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


# --------------------------------------------------------------------------- checksum answers


class ChecksumAnswers:
    """S3's answers to ``x-amz-checksum-mode`` (a WSGI middleware in front of moto's app).

    S3 returns an object's checksum only to a GET or HEAD that asks for it
    (``x-amz-checksum-mode: ENABLED``) and reads the whole object: a ranged GET gets none (a
    full-object checksum says nothing about a range). Every object has one: the checksum it was
    uploaded with (a multipart upload's ``-N`` composite included), else, for an object
    uploaded without any, the CRC64NVME S3 has computed for every new object since December
    2024. moto keeps the first kind; the second is computed here from the object's bytes
    (cached per object and ETag)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._crc64: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method = str(environ.get("REQUEST_METHOD", "")).upper()
        req = parse_request(environ) if method in ("GET", "HEAD") else None
        if req is None or not req.bucket or not req.key or req.raw_query.startswith(b"uploadId"):
            return self.app(environ, start_response)
        bucket, key = req.bucket, req.key
        wanted = req.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
        whole = "range" not in req.headers

        def answer(status: str, headers: Any, *args: Any) -> Any:
            given = [(k, v) for k, v in headers if k.lower().startswith("x-amz-checksum-")]
            kept = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum-")]
            if wanted and whole and status.startswith("200"):
                kept += self.full_object(bucket, key, given, dict(kept))
            return start_response(status, kept, *args)

        return self.app(environ, answer)

    def full_object(
        self, bucket: str, key: str, given: list[tuple[str, str]], headers: dict[str, str]
    ) -> list[tuple[str, str]]:
        """The checksum headers of the whole object: moto's, else its CRC64NVME."""
        values = [(k, v) for k, v in given if k.lower() != "x-amz-checksum-type"]
        declared = next((v.upper() for k, v in given if k.lower() == "x-amz-checksum-type"), "")
        etag = next((v for k, v in headers.items() if k.lower() == "etag"), "")
        parts = re.search(r'-([0-9]+)"?$', etag)
        if values:
            # moto answers a multipart upload's composite CRC32/CRC32C without its "-<parts>"
            # (and without a type); S3 gives both
            composite = declared == "COMPOSITE" or any("-" in v for _, v in values)
            if not declared and parts is not None:
                composite = composite or any(
                    k.lower() != "x-amz-checksum-crc64nvme" for k, _ in values
                )
            if composite and parts is not None:
                values = [(k, v if "-" in v else f"{v}-{parts.group(1)}") for k, v in values]
            return [*values, ("x-amz-checksum-type", "COMPOSITE" if composite else "FULL_OBJECT")]
        cache_key = (bucket, key, etag)
        with self._lock:
            cached = self._crc64.get(cache_key)
        if cached is None:
            where = s3_backends.bucket_accounts.get(bucket)
            if where is None:
                return []
            partition, account_id = where
            value = s3_backends[account_id][partition].get_object(bucket, key).value
            crc = awscrt.checksums.crc64nvme(value)
            cached = base64.b64encode(crc.to_bytes(8, "big")).decode("ascii")
            with self._lock:
                self._crc64[cache_key] = cached
        return [("x-amz-checksum-crc64nvme", cached), ("x-amz-checksum-type", "FULL_OBJECT")]


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ca-dir", required=True)
    parser.add_argument("--region-mode", type=int, choices=(400, 301), default=400)
    args = parser.parse_args()
    _, cert_path, key_path = make_tls_files(Path(args.ca_dir))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    state = StrictState(region_mode=args.region_mode)
    moto = ChecksumAnswers(DomainDispatcherApplication(create_backend_app))
    app = StrictStore(moto, state, args.log)
    servers = [
        make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler, **kw)
        for port, kw in ((args.port, {}), (args.tls_port, {"ssl_context": context}))
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    sys.stdout.write(f"PORTS {servers[0].server_address[1]} {servers[1].server_address[1]}\n")
    sys.stdout.flush()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
