"""aiodcp against a store as strict as AWS S3 (tests/strictstore.py in front of moto).

Every load here must work with zero refused requests in its steady state: SigV4 on every
request (the fast path's presigned URLs included), the bucket's own region, TLS with a private
CA, Requester Pays, dotted bucket names, public buckets read unsigned. The round-trip, fault
and distributed paths run through the strict store once each. (Expiring credentials and
throttling: tests/test_credentials_throttle.py.)
"""

from __future__ import annotations

import asyncio
import copy
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp

from conftest import StrictServer, assert_same, load_local, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy

LOAD_TIMEOUT_S = 60.0


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "big": torch.randn(512, 1024, generator=g),  # 2 MiB: received into its destination
        "half": torch.randn(64, 64, generator=g).half(),
        "ids": torch.arange(4096, dtype=torch.int64),
        "small": [torch.randn(8, 8, generator=g) for _ in range(4)],
        "step": 123,
    }


def template(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, list):
            out[k] = [torch.zeros_like(t) for t in v]
        else:
            out[k] = None
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    state = make_state()
    local = save_checkpoint(copy.deepcopy(state), tmp_path_factory.mktemp("real") / "ck")
    return state, local


@pytest.fixture(autouse=True)
def fresh_store(strict_server: StrictServer) -> None:
    strict_server.reset()


def upload(server: StrictServer, local: Path, bucket: str, region: str = "us-east-1") -> str:
    upload_dir(server.client(region), local, bucket, "ck")
    server.reset_counters()
    server.clear_log()
    return f"s3://{bucket}/ck"


def options(server: StrictServer, **extra: Any) -> dict[str, Any]:
    return {"endpoint_url": server.endpoint_url, "region": "us-east-1", **extra}


async def aload(state: dict[str, Any], url: str, **kwargs: Any) -> tuple[dict[str, Any], Any]:
    out = template(state)
    stats = await asyncio.wait_for(aiodcp.load_checkpoint(out, url, **kwargs), LOAD_TIMEOUT_S)
    return out, stats


def sload(state: dict[str, Any], url: str, **kwargs: Any) -> tuple[dict[str, Any], Any]:
    out = template(state)
    with aiodcp.S3StorageReader(url, **kwargs) as reader:
        dcp.load(out, storage_reader=reader)
        return out, reader.stats


def data_gets(server: StrictServer) -> list[dict[str, Any]]:
    return [r for r in server.requests() if r["method"] == "GET" and r["path"].endswith(".distcp")]


def assert_no_refusals(server: StrictServer) -> None:
    counters = server.counters()
    assert counters["refused"] == {}, counters
    assert counters["accepted"] > 0


# --------------------------------------------------------------------------- SigV4 everywhere


@pytest.mark.parametrize("api", ["async", "sync"])
@pytest.mark.parametrize("addressing_style", ["path", "auto"])
async def test_default_load_signs_every_request_with_sigv4(
    api: str,
    addressing_style: str,
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    strict_bucket: str,
    store_path: dict[str, Any],
) -> None:
    """The load that failed on AWS: data GETs presigned with SigV2. Now every request is SigV4,
    the data GETs through the fast path (presigned query form), and nothing is refused."""
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    kwargs = options(strict_server, addressing_style=addressing_style, **store_path)
    if api == "async":
        out, stats = await aload(state, url, **kwargs)
    else:
        out, stats = await asyncio.to_thread(sload, state, url, **kwargs)
    assert_same(out, state)
    assert_no_refusals(strict_server)
    gets = data_gets(strict_server)
    assert gets and all(r["auth"] == "v4-query" for r in gets), gets
    assert all(r["region"] == "us-east-1" for r in strict_server.requests())
    assert stats.resigned == 0 and stats.throttled == 0


async def test_tls_with_a_private_ca(
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    strict_bucket: str,
    store_path: dict[str, Any],
) -> None:
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    kwargs = options(strict_server, endpoint_url=strict_server.tls_endpoint_url, **store_path)
    with pytest.raises(aiodcp.StorageError, match=r"(?i)certificate|ssl"):
        await aload(state, url, **kwargs, max_attempts=1)
    strict_server.reset_counters()
    strict_server.clear_log()
    out, _ = await aload(state, url, **kwargs, verify=str(strict_server.ca_path))
    assert_same(out, state)
    assert_no_refusals(strict_server)
    gets = data_gets(strict_server)
    assert gets and all(r["auth"] == "v4-query" for r in gets)


async def test_dotted_bucket_over_tls(
    saved: tuple[dict[str, Any], Path], strict_server: StrictServer
) -> None:
    """A bucket name with dots would break the certificate in a virtual host name: botocore
    addresses it path style, and so do the fast path's URLs (they are botocore's)."""
    state, local = saved
    bucket = f"ck.dotted.{uuid.uuid4().hex[:8]}"
    strict_server.client(tls=True).create_bucket(Bucket=bucket)
    upload_dir(strict_server.client(tls=True), local, bucket, "ck")
    strict_server.reset_counters()
    strict_server.clear_log()
    out, _ = await aload(
        state,
        f"s3://{bucket}/ck",
        **options(strict_server, endpoint_url=strict_server.tls_endpoint_url),
        verify=str(strict_server.ca_path),
    )
    assert_same(out, state)
    assert_no_refusals(strict_server)
    gets = data_gets(strict_server)
    assert gets and all(r["path"].startswith(f"/{bucket}/") for r in gets)


# --------------------------------------------------------------------------- regions


@pytest.mark.parametrize("mode", [400, 301])
async def test_bucket_in_another_region_is_discovered(
    mode: int,
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    store_path: dict[str, Any],
) -> None:
    """The client is configured for us-east-1, the bucket lives in eu-west-1. S3 refuses the
    first request naming the right region (400 with <Region>, or 301 PermanentRedirect);
    botocore learns it on the .metadata GET, and every data GET is then signed for it. In the
    plain case the refused .metadata GET is the native one: it goes through botocore, which
    is refused once more before its redirector follows, and botocore signs from then on."""
    state, local = saved
    bucket = f"strict-eu-{uuid.uuid4().hex[:8]}"
    eu = strict_server.client("eu-west-1")
    eu.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    url = upload(strict_server, local, bucket, region="eu-west-1")
    strict_server.region_mode(mode)
    out, stats = await aload(state, url, **options(strict_server, **store_path))
    assert_same(out, state)
    refused = strict_server.counters()["refused"]
    code = "AuthorizationHeaderMalformed" if mode == 400 else "PermanentRedirect"
    # the .metadata GET's first attempt (native, presigned, then botocore's), nothing else
    expected = {code: 1}
    if not store_path:
        expected = (
            {**expected, "AuthorizationQueryParametersError": 1} if mode == 400 else {code: 2}
        )
    assert refused == expected, refused
    gets = data_gets(strict_server)
    assert gets and all(r["region"] == "eu-west-1" and r["auth"] == "v4-query" for r in gets)
    assert stats.resigned == 0


# --------------------------------------------------------------------------- bucket options


async def test_requester_pays(
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    strict_bucket: str,
    store_path: dict[str, Any],
) -> None:
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    strict_server.requester_pays(strict_bucket)
    with pytest.raises(aiodcp.AccessDeniedError):
        await aload(state, url, **options(strict_server, **store_path))
    strict_server.reset_counters()
    strict_server.clear_log()
    out, _ = await aload(
        state, url, **options(strict_server, **store_path), request_payer="requester"
    )
    assert_same(out, state)
    assert_no_refusals(strict_server)
    gets = data_gets(strict_server)
    assert gets and all(r["auth"] == "v4-query" for r in gets)


async def test_public_bucket_unsigned(
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    strict_bucket: str,
    store_path: dict[str, Any],
) -> None:
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    with pytest.raises(aiodcp.AccessDeniedError):
        await aload(state, url, **options(strict_server, **store_path), unsigned=True)
    strict_server.public(strict_bucket)
    strict_server.reset_counters()
    strict_server.clear_log()
    out, _ = await aload(state, url, **options(strict_server, **store_path), unsigned=True)
    assert_same(out, state)
    assert_no_refusals(strict_server)
    assert all(r["auth"] == "anonymous" for r in strict_server.requests())


async def test_presign_keeps_the_clients_signature_version(strict_server: StrictServer) -> None:
    """botocore asks 'choose-signer' which signer presigns: SigV2 ("s3-query") by default in
    us-east-1. aiodcp's store answers with S3's SigV4 query form, and leaves S3 Express session
    auth ("v4-s3express-query", directory buckets) to botocore as it is. (No local store
    implements CreateSession, so directory buckets are not loaded here.)"""
    from aiodcp._store import S3Store

    config = aiodcp.ReaderConfig(endpoint_url=strict_server.endpoint_url, region="us-east-1")
    async with S3Store(config) as store:
        events = (await store.botocore_client()).meta.events

        async def chosen(version: str) -> Any:
            _, response = await events.emit_until_response(
                "choose-signer.s3.GetObject",
                signing_name="s3",
                region_name="us-east-1",
                signature_version=version,
                context={},
            )
            return response

        assert await chosen("v4-query") == "s3v4-query"
        assert await chosen("s3v4-query") == "s3v4-query"
        assert await chosen("v4-s3express-query") == "v4-s3express-query"
        assert await chosen("s3v4") is None  # the client's own requests: untouched


# --------------------------------------------------------------------------- round trip, faults


async def test_round_trip_through_the_strict_store(
    tmp_path: Path, strict_server: StrictServer, strict_bucket: str
) -> None:
    """Several files, every common dtype, a non-tensor value; compared with FileSystemReader."""
    g = torch.Generator().manual_seed(21)
    state: dict[str, Any] = {
        f"{dtype}".split(".")[-1]: (torch.randn(96, 80, generator=g) * 10).to(dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32)
    }
    state["bool"] = torch.rand(300, generator=g) > 0.5
    state["large"] = torch.randn(1024, 768, generator=g)
    state["meta"] = {"lr": 0.1, "name": "strict"}
    local = save_checkpoint(copy.deepcopy(state), tmp_path / "ck", thread_count=3)
    url = upload(strict_server, local, strict_bucket)
    expected = load_local(copy.deepcopy(state), local)
    out = {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"lr": 0.0, "name": ""}
        for k, v in state.items()
    }
    stats = await asyncio.wait_for(
        aiodcp.load_checkpoint(out, url, **options(strict_server), max_gap_size=0), LOAD_TIMEOUT_S
    )
    assert_same(out, expected)
    assert_no_refusals(strict_server)
    assert stats.files == 3


async def test_broken_bodies_resume_through_the_strict_store(
    saved: tuple[dict[str, Any], Path], strict_server: StrictServer, strict_bucket: str
) -> None:
    """Faults on the wire between aiodcp and the strict store: resumed GETs are signed too."""
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    with FaultProxy(strict_server.endpoint_url, seed=7) as proxy:
        proxy.add(Fault.drop(), path_suffix=".distcp", nth=[1, 3, 5])
        proxy.add(Fault.short(), path_suffix=".distcp", nth=[2, 4])
        out, stats = await aload(
            state, url, **options(strict_server, endpoint_url=proxy.endpoint_url), part_size=2**20
        )
        assert proxy.fault_count >= 3
    assert_same(out, state)
    assert stats.retries >= 3 and stats.resumed_bytes > 0
    assert_no_refusals(strict_server)


async def test_held_request_does_not_outlive_its_signature(
    saved: tuple[dict[str, Any], Path], strict_server: StrictServer, strict_bucket: str
) -> None:
    """A GET held back by the network while others go on is still accepted when it arrives:
    nothing in a steady load depends on a URL signed long before."""
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    release = threading.Event()
    with FaultProxy(strict_server.endpoint_url) as proxy:
        rule = proxy.add(Fault.stall(5.0, release=release), path_suffix=".distcp", nth=[1])
        task = asyncio.ensure_future(
            aload(state, url, **options(strict_server, endpoint_url=proxy.endpoint_url))
        )
        assert await asyncio.to_thread(rule.triggered.wait, 30)
        await asyncio.sleep(0.5)  # the stimulus, not a wait for a state: the GET arrives late
        release.set()
        out, _ = await task
    assert_same(out, state)
    assert_no_refusals(strict_server)


# --------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_ranks_load_through_the_strict_store(
    tmp_path: Path, strict_server: StrictServer, strict_bucket: str
) -> None:
    from test_distributed import run_ranks

    local = tmp_path / "ckpt"
    run_ranks(4, ["save", str(local)], {})
    upload_dir(strict_server.client(), local, strict_bucket, "model/step-1")
    strict_server.reset_counters()
    strict_server.clear_log()
    outputs = run_ranks(
        2,
        ["load-async", f"s3://{strict_bucket}/model/step-1"],
        {"TEST_S3_ENDPOINT": strict_server.endpoint_url},
    )
    assert [o.strip().splitlines()[-1] for o in outputs] == ["rank 0 OK", "rank 1 OK"]
    assert_no_refusals(strict_server)
    gets = data_gets(strict_server)
    assert gets and all(r["auth"] == "v4-query" for r in gets)


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize("region", ["us-east-1", "us-west-2", "eu-central-1", "ap-southeast-2"])
@pytest.mark.parametrize("addressing_style", ["auto", "path", "virtual"])
@pytest.mark.parametrize("bucket", ["plain-bucket-name", "dotted.bucket.name"])
async def test_presigned_urls_go_where_the_clients_requests_go(
    region: str, addressing_style: str, bucket: str
) -> None:
    """For AWS endpoints (no endpoint_url): the fast path's URL has the scheme, host and path
    of the request botocore itself would send for the same GET (regional endpoint, virtual or
    path style, path style for dotted names), and is signed SigV4 for the client's region.
    Offline: botocore's request is stopped before it is sent."""
    from aiodcp._store import S3Store

    config = aiodcp.ReaderConfig(region=region, addressing_style=addressing_style)  # type: ignore[arg-type]
    async with S3Store(config) as store:
        sent: list[str] = []

        def stop(request: Any, **kwargs: Any) -> None:
            sent.append(request.url)
            raise RuntimeError("not sent")

        client = await store.botocore_client()  # a plain store (AWS regions) has none yet
        client.meta.events.register_first("before-send.s3", stop)
        with pytest.raises(Exception, match="not sent"):
            await client.get_object(Bucket=bucket, Key="ck/__0_0.distcp")
        signed = await store._fast_url(bucket, "ck/__0_0.distcp")
    assert signed.url is not None
    own = sent[0].split("?")[0]
    assert f"{signed.url.scheme}://{signed.url.host_header}{signed.url.target}".startswith(
        own + "?"
    )
    query = signed.url.target.split("?", 1)[1]
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in query and "Signature=" in query
    assert f"%2F{region}%2Fs3%2Faws4_request" in query
    assert "AWSAccessKeyId" not in query
    if region != "us-east-1":
        assert region in signed.url.host  # never the global endpoint


async def test_endpoint_from_aws_endpoint_url(
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    strict_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No endpoint_url: botocore's AWS_ENDPOINT_URL is where every request goes, fast path
    included, all SigV4."""
    state, local = saved
    url = upload(strict_server, local, strict_bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_server.endpoint_url)
    out, _ = await aload(state, url, region="us-east-1", addressing_style="path")
    assert_same(out, state)
    assert_no_refusals(strict_server)
    gets = data_gets(strict_server)
    assert gets and all(r["auth"] == "v4-query" for r in gets)


def test_cli_reads_a_requester_pays_bucket(
    saved: tuple[dict[str, Any], Path],
    strict_server: StrictServer,
    strict_bucket: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from aiodcp._cli import EXIT_ACCESS_DENIED, main

    _, local = saved
    url = upload(strict_server, local, strict_bucket)
    strict_server.requester_pays(strict_bucket)
    where = ["--endpoint-url", strict_server.endpoint_url, "--region", "us-east-1"]
    assert main(["inspect", url, *where]) == EXIT_ACCESS_DENIED
    capsys.readouterr()
    assert main(["inspect", url, *where, "--request-payer", "requester", "--json"]) == 0
    assert "big" in capsys.readouterr().out
