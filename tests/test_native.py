"""The plain case without botocore: ``_sigv4`` presigning and ``_native`` resolution.

Each URL aiodcp signs itself is compared, byte for byte, with the one botocore 1.43 presigns
for the same inputs at the same frozen time (the store's own botocore client, set up as the
store sets it up: ``_botostore.create_client`` + ``presign_as_requests``) with botocore's own
SigV4 signer. With awscrt installed (an aiodcp dependency) botocore presigns with awscrt's
signer instead, which orders the query parameters differently: the same parameters and the
same signature are checked against it. Then the URLs are sent to tests/strictstore.py (SigV4
verified as S3 does), which must accept them, and refuse an expired one and one signed with a
wrong secret. The store's whole-object GETs (``.metadata``, sizes) are checked against moto.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import botocore.auth
import botocore.crt.auth
import pytest

import aiodcp
import aiodcp._store
from aiodcp._botostore import create_client, presign_as_requests
from aiodcp._native import Plain, plain_case
from aiodcp._sigv4 import Credentials, Presigner, encode_key, signed_host

from conftest import NOT_PLAIN, S3Server, StrictServer

FROZEN = datetime.datetime(2026, 12, 1, 23, 5, 7)
KEYS = [
    "plain/key.distcp",
    "a b/c",
    "ünï/çødé",
    "a+b",
    "t~x",
    "k=v&w",
    "100%",
    "100%25",
    "a//b",
    "/lead",
    "a/./b/../c",
    "q?x#y",
    "*'()!$,;:@",
]
ENDPOINTS = [
    "http://127.0.0.1:9000",
    "http://localhost:9000",
    "https://minio.example:9000",
    "https://minio.example",
    "http://127.0.0.1:80",
    "http://[::1]:9000",
    None,  # AWS S3 itself: the region's endpoint (us-east-1: the global one)
    # endpoints with a path (gateways serving S3 under a prefix)
    "http://127.0.0.1:9000/s3",
    "https://minio.example/s3/",
    "http://gw.example:8080/a/b-c/~u_1.x",
    "http://gw.example/",
]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def env(**values: str) -> dict[str, str]:
    """A clean environment: no config file, the given variables."""
    return {"AWS_CONFIG_FILE": "/nonexistent/aiodcp-test-config", **values}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Any:
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def botocore_url(
    config: aiodcp.ReaderConfig,
    environ: dict[str, str],
    bucket: str,
    key: str,
    *,
    signer: str = "botocore",
) -> str:
    """The URL botocore presigns, with its own SigV4 signer (``signer="botocore"``) or with
    awscrt's (``"crt"``, what botocore uses when awscrt is installed)."""
    classes = {
        "botocore": botocore.auth.S3SigV4QueryAuth,
        "crt": botocore.crt.auth.CrtS3SigV4QueryAuth,
    }
    with environment(environ), _signer(classes[signer]):
        async with contextlib.AsyncExitStack() as stack:
            client = await create_client(config, stack)
            presign_as_requests(client)
            params = {"Bucket": bucket, "Key": key}
            if config.request_payer:
                params["RequestPayer"] = config.request_payer
            url: str = await client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=3600
            )
            return url


@contextlib.contextmanager
def _signer(cls: type) -> Any:
    saved = botocore.auth.AUTH_TYPE_MAPS["s3v4-query"]
    botocore.auth.AUTH_TYPE_MAPS["s3v4-query"] = cls
    try:
        yield
    finally:
        botocore.auth.AUTH_TYPE_MAPS["s3v4-query"] = saved


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: FROZEN)
    frozen_aware = FROZEN.replace(tzinfo=datetime.UTC)
    monkeypatch.setattr(
        botocore.crt.auth,
        "get_current_datetime",
        lambda remove_tzinfo=True: FROZEN if remove_tzinfo else frozen_aware,
    )


def same_parameters(ours: str, theirs: str) -> bool:
    """The same URL up to the order of its query parameters (same signature included)."""
    base, _, query = ours.partition("?")
    other_base, _, other_query = theirs.partition("?")
    return base == other_base and sorted(query.split("&")) == sorted(other_query.split("&"))


def native(config: aiodcp.ReaderConfig, environ: dict[str, str], bucket: str, key: str) -> str:
    plain = plain_case(config, environ)
    assert isinstance(plain, Plain), plain
    url = plain.url(bucket, key, now=FROZEN, expires=3600, payer=config.request_payer)
    assert url is not None
    return url


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("style", ["auto", "path", "virtual"])
@pytest.mark.parametrize(
    ("region", "token", "payer"),
    [
        ("us-east-1", None, None),
        ("eu-west-1", "tok/+=en", None),
        ("ap-southeast-2", "t", "requester"),
    ],
)
async def test_urls_are_byte_identical_to_botocores(
    frozen: None,
    endpoint: str | None,
    style: str,
    region: str,
    token: str | None,
    payer: str | None,
) -> None:
    values = env(AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="s3cr3t/+key")
    if token is not None:
        values["AWS_SESSION_TOKEN"] = token
    config = aiodcp.ReaderConfig(
        endpoint_url=endpoint,
        region=region,
        addressing_style=style,  # type: ignore[arg-type]
        request_payer=payer,  # type: ignore[arg-type]
    )
    for bucket in ("bkt", "my-bucket-1"):
        for key in KEYS:
            ours = native(config, values, bucket, key)
            assert ours == await botocore_url(config, values, bucket, key), (bucket, key)
    # awscrt's signer (botocore's with awscrt installed): same parameters, same signature
    for key in KEYS[:4]:
        ours = native(config, values, "bkt", key)
        assert same_parameters(ours, await botocore_url(config, values, "bkt", key, signer="crt"))


@pytest.mark.parametrize("endpoint", [*ENDPOINTS[:3], None])
async def test_unsigned_urls_are_botocores(frozen: None, endpoint: str | None) -> None:
    config = aiodcp.ReaderConfig(endpoint_url=endpoint, region="us-east-1", unsigned=True)
    for key in KEYS:
        assert native(config, env(), "bkt", key) == await botocore_url(config, env(), "bkt", key)


async def test_region_and_endpoint_come_from_the_environment_as_botocore_reads_them(
    frozen: None, tmp_path: Path
) -> None:
    config = aiodcp.ReaderConfig()
    creds = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    cases = [
        env(**creds, AWS_DEFAULT_REGION="eu-west-3", AWS_ENDPOINT_URL="http://127.0.0.1:9"),
        # AWS_REGION is not botocore's (1.43 reads AWS_DEFAULT_REGION)
        env(
            **creds,
            AWS_DEFAULT_REGION="eu-west-3",
            AWS_REGION="us-west-2",
            AWS_ENDPOINT_URL_S3="http://127.0.0.1:8",
            AWS_ENDPOINT_URL="http://127.0.0.1:9",
        ),
        # the security token wins over the session token (botocore's EnvProvider order)
        env(
            **creds,
            AWS_SECURITY_TOKEN="first",
            AWS_SESSION_TOKEN="second",
            AWS_DEFAULT_REGION="eu-west-3",
            AWS_ENDPOINT_URL="http://127.0.0.1:9",
        ),
    ]
    cfg_file = tmp_path / "config"
    cfg_file.write_text("[default]\nregion = ca-central-1\noutput = json\n[profile other]\ns3 =\n")
    cases.append(
        {
            **creds,
            "AWS_CONFIG_FILE": str(cfg_file),
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        }
    )
    for values in cases:
        assert native(config, values, "bkt", "k") == await botocore_url(
            config, values, "bkt", "k"
        ), values


@pytest.mark.parametrize(
    ("config", "values", "why"),
    [
        ({"fast_http": False}, {}, "fast_http=False"),
        ({"extra": {"user_agent_extra": "x"}}, {}, "extra"),
        ({"profile": "p"}, {}, "profile"),
        ({}, {"AWS_PROFILE": "p"}, "ProfileNotFound"),
        ({}, {"AWS_DEFAULT_PROFILE": "p", "AWS_PROFILE": "default"}, "'p'"),
        ({}, {"HTTPS_PROXY": "http://proxy:3128"}, "HTTPS_PROXY"),
        ({}, {"all_proxy": "socks5://proxy"}, "all_proxy"),
        ({}, {"AWS_USE_FIPS_ENDPOINT": "true"}, "AWS_USE_FIPS_ENDPOINT"),
        ({}, {"AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z"}, "AWS_CREDENTIAL_EXPIRATION"),
        ({}, {"AWS_SECRET_ACCESS_KEY": ""}, "AWS_ACCESS_KEY_ID"),
        ({"endpoint_url": None, "region": "cn-north-1"}, {}, "no endpoint_url"),
        ({"endpoint_url": None, "region": "us-gov-west-1"}, {}, "no endpoint_url"),
        ({"endpoint_url": None, "region": "us-iso-east-1"}, {}, "no endpoint_url"),
        ({"endpoint_url": None, "region": "eu-isoe-west-1"}, {}, "no endpoint_url"),
        ({"endpoint_url": None, "region": "eusc-de-east-1"}, {}, "no endpoint_url"),
        ({"endpoint_url": None, "region": "aws-global"}, {}, "region"),
        ({"endpoint_url": None, "region": "us-east-1-fips"}, {}, "region"),
        ({"endpoint_url": None}, {"AWS_S3_US_EAST_1_REGIONAL_ENDPOINT": "regional"}, "AWS_S3_US"),
        ({"endpoint_url": None}, {"AWS_USE_DUALSTACK_ENDPOINT": "true"}, "DUALSTACK"),
        ({"endpoint_url": None}, {"AWS_S3_USE_ARN_REGION": "true"}, "ARN"),
        ({"region": None}, {}, "no region"),
        ({"region": "aws-global"}, {}, "region"),
        ({"endpoint_url": "https://minio.example/a//b"}, {}, "not of the form"),
        ({"endpoint_url": "https://minio.example/a/./b"}, {}, "not of the form"),
        ({"endpoint_url": "https://minio.example/a%20b"}, {}, "not of the form"),
        ({"endpoint_url": "https://minio.example/.x"}, {}, "not of the form"),
        ({"endpoint_url": "https://minio.example/s3?x=1"}, {}, "not of the form"),
        ({"endpoint_url": "https://MinIO.example"}, {}, "not of the form"),
        # botocore addresses accelerate endpoints virtual-hosted even in auto mode
        ({"endpoint_url": "https://s3-accelerate.amazonaws.com"}, {}, "Acceleration"),
        ({"endpoint_url": "http://s3-accelerate.dualstack.amazonaws.com"}, {}, "Acceleration"),
        ({"addressing_style": "virtual", "endpoint_url": "http://127.1:9"}, {}, "IP"),
    ],
)
def test_what_is_not_plain(config: dict[str, Any], values: dict[str, str], why: str) -> None:
    base = env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK")
    base.update(values)
    options: dict[str, Any] = {"endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"}
    options.update(config)
    result = plain_case(aiodcp.ReaderConfig(**options), base)
    assert isinstance(result, str) and why in result, result


def test_a_config_file_that_sets_more_than_the_region_is_not_plain(tmp_path: Path) -> None:
    path = tmp_path / "config"
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    values = env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_CONFIG_FILE=str(path))
    for text in (
        "[default]\ns3 =\n  addressing_style = virtual\n",
        "[default]\nendpoint_url = http://elsewhere\n",
        "[profile default]\nsso_session = x\n",
        "not an ini file",
    ):
        path.write_text(text)
        assert isinstance(plain_case(config, values), str), text
    path.write_text("[default]\nregion = us-east-1\n[profile x]\nanything = 1\n")
    assert isinstance(plain_case(config, values), Plain)
    # the credentials file's section of the selected profile counts as the profile's
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\ns3 =\n  addressing_style = virtual\n")
    values["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    assert "['s3']" in str(plain_case(config, values))


@pytest.mark.parametrize("bucket", ["dotted.name", "name--x-s3", "UPPER", "ab", "a_b"])
def test_buckets_that_are_not_plain_get_no_native_url(bucket: str) -> None:
    plain = plain_case(
        aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"),
        env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK"),
    )
    assert isinstance(plain, Plain)
    assert plain.url(bucket, "k", now=FROZEN, expires=60, payer=None) is None


def _botocore_regions() -> dict[str, list[str]]:
    """Every region botocore 1.43 lists, by partition (endpoints.json and partitions.json)."""
    import json

    data = Path(botocore.__file__).parent / "data"
    regions: dict[str, set[str]] = {}
    for p in json.loads((data / "endpoints.json").read_text())["partitions"]:
        regions.setdefault(p["partition"], set()).update(p["regions"])
    for p in json.loads((data / "partitions.json").read_text())["partitions"]:
        regions.setdefault(p["id"], set()).update(p["regions"])
    return {name: sorted(names) for name, names in regions.items()}


BOTOCORE_REGIONS = _botocore_regions()
AWS_REGIONS = [r for r in BOTOCORE_REGIONS["aws"] if r != "aws-global"]
# not listed by 1.43.117 but in the aws partition by its regionRegex, as future regions will be
UNLISTED_AWS_REGIONS = ["us-west-7", "ap-east-9", "eu-north-12", "mx-west-1"]
AWS_BUCKETS = ["bkt", "my-bucket-1", "a" * 63, "0123-4567", "x-s3-bucket"]
AWS_KEYS = ["ck/__0_0.distcp", "a b/ünï+~=%", "a//b", "/lead", "k=v&w"]


def test_every_aws_region_is_plain_and_no_other_partitions() -> None:
    """The rule (``_AWS_REGION_RE``) against every region botocore knows: the aws partition's
    commercial regions are plain, no other partition's region is, nor any ``*-global``."""
    assert len(AWS_REGIONS) >= 30 and "us-east-1" in AWS_REGIONS and "mx-central-1" in AWS_REGIONS
    values = env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK")
    for partition, regions in BOTOCORE_REGIONS.items():
        for region in regions:
            plain = plain_case(aiodcp.ReaderConfig(region=region), values)
            expected = partition == "aws" and region != "aws-global"
            assert isinstance(plain, Plain) is expected, (partition, region, plain)
            if isinstance(plain, Plain):
                assert plain.scheme == "https" and plain.host.endswith(".amazonaws.com")


@pytest.mark.parametrize("region", AWS_REGIONS + UNLISTED_AWS_REGIONS)
async def test_aws_urls_are_byte_identical_to_botocores_in_every_region(
    frozen: None, region: str
) -> None:
    """Every aws-partition region botocore 1.43 lists (and a few it would resolve by the
    partition's regex) x addressing x buckets x keys, without an endpoint_url, against
    botocore's presigner set up as the store sets it up."""
    values = env(
        AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="s3cr3t/+key", AWS_SESSION_TOKEN="t"
    )
    for style in ("auto", "path", "virtual"):
        config = aiodcp.ReaderConfig(region=region, addressing_style=style)  # type: ignore[arg-type]
        for bucket in AWS_BUCKETS:
            for key in AWS_KEYS:
                ours = native(config, values, bucket, key)
                assert ours == await botocore_url(config, values, bucket, key), (style, bucket)
                host = ours.split("/")[2]
                suffix = (
                    "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"
                )
                assert host == (suffix if style == "path" else f"{bucket}.{suffix}")


@pytest.mark.parametrize("bucket", ["dotted.name", "name--x-s3", "b--x", "UPPER", "ab", "a_b"])
async def test_aws_buckets_that_are_not_plain_are_botocores(frozen: None, bucket: str) -> None:
    """In auto and virtual mode botocore puts a dotted bucket in the path (TLS), and its rules
    for ``--`` names are its own: no native URL, botocore presigns them."""
    for style in ("auto", "path", "virtual"):
        plain = plain_case(
            aiodcp.ReaderConfig(region="eu-west-1", addressing_style=style),  # type: ignore[arg-type]
            env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK"),
        )
        assert isinstance(plain, Plain)
        assert plain.url(bucket, "k", now=FROZEN, expires=60, payer=None) is None


def test_the_plain_case_verifies_tls_with_botocores_ca_bundle() -> None:
    """AWS is https: the fast path's context verifies the certificate and the host name,
    against the bundle botocore's session would load (``get_cert_path``: certifi's, else
    botocore's own), and only that one, as botocore does. Offline: no handshake."""
    import ssl

    import botocore.httpsession

    from aiodcp._native import ca_file
    from aiodcp._store import _fast_ssl_context

    assert ca_file(True) == botocore.httpsession.get_cert_path(True)
    assert ca_file("/some/ca.pem") == botocore.httpsession.get_cert_path("/some/ca.pem")
    assert ca_file(False) is None
    context = _fast_ssl_context(True)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    reference = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    reference.load_verify_locations(botocore.httpsession.get_cert_path(True))
    assert context.get_ca_certs() == reference.get_ca_certs() != []
    plain = plain_case(
        aiodcp.ReaderConfig(region="eu-west-1"),
        env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK"),
    )
    assert isinstance(plain, Plain) and plain.verify is True


def test_a_redirect_on_a_native_aws_url_leaves_the_native_path() -> None:
    """A bucket in another region answers a URL signed for the store's region with a 301
    (PermanentRedirect), a 307, or a 400 naming the region: each is a region refusal, after
    which botocore (its region redirector) signs the store's URLs (``_leave_native``; on the
    wire: tests/test_real_s3.py's region tests against the strict store)."""
    from aiodcp._store import _refusal_kind

    assert _refusal_kind(301, "PermanentRedirect", "") == "region"
    assert _refusal_kind(307, "TemporaryRedirect", "") == "region"
    assert _refusal_kind(400, "AuthorizationQueryParametersError", "") == "region"
    assert _refusal_kind(301, "", "") == "region"  # a HEAD-like answer without a body


async def test_an_aws_store_is_plain_and_creates_no_client() -> None:
    values = env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_DEFAULT_REGION="us-west-2")
    with environment(values):
        async with aiodcp._store.S3Store(aiodcp.ReaderConfig()) as store:
            assert store.not_plain is None and store._client is None
            signed = await store._native_url("my-bucket", "ck/.metadata")
            assert signed is not None and signed.url is not None
            assert signed.url.host == "my-bucket.s3.us-west-2.amazonaws.com"
            assert signed.url.scheme == "https"


@pytest.mark.parametrize("path", ["native", "botocore"])
async def test_a_store_knows_whether_it_is_aws(path: str) -> None:
    """``is_aws``: the endpoint AWS S3 (which has a checksum for every object, so a verified
    read imports awscrt as it sends its GET), on either path; a custom endpoint is not. Opening
    sends nothing (static credentials)."""
    values = env(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_DEFAULT_REGION="eu-west-1")
    extra = {} if path == "native" else dict(NOT_PLAIN)
    with environment(values):
        async with aiodcp._store.S3Store(aiodcp.ReaderConfig(**extra)) as store:
            if path == "botocore":
                assert store.not_plain is not None and store._client is not None
            assert store.is_aws
        custom = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9", **extra)
        async with aiodcp._store.S3Store(custom) as store:
            assert not store.is_aws
    assert not aiodcp._store.S3Store(aiodcp.ReaderConfig()).is_aws  # not opened: unknown


def test_encoding_and_host() -> None:
    assert encode_key("a b/ü+~=%//x") == "a%20b/%C3%BC%2B~%3D%25//x"
    assert encode_key("100%25") == "100%2525"  # never decoded first: encoded once
    assert signed_host("http", "h", 80) == "h" and signed_host("https", "h", 443) == "h"
    assert signed_host("http", "h", 9000) == "h:9000" and signed_host("http", "::1", 9) == "[::1]:9"
    assert "secret" not in repr(Credentials("ak", "secret", "tok"))


def test_the_signing_key_is_derived_once_per_day(monkeypatch: pytest.MonkeyPatch) -> None:
    presigner = Presigner(Credentials("ak", "sk"), "us-east-1")
    derived: list[str] = []
    original = presigner._signing_key.__func__  # type: ignore[attr-defined]

    def counting(self: Presigner, date: str) -> bytes:
        if date != self._key_date:
            derived.append(date)
        return original(self, date)  # type: ignore[no-any-return]

    monkeypatch.setattr(Presigner, "_signing_key", counting)
    for minute in range(5):
        presigner.presign("http://h", "/b/k", "h", now=FROZEN.replace(minute=minute), expires=60)
    presigner.presign("http://h", "/b/k", "h", now=FROZEN + datetime.timedelta(days=1), expires=60)
    assert derived == ["20261201", "20261202"]


# --------------------------------------------------------------------------- on the wire


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_strict_store_accepts_native_urls_and_refuses_bad_ones(
    strict_server: StrictServer, strict_bucket: str
) -> None:
    s3 = strict_server.client()
    keys = ["plain", "a b/ünï+~=%", "a//b", "/lead"]
    for key in keys:
        s3.put_object(Bucket=strict_bucket, Key=key, Body=key.encode())
    config = aiodcp.ReaderConfig(endpoint_url=strict_server.endpoint_url, region="us-east-1")
    good = env(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_SESSION_TOKEN="testing"
    )
    plain = plain_case(config, good)
    assert isinstance(plain, Plain)
    now = datetime.datetime.now(datetime.UTC)
    for key in keys:
        url = plain.url(strict_bucket, key, now=now, expires=300, payer=None)
        assert url is not None
        assert _get(url) == (200, key.encode()), key
    # expired: signed two hours ago for one minute
    old = plain.url(
        strict_bucket, "plain", now=now - datetime.timedelta(hours=2), expires=60, payer=None
    )
    status, body = _get(old or "")
    assert status == 403 and b"Request has expired" in body, body
    # a wrong secret
    wrong = plain_case(config, {**good, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert isinstance(wrong, Plain)
    status, body = _get(wrong.url(strict_bucket, "plain", now=now, expires=60, payer=None) or "")
    assert status == 403 and b"SignatureDoesNotMatch" in body, body
    # requester pays: signed as a header, which must be sent
    strict_server.requester_pays(strict_bucket)
    try:
        url = plain.url(strict_bucket, "plain", now=now, expires=60, payer="requester") or ""
        assert "x-amz-request-payer" in url
        assert _get(url, {"x-amz-request-payer": "requester"}) == (200, b"plain")
        assert _get(url)[0] == 403
    finally:
        strict_server.requester_pays(strict_bucket, False)


# --------------------------------------------------------------------------- whole objects


@pytest.mark.parametrize("size", [0, 1, 3000, 300_000, 9 * 1024 * 1024])
async def test_whole_objects_and_sizes_through_the_fast_path(
    s3_server: S3Server, bucket: str, size: int
) -> None:
    """``get_object`` reads the whole object in one GET without a Range, however large (the
    body goes into buffers allocated as it arrives); ``object_size`` asks for its first byte.
    (An empty object answers a range with 416 or a 200: either way its bytes are b"".)"""
    body = os.urandom(size)
    s3_server.client().put_object(Bucket=bucket, Key="ck/.metadata", Body=body)
    s3_server.clear_log()
    config = aiodcp.ReaderConfig(
        endpoint_url=s3_server.endpoint_url, region="us-east-1", addressing_style="path"
    )
    async with aiodcp._store.S3Store(config) as store:
        assert store.not_plain is None
        assert await store.get_object(bucket, "ck/.metadata") == body
        assert store.load_started(bucket, "ck/x.distcp") is not None
        assert await store.object_size(bucket, "ck/.metadata") == size
        native_only = store._client is None
    gets = [r for r in s3_server.requests() if r["path"].endswith(".metadata")]
    if size:
        assert native_only
        assert all("Signature=" in r["query"] for r in gets), gets
        assert [r["range"] for r in gets] == [None, "bytes=0-0"], gets


async def test_aws_ca_bundle_does_not_change_what_botocore_verifies_with() -> None:
    """The store passes ``verify`` explicitly (default True), which wins over AWS_CA_BUNDLE
    in botocore (``Session.create_client``): the plain case may ignore the variable."""
    values = env(
        AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_CA_BUNDLE="/nonexistent/ca.pem"
    )
    config = aiodcp.ReaderConfig(endpoint_url="https://minio.example", region="us-east-1")
    assert isinstance(plain_case(config, values), Plain)
    with environment(values):
        async with contextlib.AsyncExitStack() as stack:
            client = await create_client(config, stack)
            assert client._endpoint.http_session._verify is True


async def test_the_botocore_client_is_created_once_for_concurrent_needs(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain store has no client; 32 requests that need one at once (fallbacks) share one
    creation, and closing the store closes it."""
    import aiodcp._botostore

    made: list[object] = []
    create = aiodcp._botostore.create_client

    async def counting(config: aiodcp.ReaderConfig, stack: contextlib.AsyncExitStack) -> Any:
        client = await create(config, stack)
        made.append(client)
        return client

    monkeypatch.setattr(aiodcp._botostore, "create_client", counting)
    config = aiodcp.ReaderConfig(endpoint_url=s3_server.endpoint_url, region="us-east-1")
    store = aiodcp._store.S3Store(config)
    await store.open()
    try:
        assert store._client is None and store.not_plain is None
        with pytest.raises(aiodcp.StorageError, match="no botocore client yet"):
            store.client  # noqa: B018
        clients = await asyncio.gather(*(store.botocore_client() for _ in range(32)))
        assert len(made) == 1 and all(c is made[0] for c in clients)
    finally:
        await store.close()
    with pytest.raises(aiodcp.StorageError, match="closed"):
        await store.botocore_client()
