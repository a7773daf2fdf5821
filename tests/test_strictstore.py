"""The strict S3 store (tests/strictstore.py) refuses and accepts requests as AWS S3 does.

Valid requests come from boto3 and aiobotocore; tampered ones are signed with botocore's own
signers (S3SigV4Auth, S3SigV4QueryAuth, HmacV1Auth) and then altered and sent with http.client.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import os
import ssl
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote, urlsplit

import aiobotocore.session
import boto3
import botocore.session
import pytest
from botocore import UNSIGNED
from botocore.auth import HmacV1Auth, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, SSLError

from conftest import StrictServer

TESTING = Credentials("testing", "testing", "testing")
NO_RETRY = Config(retries={"total_max_attempts": 1})
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

MSG_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method."
)
MSG_UNKNOWN_KEY = "The AWS Access Key Id you provided does not exist in our records."
MSG_SIGV2 = (
    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256."
)
MSG_NOT_SIGNED = "There were headers present in the request which were not signed"
MSG_REDIRECT = (
    "The bucket you are attempting to access must be addressed using the specified endpoint. "
    "Please send all future requests to this endpoint."
)

TRICKY_KEYS = [
    "with space/a b.txt",
    "plus+sign=equals.bin",
    "unicode/ünïcødé-日本語.txt",
    "tilde~/x~y",
    "nested/deeper/still/leaf",
    "double//slash",
    "/leading-slash",
    "dots/./x/../y",
    "percent%41/and&amp?q#h",
]


# --------------------------------------------------------------------------- helpers


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, str]:
        root = ET.fromstring(self.body)
        assert root.tag == "Error"
        return {child.tag: child.text or "" for child in root}


def send(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    connect_port: int | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """One raw request to 127.0.0.1 (whatever host the URL names goes in the Host header)."""
    parts = urlsplit(url)
    port = connect_port or parts.port
    assert port is not None
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", port, context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        headers = {"Host": parts.netloc, **(headers or {})}
        conn.request(method, target, body=body or None, headers=headers)
        response = conn.getresponse()
        return Answer(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def sign(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    region: str = "us-east-1",
    credentials: Credentials = TESTING,
    when: dt.datetime | None = None,
    signer: type[S3SigV4Auth] = S3SigV4Auth,
) -> tuple[str, dict[str, str]]:
    """botocore's SigV4 header signing of a request; returns (url, headers) to send."""
    request = AWSRequest(method=method, url=url, headers=headers or {}, data=body)
    now = when or dt.datetime.now(dt.UTC)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        signer(credentials, "s3", region).add_auth(request)
    return request.url, dict(request.headers.items())


def presign(
    url: str,
    *,
    method: str = "GET",
    expires: int = 300,
    region: str = "us-east-1",
    credentials: Credentials = TESTING,
    headers: dict[str, str] | None = None,
    when: dt.datetime | None = None,
) -> str:
    request = AWSRequest(method=method, url=url, headers=headers or {})
    now = when or dt.datetime.now(dt.UTC)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        S3SigV4QueryAuth(credentials, "s3", region, expires=expires).add_auth(request)
    return str(request.url)


def client_error(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as info:
        call(*args, **kwargs)
    response: dict[str, Any] = info.value.response
    return response


def assert_error(answer: Answer, status: int, code: str, message: str) -> dict[str, str]:
    assert answer.status == status, answer
    error = answer.error()
    assert (error["Code"], error["Message"]) == (code, message)
    assert error["RequestId"] and error["HostId"]
    return error


def object_url(server: StrictServer, bucket: str, key: str) -> str:
    return f"{server.endpoint_url}/{bucket}/{quote(key, safe='/~')}"


@pytest.fixture
def s3s(strict_server: StrictServer) -> Any:
    return strict_server.client(config=NO_RETRY)


@pytest.fixture
def obj(s3s: Any, strict_bucket: str) -> tuple[str, str, bytes]:
    data = bytes(range(256)) * 4
    s3s.put_object(Bucket=strict_bucket, Key="obj.bin", Body=data)
    return strict_bucket, "obj.bin", data


@pytest.fixture(autouse=True)
def _clean_server_state(strict_server: StrictServer) -> Any:
    yield
    strict_server.reset()


# --------------------------------------------------------------------------- valid requests


def test_boto3_tricky_keys_and_presigned_urls(
    strict_server: StrictServer, s3s: Any, strict_bucket: str
) -> None:
    for i, key in enumerate(TRICKY_KEYS):
        body = f"{i}:{key}".encode()
        s3s.put_object(Bucket=strict_bucket, Key=key, Body=body)
        assert s3s.get_object(Bucket=strict_bucket, Key=key)["Body"].read() == body
        url = s3s.generate_presigned_url("get_object", Params={"Bucket": strict_bucket, "Key": key})
        assert send(url).body == body
    listed = s3s.list_objects_v2(Bucket=strict_bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(TRICKY_KEYS)


async def test_aiobotocore_tricky_keys(strict_server: StrictServer, strict_bucket: str) -> None:
    session = aiobotocore.session.get_session()
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
    async with session.create_client(
        "s3", region_name="us-east-1", endpoint_url=strict_server.endpoint_url, config=config
    ) as client:
        for key in TRICKY_KEYS:
            put = await client.put_object(Bucket=strict_bucket, Key=key, Body=key.encode())
            response = await client.get_object(
                Bucket=strict_bucket, Key=key, Range="bytes=1-", IfMatch=put["ETag"]
            )
            async with response["Body"] as stream:
                assert await stream.read() == key.encode()[1:]
    async with session.create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=strict_server.tls_endpoint_url,
        config=config,
        verify=str(strict_server.ca_path),
    ) as client:
        await client.put_object(Bucket=strict_bucket, Key="tls/aio", Body=b"over tls")
        response = await client.get_object(Bucket=strict_bucket, Key="tls/aio")
        async with response["Body"] as stream:
            assert await stream.read() == b"over tls"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_upload_file_small_and_multipart(
    strict_server: StrictServer, strict_bucket: str, tmp_path: Path, tls: bool
) -> None:
    client = strict_server.client(tls=tls, config=NO_RETRY)
    small = tmp_path / "small"
    small.write_bytes(b"tiny")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(9 * 1024 * 1024))  # > 8 MiB: multipart, two parts
    strict_server.clear_log()
    client.upload_file(str(small), strict_bucket, "small")
    client.upload_file(str(big), strict_bucket, "big")
    client.put_object(Bucket=strict_bucket, Key="put", Body=b"put body")
    assert client.get_object(Bucket=strict_bucket, Key="small")["Body"].read() == b"tiny"
    assert client.get_object(Bucket=strict_bucket, Key="big")["Body"].read() == big.read_bytes()
    assert client.get_object(Bucket=strict_bucket, Key="put")["Body"].read() == b"put body"
    log = strict_server.requests()
    assert all(r["code"] is None and r["auth"] == "v4-header" for r in log)
    parts = [r for r in log if "partNumber" in r["query"]]
    assert len(parts) == 2
    # Over HTTP botocore signs the body hash; over TLS it streams with a checksum trailer.
    expected = "STREAMING-UNSIGNED-PAYLOAD-TRAILER" if tls else "sha256"
    assert {r["payload"] for r in parts} == {expected}


def test_unsigned_and_streaming_signed_payloads_pass_through(
    strict_server: StrictServer, s3s: Any, strict_bucket: str
) -> None:
    class Unsigned(S3SigV4Auth):  # type: ignore[misc]
        def payload(self, request: AWSRequest) -> str:
            return "UNSIGNED-PAYLOAD"

    url = object_url(strict_server, strict_bucket, "unsigned")
    url, headers = sign("PUT", url, body=b"no hash", signer=Unsigned)
    assert headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert send(url, "PUT", headers, b"no hash").status == 200
    assert s3s.get_object(Bucket=strict_bucket, Key="unsigned")["Body"].read() == b"no hash"

    # STREAMING-AWS4-HMAC-SHA256-PAYLOAD: aws-chunked body with chained chunk signatures.
    chunks = [b"a" * 70000, b"b" * 1234]
    data = b"".join(chunks)
    stream_hdr = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    chunk_header_len = len(";chunk-signature=") + 64 + 4
    encoded_len = sum(len(f"{len(c):x}") + chunk_header_len + len(c) for c in [*chunks, b""])

    class Streaming(S3SigV4Auth):  # type: ignore[misc]
        def payload(self, request: AWSRequest) -> str:
            return stream_hdr

    url = object_url(strict_server, strict_bucket, "streamed")
    request = AWSRequest(
        method="PUT",
        url=url,
        headers={
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(len(data)),
            "Content-Length": str(encoded_len),
        },
    )
    signer = Streaming(TESTING, "s3", "us-east-1")
    signer.add_auth(request)
    previous = request.headers["Authorization"].rsplit("Signature=", 1)[1]
    scope = signer.credential_scope(request)
    body = b""
    for chunk in [*chunks, b""]:
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                request.context["timestamp"],
                scope,
                previous,
                EMPTY_SHA256,
                hashlib.sha256(chunk).hexdigest(),
            ]
        )
        previous = signer.signature(string_to_sign, request)
        body += f"{len(chunk):x};chunk-signature={previous}\r\n".encode() + chunk + b"\r\n"
    assert len(body) == encoded_len
    answer = send(url, "PUT", dict(request.headers.items()), body)
    assert answer.status == 200, answer
    assert s3s.get_object(Bucket=strict_bucket, Key="streamed")["Body"].read() == data
    assert strict_server.requests()[-2]["payload"] == stream_hdr


def test_presigned_range_and_if_match_unsigned_but_amz_headers_refused(
    strict_server: StrictServer, s3s: Any, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, data = obj
    etag = s3s.head_object(Bucket=bucket, Key=key)["ETag"]
    url = s3s.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    answer = send(url, headers={"Range": "bytes=10-19", "If-Match": etag})
    assert (answer.status, answer.body) == (206, data[10:20])
    assert send(url, headers={"Range": "bytes=0-1", "If-Match": '"0000"'}).status == 412
    answer = send(url, headers={"x-amz-meta-extra": "1", "X-Amz-Foo": "2"})
    error = assert_error(answer, 403, "AccessDenied", MSG_NOT_SIGNED)
    assert error["HeadersNotSigned"] == "x-amz-foo, x-amz-meta-extra"
    # Signed with botocore's presigner directly: the same rules.
    url = presign(object_url(strict_server, bucket, key))
    assert send(url, headers={"Range": "bytes=-3"}).body == data[-3:]


# --------------------------------------------------------------------------- signature


def test_signature_mismatch_header_and_query(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = obj
    url, headers = sign("GET", object_url(strict_server, bucket, key))
    assert send(url, headers=headers).status == 200
    auth = headers["Authorization"]
    flipped = auth[:-1] + ("0" if auth[-1] != "0" else "1")
    answer = send(url, headers={**headers, "Authorization": flipped})
    error = assert_error(answer, 403, "SignatureDoesNotMatch", MSG_SIGNATURE)
    assert error["AWSAccessKeyId"] == "testing"
    assert error["SignatureProvided"] == flipped.rsplit("=", 1)[1]
    assert error["StringToSign"].startswith("AWS4-HMAC-SHA256\n")
    assert error["CanonicalRequest"].startswith(f"GET\n/{bucket}/{key}\n")

    signed = presign(object_url(strict_server, bucket, key))
    assert send(signed).status == 200
    tail = signed[-1]
    answer = send(signed[:-1] + ("0" if tail != "0" else "1"))
    assert_error(answer, 403, "SignatureDoesNotMatch", MSG_SIGNATURE)
    # Any other query parameter changed after signing breaks it as well.
    answer = send(signed.replace("X-Amz-Expires=300", "X-Amz-Expires=301"))
    assert_error(answer, 403, "SignatureDoesNotMatch", MSG_SIGNATURE)


def test_signed_header_changed_after_signing(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = obj
    url, headers = sign(
        "GET", object_url(strict_server, bucket, key), headers={"Range": "bytes=0-3"}
    )
    assert "range" in headers["Authorization"]
    assert send(url, headers=headers).status == 206
    answer = send(url, headers={**headers, "Range": "bytes=0-4"})
    assert_error(answer, 403, "SignatureDoesNotMatch", MSG_SIGNATURE)
    # Host is signed: the same signature presented under another Host header fails.
    answer = send(url, headers={**headers, "Host": "localhost:1"})
    assert_error(answer, 403, "SignatureDoesNotMatch", MSG_SIGNATURE)


def test_unsigned_amz_header_refused_in_header_form(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = obj
    url, headers = sign("GET", object_url(strict_server, bucket, key))
    answer = send(url, headers={**headers, "x-amz-request-payer": "requester"})
    error = assert_error(answer, 403, "AccessDenied", MSG_NOT_SIGNED)
    assert error["HeadersNotSigned"] == "x-amz-request-payer"
    # The session token too must be signed in the header form.
    no_token = Credentials("testing", "testing")
    url, headers = sign("GET", object_url(strict_server, bucket, key), credentials=no_token)
    answer = send(url, headers={**headers, "X-Amz-Security-Token": "testing"})
    error = assert_error(answer, 403, "AccessDenied", MSG_NOT_SIGNED)
    assert error["HeadersNotSigned"] == "x-amz-security-token"


def test_body_hash_checked(strict_server: StrictServer, s3s: Any, strict_bucket: str) -> None:
    url = object_url(strict_server, strict_bucket, "hashed")
    url, headers = sign("PUT", url, body=b"original")
    answer = send(url, "PUT", headers, b"tampered")
    error = assert_error(
        answer,
        400,
        "XAmzContentSHA256Mismatch",
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    )
    assert error["ClientComputedContentSHA256"] == hashlib.sha256(b"original").hexdigest()
    assert error["S3ComputedContentSHA256"] == hashlib.sha256(b"tampered").hexdigest()
    assert send(url, "PUT", headers, b"original").status == 200
    # The connection-level refusal drained the body; the object is the valid one.
    assert s3s.get_object(Bucket=strict_bucket, Key="hashed")["Body"].read() == b"original"

    no_hash = {k: v for k, v in headers.items() if k != "X-Amz-Content-SHA256"}
    answer = send(url, "PUT", no_hash, b"original")
    assert_error(
        answer,
        400,
        "InvalidRequest",
        "Missing required header for this request: x-amz-content-sha256",
    )


def test_unknown_key_missing_and_wrong_token(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = obj
    unknown = strict_server.client(
        aws_access_key_id="AKIANOTAREALKEY00000", aws_secret_access_key="x", aws_session_token=None
    )
    error = client_error(unknown.get_object, Bucket=bucket, Key=key)["Error"]
    assert (error["Code"], error["Message"]) == ("InvalidAccessKeyId", MSG_UNKNOWN_KEY)
    assert error["AWSAccessKeyId"] == "AKIANOTAREALKEY00000"

    # "testing" carries a session token: without it the key is unknown, as S3 says for ASIA keys.
    no_token = strict_server.client(
        aws_access_key_id="testing", aws_secret_access_key="testing", aws_session_token=None
    )
    error = client_error(no_token.get_object, Bucket=bucket, Key=key)["Error"]
    assert (error["Code"], error["Message"]) == ("InvalidAccessKeyId", MSG_UNKNOWN_KEY)

    wrong = strict_server.client(
        aws_access_key_id="testing", aws_secret_access_key="testing", aws_session_token="nope"
    )
    response = client_error(wrong.get_object, Bucket=bucket, Key=key)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    error = response["Error"]
    assert (error["Code"], error["Message"]) == (
        "InvalidToken",
        "The provided token is malformed or otherwise invalid.",
    )
    url = presign(
        object_url(strict_server, bucket, key), credentials=Credentials("testing", "testing")
    )
    assert_error(send(url), 403, "InvalidAccessKeyId", MSG_UNKNOWN_KEY)


def test_credential_scope_checks(strict_server: StrictServer, obj: tuple[str, str, bytes]) -> None:
    bucket, key, _ = obj
    url, headers = sign("GET", object_url(strict_server, bucket, key))
    auth = headers["Authorization"]
    date = headers["X-Amz-Date"][:8]
    cases = {
        "/s3/aws4_request": (
            "/ec2/aws4_request",
            'incorrect service "ec2". This endpoint belongs to "s3".',
        ),
        "/s3/aws4_request,": (
            "/s3/aws4_requestx,",
            'incorrect terminal "aws4_requestx". This endpoint uses "aws4_request".',
        ),
        f"/{date}/": ("/20200101/", "Invalid credential date. Date is not the same as X-Amz-Date."),
    }
    for old, (new, detail) in cases.items():
        answer = send(url, headers={**headers, "Authorization": auth.replace(old, new, 1)})
        assert_error(
            answer,
            400,
            "AuthorizationHeaderMalformed",
            "The authorization header is malformed; " + detail,
        )
    answer = send(url, headers={**headers, "Authorization": auth.split(", Signature")[0]})
    assert_error(
        answer,
        400,
        "AuthorizationHeaderMalformed",
        "The authorization header is malformed; the authorization header requires three "
        "components: Credential, SignedHeaders, and Signature.",
    )
    no_date = {k: v for k, v in headers.items() if k != "X-Amz-Date"}
    answer = send(url, headers=no_date)
    assert_error(
        answer, 403, "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header"
    )

    signed = presign(object_url(strict_server, bucket, key))
    answer = send(signed.replace("%2Fs3%2F", "%2Fec2%2F"))
    assert_error(
        answer,
        400,
        "AuthorizationQueryParametersError",
        'Error parsing the X-Amz-Credential parameter; incorrect service "ec2". '
        'This endpoint belongs to "s3".',
    )
    answer = send(signed.replace("X-Amz-SignedHeaders=host&", ""))
    assert_error(
        answer,
        400,
        "AuthorizationQueryParametersError",
        "Query-string authentication version 4 requires the X-Amz-Algorithm, X-Amz-Credential, "
        "X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires parameters.",
    )


def test_request_time_too_skewed(strict_server: StrictServer, obj: tuple[str, str, bytes]) -> None:
    bucket, key, _ = obj
    url = object_url(strict_server, bucket, key)
    fourteen = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=14)
    url, headers = sign("GET", url, when=fourteen)
    assert send(url, headers=headers).status == 200
    sixteen = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=16)
    url, headers = sign("GET", url, when=sixteen)
    error = assert_error(
        send(url, headers=headers),
        403,
        "RequestTimeTooSkewed",
        "The difference between the request time and the current time is too large.",
    )
    assert error["RequestTime"] == headers["X-Amz-Date"]
    assert error["ServerTime"].endswith("Z")
    assert error["MaxAllowedSkewMilliseconds"] == "900000"


def test_presigned_expiry_and_week_limit(
    strict_server: StrictServer, s3s: Any, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = obj
    params = {"Bucket": bucket, "Key": key}
    url = s3s.generate_presigned_url("get_object", Params=params, ExpiresIn=604801)
    assert_error(
        send(url),
        400,
        "AuthorizationQueryParametersError",
        "X-Amz-Expires must be less than a week (in seconds) that is; 604800",
    )
    url = s3s.generate_presigned_url("get_object", Params=params, ExpiresIn=604800)
    assert send(url).status == 200
    # Signed 20 s ago for 10 s: expired (no sleep needed; a sleeping case is in the token test).
    past = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=20)
    url = presign(object_url(strict_server, bucket, key), expires=10, when=past)
    error = assert_error(send(url), 403, "AccessDenied", "Request has expired")
    assert error["X-Amz-Expires"] == "10"
    assert error["Expires"] == (past + dt.timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error["ServerTime"].endswith("Z")


# --------------------------------------------------------------------------- mechanisms


def test_sigv2_refused_header_and_query(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = obj
    v2 = strict_server.client(config=Config(signature_version="s3"))
    response = client_error(v2.get_object, Bucket=bucket, Key=key)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert (response["Error"]["Code"], response["Error"]["Message"]) == (
        "InvalidRequest",
        MSG_SIGV2,
    )
    url = v2.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    assert "AWSAccessKeyId=testing" in url and "Signature=" in url
    assert_error(send(url), 400, "InvalidRequest", MSG_SIGV2)
    request = AWSRequest(method="GET", url=object_url(strict_server, bucket, key))
    HmacV1Auth(TESTING).add_auth(request)
    assert request.headers["Authorization"].startswith("AWS testing:")
    assert_error(
        send(request.url, headers=dict(request.headers.items())), 400, "InvalidRequest", MSG_SIGV2
    )
    log = strict_server.requests()
    assert [r["auth"] for r in log[-3:]] == ["v2-header", "v2-query", "v2-header"]


def test_two_mechanisms_refused(strict_server: StrictServer, obj: tuple[str, str, bytes]) -> None:
    bucket, key, _ = obj
    url = presign(object_url(strict_server, bucket, key))
    _, headers = sign("GET", object_url(strict_server, bucket, key))
    error = assert_error(
        send(url, headers=headers),
        400,
        "InvalidArgument",
        "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature "
        "query string parameter or the Authorization header should be specified",
    )
    assert error["ArgumentName"] == "Authorization"


def test_anonymous_refused_unless_public(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, data = obj
    anonymous = strict_server.client(config=Config(signature_version=UNSIGNED))
    error = client_error(anonymous.get_object, Bucket=bucket, Key=key)["Error"]
    assert (error["Code"], error["Message"]) == ("AccessDenied", "Access Denied")
    assert_error(send(object_url(strict_server, bucket, key)), 403, "AccessDenied", "Access Denied")
    head = send(object_url(strict_server, bucket, key), "HEAD")
    assert (head.status, head.body) == (403, b"")

    strict_server.public(bucket)
    assert anonymous.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert anonymous.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(data)
    error = client_error(anonymous.put_object, Bucket=bucket, Key="anon", Body=b"x")["Error"]
    assert error["Code"] == "AccessDenied"
    error = client_error(anonymous.list_objects_v2, Bucket=bucket)["Error"]
    assert error["Code"] == "AccessDenied"
    assert strict_server.requests()[-1]["auth"] == "anonymous"


# --------------------------------------------------------------------------- regions


@pytest.fixture
def eu_bucket(strict_server: StrictServer) -> str:
    name = f"strict-eu-{uuid.uuid4().hex[:12]}"
    # A us-east-1 signature may create a bucket in any region, as on S3.
    strict_server.client("us-east-1").create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    strict_server.client("eu-west-1").put_object(Bucket=name, Key="k", Body=b"eu data")
    return name


def test_create_bucket_regions(strict_server: StrictServer) -> None:
    eu = strict_server.client("eu-west-1", config=NO_RETRY)
    name = f"strict-eu-{uuid.uuid4().hex[:12]}"
    eu.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    assert eu.get_bucket_location(Bucket=name)["LocationConstraint"] == "eu-west-1"
    # Another region's endpoint cannot create a bucket without/with another constraint (moto = S3).
    error = client_error(eu.create_bucket, Bucket=f"{name}-x")["Error"]
    assert error["Code"] == "IllegalLocationConstraintException"


def test_region_mismatch_400(strict_server: StrictServer, eu_bucket: str) -> None:
    url = object_url(strict_server, eu_bucket, "k")
    signed_url, headers = sign("GET", url)
    answer = send(signed_url, headers=headers)
    error = assert_error(
        answer,
        400,
        "AuthorizationHeaderMalformed",
        "The authorization header is malformed; the region 'us-east-1' is wrong; "
        "expecting 'eu-west-1'",
    )
    assert error["Region"] == "eu-west-1"
    assert answer.headers["x-amz-bucket-region"] == "eu-west-1"

    signed_url, headers = sign("HEAD", url)
    answer = send(signed_url, "HEAD", headers)
    assert (answer.status, answer.body) == (400, b"")
    assert answer.headers["x-amz-bucket-region"] == "eu-west-1"

    answer = send(presign(url))
    error = assert_error(
        answer,
        400,
        "AuthorizationQueryParametersError",
        "Error parsing the X-Amz-Credential parameter; the region 'us-east-1' is wrong; "
        "expecting 'eu-west-1'",
    )
    assert error["Region"] == "eu-west-1"
    assert answer.headers["x-amz-bucket-region"] == "eu-west-1"
    assert send(presign(url, region="eu-west-1")).body == b"eu data"

    # botocore's region redirector recovers from the 400 (GET: <Region>; HEAD: the header).
    strict_server.clear_log()
    us = strict_server.client("us-east-1")
    assert us.get_object(Bucket=eu_bucket, Key="k")["Body"].read() == b"eu data"
    fresh = strict_server.client("us-east-1")
    assert fresh.head_object(Bucket=eu_bucket, Key="k")["ContentLength"] == 7
    log = [(r["method"], r["status"], r["code"], r["region"]) for r in strict_server.requests()]
    assert log == [
        ("GET", 400, "AuthorizationHeaderMalformed", "us-east-1"),
        ("GET", 200, None, "eu-west-1"),
        ("HEAD", 400, "AuthorizationHeaderMalformed", "us-east-1"),
        ("HEAD", 200, None, "eu-west-1"),
    ]


def test_region_mismatch_301(strict_server: StrictServer, eu_bucket: str) -> None:
    strict_server.region_mode(301)
    url = object_url(strict_server, eu_bucket, "k")
    signed_url, headers = sign("GET", url)
    answer = send(signed_url, headers=headers)
    error = assert_error(answer, 301, "PermanentRedirect", MSG_REDIRECT)
    assert error["Bucket"] == eu_bucket
    assert error["Endpoint"] == urlsplit(strict_server.endpoint_url).netloc
    assert answer.headers["x-amz-bucket-region"] == "eu-west-1"
    signed_url, headers = sign("HEAD", url)
    answer = send(signed_url, "HEAD", headers)
    assert (answer.status, answer.body) == (301, b"")
    assert answer.headers["x-amz-bucket-region"] == "eu-west-1"

    strict_server.clear_log()
    us = strict_server.client("us-east-1")
    assert us.get_object(Bucket=eu_bucket, Key="k")["Body"].read() == b"eu data"
    # The redirector caches the bucket's region: the next call is signed for eu-west-1 at once.
    assert us.head_object(Bucket=eu_bucket, Key="k")["ContentLength"] == 7
    log = [(r["method"], r["status"], r["region"]) for r in strict_server.requests()]
    assert log == [("GET", 301, "us-east-1"), ("GET", 200, "eu-west-1"), ("HEAD", 200, "eu-west-1")]


# --------------------------------------------------------------------------- bucket settings


def test_requester_pays(strict_server: StrictServer, s3s: Any, obj: tuple[str, str, bytes]) -> None:
    bucket, key, data = obj
    strict_server.requester_pays(bucket)
    error = client_error(s3s.get_object, Bucket=bucket, Key=key)["Error"]
    assert (error["Code"], error["Message"]) == ("AccessDenied", "Access Denied")
    got = s3s.get_object(Bucket=bucket, Key=key, RequestPayer="requester")
    assert got["Body"].read() == data
    url = presign(object_url(strict_server, bucket, key))
    assert_error(send(url), 403, "AccessDenied", "Access Denied")
    url = presign(object_url(strict_server, bucket, key) + "?x-amz-request-payer=requester")
    assert send(url).body == data
    url = presign(
        object_url(strict_server, bucket, key), headers={"x-amz-request-payer": "requester"}
    )
    assert send(url, headers={"x-amz-request-payer": "requester"}).body == data
    strict_server.requester_pays(bucket, False)
    assert s3s.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_throttle(strict_server: StrictServer, s3s: Any, obj: tuple[str, str, bytes]) -> None:
    bucket, key, _ = obj
    rate, attempts = 4, 12
    strict_server.throttle(bucket, rate)
    strict_server.clear_log()
    start = time.monotonic()
    codes = []
    for _ in range(attempts):
        try:
            s3s.head_object(Bucket=bucket, Key=key)
            codes.append("ok")
        except ClientError as err:
            codes.append(str(err.response["ResponseMetadata"]["HTTPStatusCode"]))
    elapsed = time.monotonic() - start
    assert set(codes) <= {"ok", "503"}
    assert rate <= codes.count("ok") <= rate + int(elapsed * rate) + 1
    assert codes[:rate] == ["ok"] * rate  # burst
    refused = [r for r in strict_server.requests() if r["code"] == "SlowDown"]
    assert len(refused) == codes.count("503") and all(r["status"] == 503 for r in refused)
    # The stimulus, not a wait for a state: one token's worth of time refills the bucket.
    time.sleep(1.0 / rate + 0.05)
    assert s3s.head_object(Bucket=bucket, Key=key)["ContentLength"]
    # The error a refused GET gets, at a rate no slow machine refills between two requests
    # (one token, then none for 1000 s): the first passes, the second is refused.
    strict_server.throttle(bucket, 0.001)
    assert s3s.head_object(Bucket=bucket, Key=key)["ContentLength"]
    error = client_error(s3s.get_object, Bucket=bucket, Key=key)["Error"]
    assert (error["Code"], error["Message"]) == ("SlowDown", "Please reduce your request rate.")
    strict_server.throttle(bucket, None)
    for _ in range(10):
        s3s.head_object(Bucket=bucket, Key=key)


# --------------------------------------------------------------------------- TLS


def test_tls_with_and_without_the_ca(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, data = obj
    tls = strict_server.client(tls=True)
    assert tls.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    port = urlsplit(strict_server.tls_endpoint_url).port
    ip = strict_server.client(
        endpoint_url=f"https://127.0.0.1:{port}", verify=str(strict_server.ca_path)
    )
    assert ip.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    with pytest.raises(SSLError):
        no_ca = strict_server.client(endpoint_url=strict_server.tls_endpoint_url, config=NO_RETRY)
        no_ca.list_buckets()
    context = ssl.create_default_context(cafile=str(strict_server.ca_path))
    url = presign(f"{strict_server.tls_endpoint_url}/{bucket}/{key}")
    assert send(url, context=context).body == data
    with pytest.raises(ssl.SSLCertVerificationError):
        send(url, context=ssl.create_default_context())


def test_virtual_hosted_host_header_used_as_received(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, data = obj
    port = urlsplit(strict_server.endpoint_url).port
    url, headers = sign("GET", f"http://{bucket}.localhost:{port}/{key}")
    assert send(url, headers=headers, connect_port=port).body == data


# --------------------------------------------------------------------------- credentials


def test_temporary_credentials_expire(
    strict_server: StrictServer, obj: tuple[str, str, bytes]
) -> None:
    bucket, key, data = obj
    minted = strict_server.mint_credentials(ttl=3)
    assert minted["Version"] == 1 and minted["AccessKeyId"].startswith("ASIA")
    expiration = dt.datetime.fromisoformat(minted["Expiration"].replace("Z", "+00:00"))
    assert 0 < (expiration - dt.datetime.now(dt.UTC)).total_seconds() <= 3
    creds = Credentials(minted["AccessKeyId"], minted["SecretAccessKey"], minted["SessionToken"])
    client = strict_server.client(
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.token,
        config=NO_RETRY,
    )
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    long_url = strict_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=2
    )  # signed with the long-term key
    # X-Amz-Date has whole seconds, so a URL signed late in a second has lost up to
    # one second of its X-Amz-Expires: 2 s leaves at least 1 s to send it (signed last, sent
    # at once: nothing slow, such as making a client, runs in between).
    url = presign(object_url(strict_server, bucket, key), credentials=creds, expires=2)
    assert send(url).body == data
    time.sleep(3.1)  # the stimulus, not a wait for a state: past both expiries
    error = client_error(client.get_object, Bucket=bucket, Key=key)["Error"]
    assert (error["Code"], error["Message"]) == ("ExpiredToken", "The provided token has expired.")
    # Both the token and the URL have expired: the token's expiry is reported first.
    assert_error(send(url), 400, "ExpiredToken", "The provided token has expired.")
    assert_error(send(long_url), 403, "AccessDenied", "Request has expired")


def test_credential_process_and_revocation(
    strict_server: StrictServer,
    obj: tuple[str, str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, key, data = obj
    script = tmp_path / "creds.py"
    script.write_text(
        "import json, sys, urllib.request\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "request = urllib.request.Request(sys.argv[1], data=json.dumps(\n"
        "    {'ttl': 600, 'advertised_ttl': 3600}).encode(), method='POST')\n"
        "print(opener.open(request).read().decode())\n"
    )
    config = tmp_path / "config"
    config.write_text(
        "[profile strict]\n"
        f"credential_process = {sys.executable} {script} "
        f"{strict_server.endpoint_url}/_strict/credentials\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    session = boto3.Session(botocore_session=botocore.session.Session(profile="strict"))
    frozen = session.get_credentials().get_frozen_credentials()
    assert frozen.access_key.startswith("ASIA")
    client = session.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=strict_server.endpoint_url,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    # The client believes its credentials are good for an hour; the server revokes them now.
    assert strict_server.revoke(frozen.access_key) == [frozen.access_key]
    error = client_error(client.get_object, Bucket=bucket, Key=key)["Error"]
    assert error["Code"] == "ExpiredToken"

    other = strict_server.mint_credentials(ttl=600)
    assert other["AccessKeyId"] in strict_server.revoke(all_temporary=True)
    assert "testing" not in strict_server.revoke(all_temporary=True)


def test_counters_and_log_fields(strict_server: StrictServer, obj: tuple[str, str, bytes]) -> None:
    bucket, key, _ = obj
    strict_server.reset_counters()
    strict_server.clear_log()
    s3 = strict_server.client()
    s3.head_object(Bucket=bucket, Key=key)
    anonymous = strict_server.client(config=Config(signature_version=UNSIGNED))
    client_error(anonymous.get_object, Bucket=bucket, Key=key)
    client_error(anonymous.get_object, Bucket=bucket, Key=key)
    assert strict_server.counters() == {
        "requests": 3,
        "accepted": 1,
        "refused": {"AccessDenied": 2},
        "held": 0,
    }
    ok, refused = strict_server.requests()[:2]
    assert ok == {
        "method": "HEAD",
        "path": f"/{bucket}/{key}",
        "query": "",
        "range": None,
        "if_match": None,
        "status": 200,
        "code": None,
        "auth": "v4-header",
        "region": "us-east-1",
        "access_key": "testing",
        "payload": "sha256",
    }
    assert (refused["status"], refused["code"], refused["auth"]) == (
        403,
        "AccessDenied",
        "anonymous",
    )
    assert refused["access_key"] is None and refused["region"] is None
    strict_server.reset_counters()
    assert strict_server.counters() == {"requests": 0, "accepted": 0, "refused": {}, "held": 0}
    # The control API is neither logged nor counted.
    assert len(strict_server.requests()) == 3


# --------------------------------------------------------------------------- checksum mode


def test_checksums_are_answered_for_whole_objects_only(
    strict_server: StrictServer, strict_bucket: str
) -> None:
    """x-amz-checksum-mode: ENABLED gets the full-object checksum on a HEAD and a whole GET (the
    uploaded one, else the CRC64NVME S3 gives every object), never on a ranged GET or without
    the mode."""
    import base64

    import awscrt.checksums

    s3 = strict_server.client()
    body = os.urandom(300_000)
    crc64 = base64.b64encode(awscrt.checksums.crc64nvme(body).to_bytes(8, "big")).decode()
    s3.put_object(Bucket=strict_bucket, Key="k64", Body=body, ChecksumAlgorithm="CRC64NVME")
    s3.put_object(Bucket=strict_bucket, Key="k32", Body=body, ChecksumAlgorithm="CRC32")
    # A client that sends no checksum at all (as S3 sees curl or an old SDK).
    plain = strict_server.client(config=Config(request_checksum_calculation="when_required"))
    plain.put_object(Bucket=strict_bucket, Key="knone", Body=body)

    def checksums(response: dict[str, Any]) -> dict[str, str]:
        headers = response["ResponseMetadata"]["HTTPHeaders"]
        return {k: v for k, v in headers.items() if k.startswith("x-amz-checksum-")}

    for key in ("k64", "knone"):
        head = s3.head_object(Bucket=strict_bucket, Key=key, ChecksumMode="ENABLED")
        assert checksums(head) == {
            "x-amz-checksum-crc64nvme": crc64,
            "x-amz-checksum-type": "FULL_OBJECT",
        }, key
        got = s3.get_object(Bucket=strict_bucket, Key=key, ChecksumMode="ENABLED")
        assert got["Body"].read() == body
        assert checksums(got)["x-amz-checksum-crc64nvme"] == crc64
        ranged = s3.get_object(
            Bucket=strict_bucket, Key=key, ChecksumMode="ENABLED", Range="bytes=0-99"
        )
        assert ranged["Body"].read() == body[:100]
        assert checksums(ranged) == {}, key
        assert checksums(s3.head_object(Bucket=strict_bucket, Key=key)) == {}, key
    crc32 = checksums(s3.head_object(Bucket=strict_bucket, Key="k32", ChecksumMode="ENABLED"))
    assert set(crc32) == {"x-amz-checksum-crc32", "x-amz-checksum-type"}
