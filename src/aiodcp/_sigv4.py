"""AWS Signature Version 4 presigning for S3 GETs, with the standard library only.

Why: presigning through botocore means importing botocore, aiobotocore and aiohttp (~0.25 s of
import and one full garbage collection in a process that holds torch): the first load of a
process would pay that. In the plain case (``_native``) the store signs its URLs here instead.

Data flow: ``Presigner(credentials, region)`` -> ``presign(url_base, path, now, expires,
headers)`` -> the URL ``generate_presigned_url("get_object")`` gives for the same inputs, byte
for byte: ``<url_base><path>?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=...&X-Amz-Date=
...&X-Amz-Expires=...&X-Amz-SignedHeaders=host[;x-amz-request-payer][&X-Amz-Security-Token=...]
&X-Amz-Signature=...`` (botocore's parameter order; the canonical query is sorted). The payload
is ``UNSIGNED-PAYLOAD`` (S3's query form). ``path`` is already encoded (``encode_key``: every
byte but the unreserved ones and ``/``, each once); it is signed as it is sent, never
normalised (S3 does not normalise: ``a//b`` and ``a/./b`` are keys of their own).

Other services' query APIs (STS's AssumeRole, for ``_credentials``) are presigned the same way:
``Presigner(credentials, region, service="sts")`` and their parameters passed as ``query``
(signed, and put in the URL before the ``X-Amz-*`` ones).

Requests with a method and parameters of their own (a save's uploads: PUT of an object or a
part, POST and DELETE of multipart uploads) are signed by ``presign_request(method, url_base,
path, host, query=..., headers=...)``: the same query form, the operation's parameters
(``uploadId``, ``partNumber``, ``uploads``) first in the URL and in the sorted canonical query,
and every header S3 must see signed (``x-amz-checksum-*``, ``if-none-match``, ``if-match``) in
``X-Amz-SignedHeaders``; the body stays ``UNSIGNED-PAYLOAD`` (the CRC64NVME checksum header,
which S3 verifies on receipt, protects it).

Invariants: the signing key (four HMACs) is derived once per (secret, date, region) and reused
for every URL of that UTC day; ``host`` is signed as botocore signs it (the port only when it is
not the scheme's default); every header passed in ``headers`` is signed and must be sent.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from typing import NamedTuple
from urllib.parse import quote

__all__ = ["Credentials", "Presigner", "encode_key", "signed_host"]

_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_QUERY_SAFE = "-_.~"


class Credentials(NamedTuple):
    """One set of credentials, as a signature uses them (``_credentials`` finds and refreshes
    them)."""

    access_key: str
    secret_key: str
    token: str | None = None
    expiry: datetime.datetime | None = None
    """When temporary credentials expire (aware, UTC); None: they do not (static keys)."""

    def __repr__(self) -> str:  # never print the secret
        return (
            f"Credentials(access_key={self.access_key!r}, token={'set' if self.token else None}, "
            f"expiry={self.expiry.isoformat() if self.expiry else None})"
        )


def encode_key(key: str) -> str:
    """An object key as S3 (and botocore) put it in a URL path: UTF-8, every byte percent-encoded
    except the unreserved characters (letters, digits, ``-._~``) and ``/``."""
    return quote(key, safe="/~")


def signed_host(scheme: str, host: str, port: int | None) -> str:
    """The ``host`` header value botocore signs: the port only when it is not the default."""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return host if port is None or port == default else f"{host}:{port}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


class Presigner:
    """Presigns GET URLs for one set of credentials, one region (and one service: S3's unless
    said)."""

    def __init__(self, credentials: Credentials, region: str, service: str = "s3") -> None:
        self.credentials = credentials
        self.region = region
        self.service = service
        self._key_date = ""
        self._key = b""

    def _signing_key(self, date: str) -> bytes:
        if date != self._key_date:  # once per UTC day
            k = _hmac(f"AWS4{self.credentials.secret_key}".encode(), date)
            k = _hmac(k, self.region)
            k = _hmac(k, self.service)
            self._key = _hmac(k, "aws4_request")
            self._key_date = date
        return self._key

    def presign(
        self,
        url_base: str,
        path: str,
        host: str,
        *,
        now: datetime.datetime,
        expires: int,
        headers: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> str:
        """The presigned URL of a GET of ``url_base + path`` (``url_base``: scheme and netloc as
        the endpoint spells them; ``path`` already encoded; ``host`` the signed host header,
        see ``signed_host``), valid ``expires`` seconds from ``now`` (UTC). ``headers``
        (lower-case names) are signed too, and the request must send them; ``query`` (an API's
        parameters, not encoded) is signed and sent before the ``X-Amz-*`` parameters."""
        return self.presign_request(
            "GET",
            url_base,
            path,
            host,
            now=now,
            expires=expires,
            query=tuple(query or ()),
            headers=headers,
        )

    def presign_request(
        self,
        method: str,
        url_base: str,
        path: str,
        host: str,
        *,
        now: datetime.datetime,
        expires: int,
        query: tuple[tuple[str, str], ...] = (),
        headers: dict[str, str] | None = None,
    ) -> str:
        """The presigned URL of a ``method`` request of ``url_base + path`` with the operation's
        ``query`` parameters (name, value; sent before the signature's parameters), valid
        ``expires`` seconds from ``now`` (UTC). ``headers`` (lower-case names) are signed and
        the request must send them with exactly these values."""
        creds = self.credentials
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        date = stamp[:8]
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        signed = {"host": host, **(headers or {})}
        names = sorted(signed)
        signed_headers = ";".join(names)
        params = [
            ("X-Amz-Algorithm", _ALGORITHM),
            ("X-Amz-Credential", f"{creds.access_key}/{scope}"),
            ("X-Amz-Date", stamp),
            ("X-Amz-Expires", str(expires)),
            ("X-Amz-SignedHeaders", signed_headers),
        ]
        if creds.token:
            params.append(("X-Amz-Security-Token", creds.token))
        operation = [(quote(k, safe=_QUERY_SAFE), quote(v, safe=_QUERY_SAFE)) for k, v in query]
        auth = [(quote(k, safe=_QUERY_SAFE), quote(v, safe=_QUERY_SAFE)) for k, v in params]
        canonical_query = "&".join(f"{k}={v}" for k, v in sorted(operation + auth))
        canonical_headers = "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names)
        canonical_request = "\n".join(
            [method, path, canonical_query, canonical_headers, signed_headers, _UNSIGNED_PAYLOAD]
        )
        string_to_sign = "\n".join(
            [_ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._signing_key(date), string_to_sign.encode("utf-8"), hashlib.sha256
        ).hexdigest()
        url_query = "&".join(f"{k}={v}" for k, v in operation + auth)
        return f"{url_base}{path}?{url_query}&X-Amz-Signature={signature}"
