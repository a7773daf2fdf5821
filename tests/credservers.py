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
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

__all__ = ["CredentialServer", "fixed_credentials"]

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
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
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
        if form:
            record["form"] = form
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
