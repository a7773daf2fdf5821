"""Loopback credential services, shaped as AWS documents them: STS, container credentials, IMDS.

One threaded HTTP server on 127.0.0.1 (a free port) plays three services, each handing out
the credentials ``mint()`` returns (a dict with ``AccessKeyId``, ``SecretAccessKey``,
``SessionToken``, ``Expiration``: tests/strictstore.py's ``mint_credentials`` gives ones it
accepts; the benchmarks give fixed ones):

- STS (``POST <any path>``, form-encoded, ``Action=AssumeRoleWithWebIdentity``,
  ``Version=2011-06-15``): the ``WebIdentityToken`` must equal ``web_token`` and ``RoleArn``
  be set; answers ``AssumeRoleWithWebIdentityResponse`` XML (``AssumedRoleUser``,
  ``Credentials``, ``ResponseMetadata``), or STS's ``ErrorResponse`` XML
  (``InvalidIdentityToken`` for a wrong token, ``InvalidParameterValue`` otherwise).
  ``Action=AssumeRole`` (a POST signed in the Authorization header, as botocore sends it, or
  a presigned GET, as aiodcp sends it): the SigV4 signature is verified (``verify_sigv4``,
  service ``sts``) against the secret and session token ``signers`` gives for the access key
  (``SignatureDoesNotMatch``, ``InvalidClientTokenId``, ``ExpiredToken`` otherwise); answers
  ``AssumeRoleResponse`` XML.
- Container credentials (``GET /container/credentials``): the ``Authorization`` header must
  equal ``container_token`` when one is set (ECS / EKS Pod Identity); JSON ``AccessKeyId``,
  ``SecretAccessKey``, ``Token``, ``Expiration``, ``RoleArn``, ``AccountId``.
- IMDSv2 (``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` -> a
  session token; ``GET /latest/meta-data/iam/security-credentials/`` -> the role's name;
  ``GET .../security-credentials/<role>`` -> JSON ``Code``, ``LastUpdated``, ``Type``,
  ``AccessKeyId``, ``SecretAccessKey``, ``Token``, ``Expiration``). GETs without a valid
  token are refused with 401 when ``imds_v1`` is False (IMDSv2 only, as on instances that
  require it), served otherwise.

Every request is logged (``requests``: method, path, the headers that matter, the STS form);
``fail(path_prefix, status, times)`` makes the next requests to a path answer an error, and
``stall(path_prefix, seconds, times)`` holds them (for timeouts).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote
from xml.sax.saxutils import escape

__all__ = ["CredentialServer", "fixed_credentials", "verify_sigv4"]

STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
ROLE = "aiodcp-test-role"


def fixed_credentials(ttl_s: float = 3600.0) -> Callable[[], dict[str, Any]]:
    """A ``mint`` giving new random credentials that say they expire ``ttl_s`` from now."""

    def mint() -> dict[str, Any]:
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=ttl_s)
        return {
            "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
            "SecretAccessKey": secrets.token_urlsafe(30),
            "SessionToken": secrets.token_urlsafe(90),
            "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    return mint


@dataclass
class _Fault:
    prefix: str
    status: int
    times: int
    stall_s: float = 0.0


@dataclass
class CredentialServer:
    """The three services on one loopback port (see the module docstring)."""

    mint: Callable[[], dict[str, Any]]
    web_token: str = "header.payload.signature"
    container_token: str | None = None
    imds_v1: bool = False
    signers: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Access key -> (secret, session token) AssumeRole accepts signatures of."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    issued: list[dict[str, Any]] = field(default_factory=list)
    _faults: list[_Fault] = field(default_factory=list)
    _tokens: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CredentialServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def fail(self, prefix: str, status: int, times: int = 1) -> None:
        with self._lock:
            self._faults.append(_Fault(prefix, status, times))

    def stall(self, prefix: str, seconds: float, times: int = 1) -> None:
        with self._lock:
            self._faults.append(_Fault(prefix, 0, times, seconds))

    def paths(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [r["path"] for r in self.requests if method in (None, r["method"])]

    def _fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and path.startswith(fault.prefix):
                    fault.times -= 1
                    return fault
        return None

    def _issue(self) -> dict[str, Any]:
        credentials = self.mint()
        with self._lock:
            self.issued.append(credentials)
        return credentials

    # ---------------------------------------------------------------- the services

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        path, _, raw_query = target.partition("?")
        record: dict[str, Any] = {"method": method, "path": path, "t": time.time()}
        for name in (
            "authorization",
            "x-aws-ec2-metadata-token",
            "x-aws-ec2-metadata-token-ttl-seconds",
            "content-type",
        ):
            if name in headers:
                record[name] = headers[name]
        form = dict(parse_qsl(body.decode("utf-8"))) if method == "POST" else {}
        if method == "GET" and raw_query:
            form = dict(parse_qsl(raw_query))
        if form:
            record["form"] = {k: v for k, v in form.items() if not k.startswith("X-Amz-")}
        with self._lock:
            self.requests.append(record)
        fault = self._fault(path)
        if fault is not None:
            if fault.stall_s:
                time.sleep(fault.stall_s)
            else:
                return fault.status, "text/plain", b"injected failure"
        if method == "PUT" and path == "/latest/api/token":
            if "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                return 400, "text/plain", b"missing ttl"
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._tokens.add(token)
            return 200, "text/plain", token.encode()
        if method == "GET" and path.startswith("/latest/meta-data/iam/security-credentials/"):
            token = headers.get("x-aws-ec2-metadata-token")
            with self._lock:
                valid = token in self._tokens
            if not valid and (token is not None or not self.imds_v1):
                return 401, "text/plain", b"Unauthorized"
            role = path[len("/latest/meta-data/iam/security-credentials/") :]
            if not role:
                return 200, "text/plain", ROLE.encode()
            if role != ROLE:
                return 404, "text/plain", b"Not Found"
            c = self._issue()
            doc = {
                "Code": "Success",
                "LastUpdated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Type": "AWS-HMAC",
                "AccessKeyId": c["AccessKeyId"],
                "SecretAccessKey": c["SecretAccessKey"],
                "Token": c["SessionToken"],
                "Expiration": c["Expiration"],
            }
            return 200, "text/plain", json.dumps(doc, indent=2).encode()
        if method == "GET" and path == "/container/credentials":
            if (
                self.container_token is not None
                and headers.get("authorization") != self.container_token
            ):
                return 401, "application/json", b'{"message": "bad authorization token"}'
            c = self._issue()
            doc = {
                "AccessKeyId": c["AccessKeyId"],
                "SecretAccessKey": c["SecretAccessKey"],
                "Token": c["SessionToken"],
                "Expiration": c["Expiration"],
                "RoleArn": f"arn:aws:iam::123456789012:role/{ROLE}",
                "AccountId": "123456789012",
            }
            return 200, "application/json", json.dumps(doc).encode()
        if method == "POST" and form.get("Action") == "AssumeRoleWithWebIdentity":
            return self._web_identity(form)
        if form.get("Action") == "AssumeRole":
            refusal = verify_sigv4(method, path, raw_query, headers, body, self.signers, "sts")
            record["auth"] = "query" if "X-Amz-Signature" in form else "header"
            if refusal is not None:
                record["refused"] = refusal[0]
                return _sts_error(403, *refusal)
            return self._assume_role(form)
        return 404, "text/plain", b"no such service"

    def _web_identity(self, form: dict[str, str]) -> tuple[int, str, bytes]:
        if form.get("Version") != "2011-06-15" or not form.get("RoleArn"):
            return _sts_error(400, "InvalidParameterValue", "RoleArn and Version are required")
        if form.get("WebIdentityToken") != self.web_token:
            return _sts_error(400, "InvalidIdentityToken", "The web identity token is not valid")
        c = self._issue()
        session = form.get("RoleSessionName", "")
        xml = (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{STS_NS}">\n'
            "  <AssumeRoleWithWebIdentityResult>\n"
            "    <SubjectFromWebIdentityToken>system:serviceaccount:ns:sa"
            "</SubjectFromWebIdentityToken>\n"
            "    <Audience>sts.amazonaws.com</Audience>\n"
            "    <AssumedRoleUser>\n"
            f"      <Arn>arn:aws:sts::123456789012:assumed-role/{ROLE}/{escape(session)}</Arn>\n"
            f"      <AssumedRoleId>AROAEXAMPLE:{escape(session)}</AssumedRoleId>\n"
            "    </AssumedRoleUser>\n"
            "    <Credentials>\n"
            f"      <SessionToken>{escape(c['SessionToken'])}</SessionToken>\n"
            f"      <SecretAccessKey>{escape(c['SecretAccessKey'])}</SecretAccessKey>\n"
            f"      <Expiration>{c['Expiration']}</Expiration>\n"
            f"      <AccessKeyId>{c['AccessKeyId']}</AccessKeyId>\n"
            "    </Credentials>\n"
            "    <Provider>oidc.example</Provider>\n"
            "  </AssumeRoleWithWebIdentityResult>\n"
            "  <ResponseMetadata>\n"
            f"    <RequestId>{secrets.token_hex(16)}</RequestId>\n"
            "  </ResponseMetadata>\n"
            "</AssumeRoleWithWebIdentityResponse>\n"
        )
        return 200, "text/xml", xml.encode()

    def _assume_role(self, form: dict[str, str]) -> tuple[int, str, bytes]:
        if form.get("Version") != "2011-06-15" or not form.get("RoleArn"):
            return _sts_error(400, "InvalidParameterValue", "RoleArn and Version are required")
        c = self._issue()
        session = form.get("RoleSessionName", "")
        xml = (
            f'<AssumeRoleResponse xmlns="{STS_NS}">\n'
            "  <AssumeRoleResult>\n"
            "    <AssumedRoleUser>\n"
            f"      <Arn>arn:aws:sts::123456789012:assumed-role/{ROLE}/{escape(session)}</Arn>\n"
            f"      <AssumedRoleId>AROAEXAMPLE:{escape(session)}</AssumedRoleId>\n"
            "    </AssumedRoleUser>\n"
            "    <Credentials>\n"
            f"      <AccessKeyId>{c['AccessKeyId']}</AccessKeyId>\n"
            f"      <SecretAccessKey>{escape(c['SecretAccessKey'])}</SecretAccessKey>\n"
            f"      <SessionToken>{escape(c['SessionToken'])}</SessionToken>\n"
            f"      <Expiration>{c['Expiration']}</Expiration>\n"
            "    </Credentials>\n"
            "  </AssumeRoleResult>\n"
            "  <ResponseMetadata>\n"
            f"    <RequestId>{secrets.token_hex(16)}</RequestId>\n"
            "  </ResponseMetadata>\n"
            "</AssumeRoleResponse>\n"
        )
        return 200, "text/xml", xml.encode()


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def verify_sigv4(
    method: str,
    path: str,
    raw_query: str,
    headers: dict[str, str],
    body: bytes,
    signers: dict[str, tuple[str, str | None]],
    service: str,
) -> tuple[str, str] | None:
    """Check a SigV4 signature (header or query form) as the service would, from the SigV4
    specification: None if valid, else (code, message). The canonical request is built from
    the request as received: method, path, every query parameter but the signature (decoded,
    re-encoded, sorted), the signed headers, and the payload's SHA-256 (header form) or
    ``UNSIGNED-PAYLOAD`` (query form)."""
    pairs = [
        (unquote(k), unquote(v))
        for k, _, v in (p.partition("=") for p in raw_query.split("&") if p)
    ]
    params = dict(pairs)
    if "X-Amz-Signature" in params:
        credential = params.get("X-Amz-Credential", "")
        signed_names = params.get("X-Amz-SignedHeaders", "").split(";")
        stamp = params.get("X-Amz-Date", "")
        signature = params["X-Amz-Signature"]
        token = params.get("X-Amz-Security-Token")
        payload = "UNSIGNED-PAYLOAD"
        expires = int(params.get("X-Amz-Expires", "0") or 0)
        canonical_pairs = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
    else:
        authorization = headers.get("authorization", "")
        if not authorization.startswith("AWS4-HMAC-SHA256 "):
            return "MissingAuthenticationToken", "Request is missing Authentication Token"
        fields = dict(item.strip().partition("=")[::2] for item in authorization[17:].split(","))
        credential = fields.get("Credential", "")
        signed_names = fields.get("SignedHeaders", "").split(";")
        signature = fields.get("Signature", "")
        stamp = headers.get("x-amz-date", "")
        token = headers.get("x-amz-security-token")
        payload = headers.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
        expires = None
        canonical_pairs = pairs
    access_key, _, scope = credential.partition("/")
    known = signers.get(access_key)
    if known is None:
        return "InvalidClientTokenId", "The security token included in the request is invalid."
    secret, expected_token = known
    if expected_token is not None and token != expected_token:
        return "InvalidClientTokenId", "The security token included in the request is invalid."
    date, region, scope_service, terminal = [*scope.split("/"), "", "", ""][:4]
    if scope_service != service or terminal != "aws4_request" or not stamp.startswith(date):
        return "SignatureDoesNotMatch", "Credential should be scoped to a valid service."
    signed_at = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    age = (datetime.datetime.now(datetime.UTC) - signed_at).total_seconds()
    if (expires is not None and age > expires) or (abs(age) > 900 and expires is None):
        return "ExpiredToken", "The request signature has expired."
    canonical_query = "&".join(
        f"{k}={v}" for k, v in sorted((_encode(k), _encode(v)) for k, v in canonical_pairs)
    )
    canonical_headers = "".join(
        f"{name}:{' '.join(headers.get(name, '').split())}\n" for name in signed_names
    )
    canonical = "\n".join(
        [method, path, canonical_query, canonical_headers, ";".join(signed_names), payload]
    )
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "SignatureDoesNotMatch", "The request signature we calculated does not match."
    return None


def _sts_error(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    xml = (
        f'<ErrorResponse xmlns="{STS_NS}">\n'
        f"  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n"
        f"    <Message>{escape(message)}</Message>\n  </Error>\n"
        f"  <RequestId>{secrets.token_hex(16)}</RequestId>\n</ErrorResponse>\n"
    )
    return status, "text/xml", xml.encode()


def _handler(server: CredentialServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, content_type, payload = server.handle(self.command, self.path, headers, body)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
