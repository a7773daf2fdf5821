"""Credentials without botocore (``_credentials``, ``_awsconfig``), compared with botocore's own.

Every source the plain case resolves is set up for real: config and credentials files in a
temporary directory, a ``credential_process`` script, a web identity token file, and
tests/credservers.py on 127.0.0.1 playing STS (AssumeRoleWithWebIdentity), a container
credentials endpoint and IMDSv2. For each setup the credentials aiodcp resolves natively are
compared with the ones botocore 1.43's chain resolves for the same store configuration (the
store's own client, ``_botostore.create_client``): same access key, secret, token and expiry,
and the same requests on the wire. Setups botocore resolves in a way not reproduced here must
not be plain. Loads through tests/strictstore.py (which verifies SigV4 and expires session
tokens) check each source end to end, natively (the ``.metadata`` GET is presigned: the store
never made a botocore client).

Nothing leaves 127.0.0.1: instance metadata is always pointed at the loopback server (or
disabled), STS at ``AWS_ENDPOINT_URL_STS``, and a guard (``loopback_only``) fails any
connection to another address, from aiodcp or botocore.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import aiodcp
import aiodcp._store
from aiodcp._botostore import create_client
from aiodcp._credentials import FetchContext, FetchError, Refresher, sts_url
from aiodcp._native import Plain, plain_case
from aiodcp._sigv4 import Credentials
from credservers import ROLE, CredentialServer, fixed_credentials

from conftest import StrictServer, assert_same, save_checkpoint, upload_dir

FIXED = {
    "AccessKeyId": "ASIAFIXEDEXAMPLE0001",
    "SecretAccessKey": "fixed/secret+key",
    "SessionToken": "fixed-session-token",
    "Expiration": "2031-01-02T03:04:05Z",
}
CONTEXT = FetchContext(ssl_context=lambda verify: ssl.create_default_context())
PROCESS_SCRIPT = """\
import json, sys
doc = {"Version": 1, "AccessKeyId": "ASIAPROCESS" + "".join(sys.argv[1:2]),
       "SecretAccessKey": "process/secret", "SessionToken": "process-token"}
if "--no-expiry" not in sys.argv:
    doc["Expiration"] = "2031-05-06T07:08:09Z"
print(json.dumps(doc))
"""
LOAD_TIMEOUT_S = 60.0  # a hang guard only


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection to an address that is not loopback (aiodcp's or botocore's)."""
    original = socket.socket.connect
    original_ex = socket.socket.connect_ex

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a test connected to {address}, outside 127.0.0.1")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        original(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return original_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@dataclass
class Setup:
    """A temporary home: its files and the environment that points at them."""

    root: Path
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    def process(self, *args: str) -> str:
        """A credential_process command line (python, the script, ``args``)."""
        script = self.root / "process.py"
        script.write_text(PROCESS_SCRIPT)
        quoted = " ".join(f'"{a}"' for a in args)
        return f'"{sys.executable}" "{script}" {quoted}'.strip()

    def token_file(self, text: str = "header.payload.signature") -> str:
        path = self.root / "web-identity-token"
        path.write_text(text)
        return str(path)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """No AWS_* variable but the files' paths and disabled instance metadata; HOME moved."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield Setup(tmp_path, env)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
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


SIGNERS = {
    "AKIABASEFILE": ("base-file-secret", None),
    "AKIAENV": ("e", None),
    FIXED["AccessKeyId"]: (FIXED["SecretAccessKey"], FIXED["SessionToken"]),
}
"""What the loopback STS accepts AssumeRole signatures of: the source profiles' keys below,
the environment's, and the credentials it hands out itself (for chained roles)."""


@pytest.fixture
def server() -> Iterator[CredentialServer]:
    with CredentialServer(
        mint=lambda: dict(FIXED), container_token="container-token", signers=dict(SIGNERS)
    ) as s:
        yield s


async def ours(config: aiodcp.ReaderConfig, env: dict[str, str]) -> tuple[str, Credentials]:
    """(method, credentials) as the plain case resolves and fetches them."""
    with environment(env):
        plain = plain_case(config)
    assert isinstance(plain, Plain), plain
    if plain.source is None:
        assert plain.credentials is not None
        return "static", plain.credentials
    return plain.source.method, await plain.source.fetch(CONTEXT)


async def botocores(config: aiodcp.ReaderConfig, env: dict[str, str]) -> tuple[str, Credentials]:
    """(method, credentials) as the store's botocore client resolves them."""
    with environment(env):
        async with contextlib.AsyncExitStack() as stack:
            client = await create_client(config, stack)
            credentials = client._request_signer._credentials
            frozen = await credentials.get_frozen_credentials()
            expiry = getattr(credentials, "_expiry_time", None)
            if expiry is not None:
                expiry = expiry.astimezone(datetime.UTC)
            return credentials.method, Credentials(
                frozen.access_key, frozen.secret_key, frozen.token, expiry
            )


STATIC_METHODS = {"env", "shared-credentials-file", "config-file", "custom-process"}


def requests_of(server: CredentialServer, start: int, end: int | None = None) -> list[Any]:
    """The requests, without what differs between two clients by design (times, IMDS session
    tokens, the User-Agent)."""
    out = []
    for r in server.requests[start:end]:
        r = {k: v for k, v in r.items() if k not in ("t", "x-aws-ec2-metadata-token")}
        form = r.get("form")
        if form and form.get("RoleSessionName", "").startswith("botocore-session-"):
            # named after the second it was made in, by botocore as by aiodcp
            r["form"] = {**form, "RoleSessionName": "botocore-session-<seconds>"}
        out.append(r)
    return out


async def compare(
    config: aiodcp.ReaderConfig,
    env: dict[str, str],
    server: CredentialServer | None = None,
    *,
    same_requests: bool = True,
) -> Credentials:
    """Resolve natively, then through botocore; assert the same credentials (and requests:
    the same ones, or with ``same_requests=False`` the same STS parameters, each accepted)."""
    mark = len(server.requests) if server is not None else 0
    method, mine = await ours(config, env)
    middle = len(server.requests) if server is not None else 0
    their_method, theirs = await botocores(config, env)
    assert mine == theirs, (mine, theirs)
    if method == "static":
        assert their_method in STATIC_METHODS, their_method
    else:
        assert method == their_method
    if server is not None:
        mine_sent, theirs_sent = requests_of(server, mark, middle), requests_of(server, middle)
        assert middle > mark  # the source was asked
        if same_requests:
            assert mine_sent == theirs_sent, server.requests
        else:
            assert [r.get("form") for r in mine_sent] == [r.get("form") for r in theirs_sent]
            assert not any("refused" in r for r in mine_sent + theirs_sent), server.requests
    return mine


# --------------------------------------------------------------------------- resolution


def files(setup: Setup, *, config: str = "", credentials: str = "") -> None:
    if config:
        setup.config.write_text(config)
    if credentials:
        setup.credentials.write_text(credentials)


CREDENTIALS_FILE = """\
[default]
aws_access_key_id = AKIADEFAULTFILE
aws_secret_access_key = default-file-secret
[dev]
aws_access_key_id = AKIADEVFILE
aws_secret_access_key = dev-file-secret
aws_session_token = dev-file-token
[other]
aws_access_key_id = AKIAOTHERFILE
aws_secret_access_key = other-file-secret
aws_security_token = other-security-token
aws_session_token = other-session-token
"""


@pytest.mark.parametrize(
    ("case", "profile", "variables", "expected"),
    [
        ("the default profile", None, {}, "AKIADEFAULTFILE"),
        ("AWS_PROFILE", None, {"AWS_PROFILE": "dev"}, "AKIADEVFILE"),
        (
            "AWS_DEFAULT_PROFILE wins over AWS_PROFILE",
            None,
            {"AWS_DEFAULT_PROFILE": "other", "AWS_PROFILE": "dev"},
            "AKIAOTHERFILE",
        ),
        ("profile=", "dev", {}, "AKIADEVFILE"),
        (
            "the environment wins over AWS_PROFILE",
            None,
            {"AWS_PROFILE": "dev", "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "e"},
            "AKIAENV",
        ),
        (
            "an explicit profile drops the environment's credentials",
            "dev",
            {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "e"},
            "AKIADEVFILE",
        ),
    ],
)
async def test_static_keys_from_the_files_are_botocores(
    setup: Setup, case: str, profile: str | None, variables: dict[str, str], expected: str
) -> None:
    files(
        setup,
        credentials=CREDENTIALS_FILE,
        config="[profile dev]\nregion = eu-west-1\naws_access_key_id = AKIADEVCONFIG\n"
        "aws_secret_access_key = x\n",
    )
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9", profile=profile)
    got = await compare(config, {**setup.env, **variables})
    assert got.access_key == expected, case


async def test_the_config_file_and_its_precedence_are_botocores(setup: Setup) -> None:
    # keys only in the config file (with a security token)
    files(
        setup,
        config="[profile dev]\naws_access_key_id = AKIACONFIG\naws_secret_access_key = s\n"
        "aws_security_token = config-token\n[default]\nregion = ca-central-1\n",
    )
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9")
    env = {**setup.env, "AWS_PROFILE": "dev"}
    got = await compare(config, env)
    assert (got.access_key, got.token) == ("AKIACONFIG", "config-token")
    # the credentials file's section wins over the config file's keys
    files(setup, credentials=CREDENTIALS_FILE)
    assert (await compare(config, env)).access_key == "AKIADEVFILE"


async def test_credential_process_is_botocores(setup: Setup) -> None:
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9")
    env = {**setup.env, "AWS_PROFILE": "dev"}
    # in the config file; quoted arguments split as botocore splits them (no shell)
    files(setup, config=f"[profile dev]\ncredential_process = {setup.process('a b')}\n")
    got = await compare(config, env)
    assert got.access_key == "ASIAPROCESSa b" and got.expiry is not None
    # in the credentials file's section (botocore merges it into the profile)
    setup.config.unlink()
    files(setup, credentials=f"[dev]\ncredential_process = {setup.process('c')}\n")
    assert (await compare(config, env)).access_key == "ASIAPROCESSc"
    # without an Expiration: static credentials
    files(setup, credentials=f"[dev]\ncredential_process = {setup.process('d', '--no-expiry')}\n")
    got = await compare(config, env)
    assert got.expiry is None
    # the process comes after the credentials file's keys and before the config file's
    files(
        setup,
        credentials=f"[dev]\ncredential_process = {setup.process('e')}\n",
        config="[profile dev]\naws_access_key_id = AKIACONFIG\naws_secret_access_key = s\n",
    )
    assert (await compare(config, env)).access_key == "ASIAPROCESSe"
    files(setup, credentials=CREDENTIALS_FILE + f"credential_process = {setup.process('f')}\n")
    assert (await compare(config, {**setup.env, "AWS_PROFILE": "other"})).access_key == (
        "AKIAOTHERFILE"
    )


def web_identity_env(setup: Setup, server: CredentialServer, **extra: str) -> dict[str, str]:
    return {
        **setup.env,
        "AWS_WEB_IDENTITY_TOKEN_FILE": setup.token_file(),
        "AWS_ROLE_ARN": f"arn:aws:iam::123456789012:role/{ROLE}",
        "AWS_ROLE_SESSION_NAME": "aiodcp-test",
        "AWS_ENDPOINT_URL_STS": server.url + "/sts-path",
        **extra,
    }


async def test_web_identity_is_botocores(setup: Setup, server: CredentialServer) -> None:
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9")
    env = web_identity_env(setup, server)
    got = await compare(config, env, server)
    assert got.access_key == FIXED["AccessKeyId"]
    sts = server.requests[-1]
    assert sts["path"] == "/sts-path" and sts["form"]["RoleSessionName"] == "aiodcp-test"
    assert sts["form"]["WebIdentityToken"] == server.web_token
    # it comes before the credentials file (the chain's order)
    files(setup, credentials=CREDENTIALS_FILE)
    assert (await compare(config, env, server)).access_key == FIXED["AccessKeyId"]
    # ...but after the environment's keys
    keys = {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "e"}
    assert (await compare(config, {**env, **keys})).access_key == "AKIAENV"
    # AWS_ENDPOINT_URL serves STS too when AWS_ENDPOINT_URL_STS is not set
    del env["AWS_ENDPOINT_URL_STS"]
    env["AWS_ENDPOINT_URL"] = server.url
    await compare(aiodcp.ReaderConfig(), env, server)
    assert server.requests[-1]["path"] == "/"


async def test_web_identity_from_a_profile_is_botocores(
    setup: Setup, server: CredentialServer
) -> None:
    token = setup.token_file()
    files(
        setup,
        credentials=CREDENTIALS_FILE,
        config=f"[profile irsa]\nweb_identity_token_file = {token}\n"
        f"role_arn = arn:aws:iam::1:role/{ROLE}\n",
    )
    env = {**setup.env, "AWS_ENDPOINT_URL_STS": server.url}
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9", profile="irsa")
    await compare(config, env, server)
    # botocore names the session botocore-session-<seconds>
    assert server.requests[-1]["form"]["RoleSessionName"].startswith("botocore-session-")
    # an explicit profile ignores the environment's web identity variables: profile dev's keys
    env = web_identity_env(setup, server)
    got = await compare(aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9", profile="dev"), env)
    assert got.access_key == "AKIADEVFILE"


ROLE_ARN = f"arn:aws:iam::123456789012:role/{ROLE}"


async def test_assume_role_from_a_profile_is_botocores(
    setup: Setup, server: CredentialServer
) -> None:
    """``role_arn`` + ``source_profile``: the same AssumeRole call (botocore POSTs it signed
    in a header, aiodcp GETs it presigned; the loopback STS verifies both signatures), and
    the same credentials. Chained roles, ``credential_source`` and the parameters too."""
    files(
        setup,
        credentials="[base]\naws_access_key_id = AKIABASEFILE\n"
        "aws_secret_access_key = base-file-secret\n",
        config=f"[profile dev]\nrole_arn = {ROLE_ARN}\nsource_profile = base\n"
        "role_session_name = aiodcp-session\nexternal_id = ext-1\nduration_seconds = 900\n"
        f"[profile chained]\nrole_arn = {ROLE_ARN}-2\nsource_profile = dev\n"
        f"[profile from-env]\nrole_arn = {ROLE_ARN}\ncredential_source = Environment\n"
        f"[profile from-container]\nrole_arn = {ROLE_ARN}\ncredential_source = EcsContainer\n"
        f"[profile from-imds]\nrole_arn = {ROLE_ARN}\ncredential_source = Ec2InstanceMetadata\n"
        f"[profile mfa]\nrole_arn = {ROLE_ARN}\nsource_profile = base\nmfa_serial = arn:m\n",
    )
    env = {**setup.env, "AWS_ENDPOINT_URL_STS": server.url}
    endpoint = "http://127.0.0.1:9"
    got = await compare(
        aiodcp.ReaderConfig(endpoint_url=endpoint, profile="dev"), env, server, same_requests=False
    )
    assert got.access_key == FIXED["AccessKeyId"] and got.expiry is not None
    calls = [r for r in server.requests if r.get("form", {}).get("Action") == "AssumeRole"]
    assert [r["auth"] for r in calls] == ["query", "header"]
    assert calls[0]["form"] == {
        "Action": "AssumeRole",
        "Version": "2011-06-15",
        "RoleArn": ROLE_ARN,
        "RoleSessionName": "aiodcp-session",
        "ExternalId": "ext-1",
        "DurationSeconds": "900",
    }
    # a role assumed with another role's credentials: two calls each
    mark = len(server.requests)
    await compare(
        aiodcp.ReaderConfig(endpoint_url=endpoint, profile="chained"),
        env,
        server,
        same_requests=False,
    )
    arns = [r["form"]["RoleArn"] for r in server.requests[mark:]]
    assert arns == [ROLE_ARN, ROLE_ARN + "-2"] * 2
    # credential_source: the environment's keys, container credentials, instance metadata
    keys = {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "e"}
    await compare(
        aiodcp.ReaderConfig(endpoint_url=endpoint, profile="from-env"),
        {**env, **keys},
        server,
        same_requests=False,
    )
    container = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": server.url + "/container/credentials",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-token",
    }
    mark = len(server.requests)
    await compare(
        aiodcp.ReaderConfig(endpoint_url=endpoint, profile="from-container"),
        {**env, **container},
        server,
        same_requests=False,
    )
    assert [r["path"] for r in server.requests[mark:]].count("/container/credentials") == 2
    imds = {**env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url}
    del imds["AWS_EC2_METADATA_DISABLED"]
    await compare(
        aiodcp.ReaderConfig(endpoint_url=endpoint, profile="from-imds"),
        imds,
        server,
        same_requests=False,
    )
    # an MFA prompt is botocore's
    with environment(env):
        reason = plain_case(aiodcp.ReaderConfig(endpoint_url=endpoint, profile="mfa"))
    assert isinstance(reason, str) and "mfa_serial" in reason


def test_the_loopback_sts_refuses_bad_signatures(server: CredentialServer) -> None:
    """A guard on the fixture: the STS verifier refuses a wrong secret and a wrong token."""
    import datetime as dt

    from aiodcp._sigv4 import Presigner

    query = [("Action", "AssumeRole"), ("Version", "2011-06-15"), ("RoleArn", ROLE_ARN)]
    now = dt.datetime.now(dt.UTC)
    host = server.url.split("//")[1]
    for creds, expected in [
        (Credentials("AKIABASEFILE", "base-file-secret"), 200),
        (Credentials("AKIABASEFILE", "wrong"), 403),
        (Credentials(FIXED["AccessKeyId"], FIXED["SecretAccessKey"], "wrong-token"), 403),
        (Credentials("AKIAUNKNOWN", "x"), 403),
    ]:
        url = Presigner(creds, "us-east-1", "sts").presign(
            server.url, "/", host, now=now, expires=60, query=query
        )
        status, _, body = server.handle("GET", url[len(server.url) :], {"host": host}, b"")
        assert status == expected, (creds, body)


async def test_container_credentials_are_botocores(setup: Setup, server: CredentialServer) -> None:
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9")
    url = server.url + "/container/credentials"
    env = {
        **setup.env,
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": url,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-token",
    }
    got = await compare(config, env, server)
    assert got.access_key == FIXED["AccessKeyId"] and got.token == FIXED["SessionToken"]
    assert server.requests[-1]["authorization"] == "container-token"
    # the token file wins over the token variable (EKS Pod Identity), read at each fetch
    token_file = setup.root / "pod-identity-token"
    token_file.write_text("container-token")
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "wrong"
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(token_file)
    await compare(config, env, server)
    # a credential_process comes first
    files(setup, config=f"[default]\ncredential_process = {setup.process('p')}\n")
    assert (await compare(config, env)).access_key == "ASIAPROCESSp"


async def test_instance_metadata_is_botocores(setup: Setup, server: CredentialServer) -> None:
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9")
    env = {**setup.env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url}
    del env["AWS_EC2_METADATA_DISABLED"]
    got = await compare(config, env, server)
    assert got.access_key == FIXED["AccessKeyId"]
    paths = server.paths()[-3:]
    assert paths == [
        "/latest/api/token",
        "/latest/meta-data/iam/security-credentials/",
        f"/latest/meta-data/iam/security-credentials/{ROLE}",
    ]
    assert all("x-aws-ec2-metadata-token" in r for r in server.requests[-2:])
    # IMDSv1 when the token is refused with 404 (an instance without IMDSv2)
    server.imds_v1 = True
    server.fail("/latest/api/token", 404, times=2)
    await compare(config, env, server)
    assert "x-aws-ec2-metadata-token" not in server.requests[-1]
    # ...unless v1 is disabled: then botocore finds no credentials, and it is not plain
    server.fail("/latest/api/token", 404, times=1)
    with environment({**env, "AWS_EC2_METADATA_V1_DISABLED": "true"}):
        plain = plain_case(config)
    assert isinstance(plain, Plain) and plain.source is not None
    with pytest.raises(FetchError, match="IMDSv1 is disabled"):
        await plain.source.fetch(CONTEXT)
    # container credentials come before instance metadata
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = server.url + "/container/credentials"
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "container-token"
    mark = len(server.requests)
    await compare(config, env, server)
    assert {r["path"] for r in server.requests[mark:]} == {"/container/credentials"}
    # the endpoint from the profile
    files(setup, config=f"[default]\nec2_metadata_service_endpoint = {server.url}/\n")
    del env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], env["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
    await compare(config, env, server)


async def test_the_default_sts_endpoint_is_botocores() -> None:
    """Without a configured endpoint botocore's STS client (1.43, regional endpoints by
    default) calls https://sts.<region>.amazonaws.com/ in every aws region; checked offline
    (the request is captured before it is sent)."""
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.session import Session

    class Captured(Exception):
        pass

    for region in ("us-east-1", "us-west-2", "eu-central-1", "ap-southeast-5", "mx-central-1"):
        with environment({"AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}):
            client = Session().create_client(
                "sts", region_name=region, config=Config(signature_version=UNSIGNED)
            )
        urls: list[str] = []

        def capture(request: Any, urls: list[str] = urls, **kwargs: Any) -> None:
            urls.append(request.url)
            raise Captured

        client.meta.events.register("before-send.sts", capture)
        with pytest.raises(Captured):
            client.assume_role_with_web_identity(
                RoleArn="arn:aws:iam::123456789012:role/r",
                RoleSessionName="session",
                WebIdentityToken="token",
            )
        assert urls == [sts_url({}, {}, region)], region
    assert sts_url({}, {}, "cn-north-1") is None  # other partitions: botocore's rules
    assert sts_url({"AWS_STS_REGIONAL_ENDPOINTS": "legacy"}, {}, "us-east-1") is None


@pytest.mark.parametrize(
    ("config_text", "credentials_text", "variables", "why"),
    [
        (
            "[default]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = a\n"
            "[profile a]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n",
            "",
            {},
            "loop",
        ),
        (
            "[default]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = a\n"
            "credential_source = Environment\n",
            "",
            {},
            "one of source_profile and credential_source",
        ),
        ("[default]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = nope\n", "", {}, "exist"),
        (
            "[default]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = Environment\n",
            "",
            {},
            "no credentials from credential_source",
        ),
        ("[default]\nsso_session = s\nsso_account_id = 1\n", "", {}, "sso"),
        ("[default]\nlogin_session = x\n", "", {}, "login_session"),
        ("[default]\nca_bundle = /x.pem\n", "", {}, "ca_bundle"),
        ("", "[default]\naws_access_key_id = A\n", {}, "no aws_secret_access_key"),
        (
            "",
            "",
            {
                "AWS_ACCESS_KEY_ID": "A",
                "AWS_SECRET_ACCESS_KEY": "S",
                "AWS_CREDENTIAL_EXPIRATION": "x",
            },
            "AWS_CREDENTIAL_EXPIRATION",
        ),
        ("", "", {"AWS_ACCESS_KEY_ID": "A"}, "without AWS_SECRET_ACCESS_KEY"),
        ("", "", {}, "no credentials found"),
        ("", "", {"AWS_PROFILE": "missing"}, "ProfileNotFound"),
        ("", "", {"AWS_WEB_IDENTITY_TOKEN_FILE": "/t"}, "without a role ARN"),
        (
            "",
            "",
            {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://192.0.2.1/creds"},
            "not one botocore accepts",
        ),
        (
            "",
            "",
            {
                "AWS_WEB_IDENTITY_TOKEN_FILE": "/t",
                "AWS_ROLE_ARN": "arn:x",
                "AWS_STS_REGIONAL_ENDPOINTS": "legacy",
            },
            "endpoint rules",
        ),
        ("[default]\ncredential_process =\n  nested = 1\n", "", {}, "nested block"),
        ("[default\n", "", {}, "does not parse"),
    ],
)
def test_what_botocore_resolves_otherwise_is_not_plain(
    setup: Setup, config_text: str, credentials_text: str, variables: dict[str, str], why: str
) -> None:
    files(setup, config=config_text, credentials=credentials_text)
    result = plain_case(
        aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9"), {**setup.env, **variables}
    )
    assert isinstance(result, str) and why in result, result


def test_a_boto2_config_file_with_keys_is_not_plain(setup: Setup) -> None:
    boto = setup.root / "boto.cfg"
    boto.write_text("[Credentials]\naws_access_key_id = A\naws_secret_access_key = S\n")
    env = {**setup.env, "BOTO_CONFIG": str(boto)}
    result = plain_case(aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9"), env)
    assert isinstance(result, str) and "boto2" in result
    boto.write_text("[Boto]\ndebug = 0\n")  # no credentials in it: the chain goes on
    result = plain_case(aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9"), env)
    assert isinstance(result, str) and "no credentials found" in result


async def test_region_and_profile_sections_are_read_as_botocore_reads_them(setup: Setup) -> None:
    """The selected profile's region (config file, or the credentials file's section merged
    into it), ``[profile default]`` and ``[default]`` in file order, checked against the
    region botocore's client ends up with."""
    config = aiodcp.ReaderConfig(endpoint_url="http://127.0.0.1:9")
    cases = [
        ("[profile dev]\nregion = eu-west-3\n", "", {"AWS_PROFILE": "dev"}),
        (
            "",
            "[dev]\nregion = ap-south-1\naws_access_key_id = A\naws_secret_access_key = S\n",
            {"AWS_PROFILE": "dev"},
        ),
        ("[default]\nregion = eu-west-1\n[profile default]\nregion = eu-west-2\n", "", {}),
        ("[profile default]\nregion = eu-west-2\n[default]\nregion = eu-west-1\n", "", {}),
        ('[profile "with space"]\nregion = sa-east-1\n', "", {"AWS_PROFILE": "with space"}),
    ]
    for config_text, credentials_text, variables in cases:
        setup.config.unlink(missing_ok=True)
        setup.credentials.unlink(missing_ok=True)
        files(setup, config=config_text, credentials=credentials_text)
        env = {**setup.env, "AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S", **variables}
        del env["AWS_DEFAULT_REGION"]
        with environment(env):
            plain = plain_case(config)
            async with contextlib.AsyncExitStack() as stack:
                client = await create_client(config, stack)
                region = client.meta.region_name
        assert isinstance(plain, Plain), plain
        assert plain.region == region, (config_text, credentials_text)


# --------------------------------------------------------------------------- refreshing


@dataclass
class Clocked:
    """A source whose credentials expire ``ttl_s`` after each fetch (for Refresher)."""

    ttl_s: float
    fetches: int = 0
    delay_s: float = 0.0
    fail: bool = False
    method: str = "test"

    async def fetch(self, context: FetchContext) -> Credentials:
        self.fetches += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise FetchError("the test source failed")
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.ttl_s)
        return Credentials(f"AK{self.fetches}", "s", "t", expiry)

    def refresh_expiry(self, credentials: Credentials) -> datetime.datetime | None:
        return credentials.expiry


async def test_refresher_follows_botocores_windows() -> None:
    """Fresh credentials are returned as they are; within the advisory window a refresh runs
    in the background (callers get the current ones at once, and one fetch serves them all);
    within the mandatory window callers wait for it; a failed advisory refresh keeps the
    current credentials, a failed mandatory one raises."""
    source = Clocked(ttl_s=100.0)
    first = await source.fetch(CONTEXT)
    refresher = Refresher(source, first, CONTEXT, advisory_s=10.0, mandatory_s=5.0)
    assert await refresher.get() is first and source.fetches == 1
    # advisory: 8 s left
    source.delay_s = 0.2
    refresher.credentials = first = Credentials("AK-old", "s", "t", _in(8.0))
    refresher._refresh_expiry = first.expiry
    got = await asyncio.gather(*(refresher.get() for _ in range(10)))
    assert all(g is first for g in got)  # nobody waited
    task = refresher._task
    assert task is not None
    await task
    assert refresher.credentials.access_key == "AK2" and source.fetches == 2
    # mandatory: 3 s left, everyone waits for one fetch
    refresher.credentials = Credentials("AK-old", "s", "t", _in(3.0))
    refresher._refresh_expiry = refresher.credentials.expiry
    got = await asyncio.gather(*(refresher.get() for _ in range(10)))
    assert {g.access_key for g in got} == {"AK3"} and source.fetches == 3
    # a failing source: advisory keeps the current credentials, mandatory raises
    source.fail, source.delay_s = True, 0.0
    current = refresher.credentials = Credentials("AK-old", "s", "t", _in(8.0))
    refresher._refresh_expiry = current.expiry
    assert await refresher.get() is current
    with contextlib.suppress(FetchError):
        await refresher._task  # type: ignore[misc]
    assert refresher.credentials is current
    refresher.credentials = Credentials("AK-old", "s", "t", _in(3.0))
    refresher._refresh_expiry = refresher.credentials.expiry
    with pytest.raises(FetchError, match="test source failed"):
        await refresher.get()
    refresher.close()


async def test_refresher_after_a_refusal_fetches_once_per_refused_key() -> None:
    source = Clocked(ttl_s=3600.0, delay_s=0.1)
    refresher = Refresher(source, await source.fetch(CONTEXT), CONTEXT)
    changed = await asyncio.gather(*(refresher.refused("AK1") for _ in range(32)))
    assert all(changed) and source.fetches == 2
    assert await refresher.refused("AK1")  # replaced already: no fetch
    assert source.fetches == 2
    static = Refresher(None, Credentials("AK", "s"), CONTEXT)
    assert not await static.refused("AK")


def _in(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


# --------------------------------------------------------------------------- loads


@dataclass(frozen=True)
class Checkpoint:
    bucket: str
    url: str
    state: dict[str, Any]

    def template(self) -> dict[str, Any]:
        return {
            k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in self.state.items()
        }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, strict_server: StrictServer) -> Checkpoint:
    """2 MiB in 2 data files, 32 tensors of 64 KiB."""
    g = torch.Generator().manual_seed(11)
    sd: dict[str, Any] = {f"t{i:02d}": torch.randn(16, 1024, generator=g) for i in range(32)}
    sd["step"] = 9
    local = tmp_path_factory.mktemp("credsnative") / "ck"
    save_checkpoint(dict(sd), local, thread_count=2)
    bucket = f"creds-{os.urandom(6).hex()}"
    s3 = strict_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_dir(s3, local, bucket, "ck")
    return Checkpoint(bucket, f"s3://{bucket}/ck", sd)


@pytest.fixture
def strict(strict_server: StrictServer) -> Iterator[StrictServer]:
    strict_server.reset()
    yield strict_server
    strict_server.reset()


def minting(strict: StrictServer, ttl: float = 3600.0) -> Any:
    def mint() -> dict[str, Any]:
        return strict.mint_credentials(ttl=ttl)

    return mint


async def load(ck: Checkpoint, endpoint_url: str, **options: Any) -> aiodcp.LoadStats:
    state = ck.template()
    stats = await asyncio.wait_for(
        aiodcp.load_checkpoint(
            state,
            ck.url,
            endpoint_url=endpoint_url,
            addressing_style="path",
            part_size=64 * 1024,
            **options,
        ),
        LOAD_TIMEOUT_S,
    )
    assert_same(state, ck.state)
    return stats


def natively_loaded(strict: StrictServer, mark: int, access_keys: set[str]) -> None:
    """The load's requests since ``mark``: all accepted, all signed with one of
    ``access_keys``, and the ``.metadata`` GET presigned (native: botocore sends it with an
    Authorization header)."""
    records = strict.requests()[mark:]
    assert records and all(r["status"] in (200, 206) for r in records), records
    assert {r["access_key"] for r in records} <= access_keys
    metadata = [r for r in records if r["path"].endswith("/.metadata")]
    assert metadata and all(r["auth"] == "v4-query" for r in metadata), metadata


@pytest.mark.parametrize(
    "source", ["profile", "process", "web_identity", "assume_role", "container", "imds"]
)
async def test_loads_from_each_source_through_the_strict_store(
    setup: Setup,
    strict: StrictServer,
    checkpoint: Checkpoint,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    env = dict(setup.env)
    signers = {"AKIABASEFILE": ("base-file-secret", None)}
    with CredentialServer(mint=minting(strict), container_token="tok", signers=signers) as creds:
        if source == "assume_role":
            files(
                setup,
                credentials="[base]\naws_access_key_id = AKIABASEFILE\n"
                "aws_secret_access_key = base-file-secret\n",
                config=f"[default]\nrole_arn = {ROLE_ARN}\nsource_profile = base\n",
            )
            env["AWS_ENDPOINT_URL_STS"] = creds.url
        elif source == "profile":
            files(
                setup,
                credentials="[default]\naws_access_key_id = testing\n"
                "aws_secret_access_key = testing\naws_session_token = testing\n",
            )
        elif source == "process":
            script = setup.root / "mint.py"
            script.write_text(
                "import json, sys, urllib.request\n"
                "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
                "r = urllib.request.Request(sys.argv[1], data=b'{\"ttl\": 3600}', method='POST')\n"
                "print(o.open(r, timeout=10).read().decode())\n"
            )
            files(
                setup,
                config=f'[default]\ncredential_process = "{sys.executable}" "{script}" '
                f"{strict.endpoint_url}/_strict/credentials\n",
            )
        elif source == "web_identity":
            env.update(web_identity_env(setup, creds))
            env["AWS_WEB_IDENTITY_TOKEN_FILE"] = setup.token_file(creds.web_token)
        elif source == "container":
            env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = creds.url + "/container/credentials"
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "tok"
        else:
            del env["AWS_EC2_METADATA_DISABLED"]
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = creds.url
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        mark = len(strict.requests())
        await load(checkpoint, strict.endpoint_url)
        keys = {c["AccessKeyId"] for c in creds.issued}
        if source in ("profile", "process"):
            keys = {r["access_key"] for r in strict.requests()[mark:]}
            assert keys == ({"testing"} if source == "profile" else keys)
            assert source == "profile" or next(iter(keys)).startswith("ASIA")
        else:
            assert len(creds.issued) == 1  # fetched once for the load
        natively_loaded(strict, mark, keys)


async def test_an_endpoint_with_a_path_loads_natively_and_through_botocore(
    strict: StrictServer, checkpoint: Checkpoint, store_path: dict[str, Any]
) -> None:
    """A gateway serving S3 under ``/s3``: the URL puts the bucket after the path, and the
    signature covers the whole path (the strict store checks it over the path it received)."""
    strict.path_prefix("/s3")
    mark = len(strict.requests())
    await load(checkpoint, strict.endpoint_url + "/s3", region="us-east-1", **store_path)
    records = strict.requests()[mark:]
    assert records and all(r["status"] in (200, 206) for r in records), records
    assert all(r["path"].startswith(f"/s3/{checkpoint.bucket}/ck/") for r in records)
    metadata = [r for r in records if r["path"].endswith("/.metadata")]
    assert metadata[0]["auth"] == ("v4-query" if not store_path else "v4-header")
    # the prefix is needed: without it the gateway knows no such bucket
    strict.path_prefix("")
    with pytest.raises(aiodcp.NotFoundError):
        await load(checkpoint, strict.endpoint_url + "/s3", region="us-east-1", **store_path)


async def test_a_source_that_fails_at_open_falls_back_to_botocore(
    setup: Setup, strict: StrictServer, checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Container credentials whose endpoint answers 500 three times (aiodcp's attempts):
    the store leaves the plain case and botocore resolves the chain again (its own attempts
    succeed), and the load completes."""
    with CredentialServer(mint=minting(strict), container_token="tok") as creds:
        env = {
            **setup.env,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": creds.url + "/container/credentials",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "tok",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        creds.fail("/container/credentials", 500, times=3)
        async with aiodcp._store.S3Store(
            aiodcp.ReaderConfig(endpoint_url=strict.endpoint_url, region="us-east-1")
        ) as store:
            assert store.not_plain is not None and "container-role" in store.not_plain
            assert store._client is not None
        assert len(creds.requests) == 4  # 3 refused natively, 1 for botocore
        await load(checkpoint, strict.endpoint_url, region="us-east-1")


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("source", ["web_identity", "container", "imds"])
async def test_expiring_credentials_rotate_during_a_load_without_refusals(
    setup: Setup,
    strict: StrictServer,
    checkpoint: Checkpoint,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    """Credentials living 6 s (botocore's windows scaled down with them: advisory 4.5 s,
    mandatory 3.5 s before expiry), a load of ~8 s: the store refreshes them ahead of expiry,
    never signs with credentials about to expire, and the strict store refuses nothing."""
    from faultproxy import Fault, FaultProxy

    ttl = 6.0
    monkeypatch.setattr(
        aiodcp._store,
        "PRESIGN_TIMING",
        aiodcp._store.PresignTiming(
            credential_margin_s=0.5,
            min_presign_s=3,
            advisory_refresh_s=4.5,
            mandatory_refresh_s=3.5,
        ),
    )
    with CredentialServer(mint=minting(strict, ttl), container_token="tok") as creds:
        env = dict(setup.env)
        if source == "web_identity":
            env.update(web_identity_env(setup, creds))
            env["AWS_WEB_IDENTITY_TOKEN_FILE"] = setup.token_file(creds.web_token)
        elif source == "container":
            env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = creds.url + "/container/credentials"
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "tok"
        else:
            del env["AWS_EC2_METADATA_DISABLED"]
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = creds.url
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with FaultProxy(strict.endpoint_url) as proxy:
            proxy.add(Fault.stall(0.25), path_suffix=".distcp")  # ~32 GETs, 1 at a time
            mark = len(strict.requests())
            strict.reset_counters()
            started = time.time()
            stats = await load(checkpoint, proxy.endpoint_url, max_concurrency=1)
            ended = time.time()
    records = strict.requests()[mark:]
    issued = creds.issued
    assert strict.counters()["refused"] == {}
    assert ended - started > ttl  # the load outlived the first credentials
    used = {r["access_key"] for r in records}
    assert len(used) >= 2 and used <= {c["AccessKeyId"] for c in issued}
    # refreshed about once per lifetime, not per request
    assert len(issued) <= 2 + (ended - started) / (ttl - 4.5) + 1, len(issued)
    assert stats.resigned == 0 and stats.retries == 0
    assert all(r["auth"] == "v4-query" for r in records)


def test_credentials_json_shapes() -> None:
    """The answers of the test services are the documented shapes (a guard on the fixture)."""
    with CredentialServer(mint=fixed_credentials(60)) as s:
        status, _, body = s.handle("GET", "/container/credentials", {}, b"")
        assert status == 200 and set(json.loads(body)) >= {"AccessKeyId", "Token", "Expiration"}


# --------------------------------------------------------------------------- the HTTP client


async def _raw_server(answer: bytes, *, close: bool = True) -> tuple[asyncio.Server, str]:
    """A loopback server answering every request with ``answer`` (then closing, or not)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if not close:
            await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/x"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello", b"he"),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil close", b"until close"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", "sent 5 of the 9 bytes"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-", "before a complete HTTP response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked"),
    ],
)
async def test_the_one_shot_http_client(answer: bytes, expected: bytes | str) -> None:
    from aiodcp._credentials import request

    server, url = await _raw_server(answer)
    try:
        if isinstance(expected, bytes):
            response = await request("GET", url, CONTEXT, connect_timeout_s=5, read_timeout_s=5)
            assert response.status == 200 and response.body == expected
        else:
            with pytest.raises(FetchError, match=expected):
                await request("GET", url, CONTEXT, connect_timeout_s=5, read_timeout_s=5)
    finally:
        server.close()


async def test_the_one_shot_http_client_times_out_and_refuses_closed_ports() -> None:
    """A server that never finishes its answer: ReadTimeout naming the URL within the read
    timeout (0.2 s here; the bound below is a hang guard). A closed port: FetchError."""
    from aiodcp._credentials import ReadTimeout, request

    server, url = await _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", close=False)
    try:
        started = time.monotonic()
        with pytest.raises(ReadTimeout, match="read timeout"):
            await request("GET", url, CONTEXT, connect_timeout_s=5, read_timeout_s=0.2)
        assert time.monotonic() - started < 10, "hang guard"
    finally:
        server.close()
    with pytest.raises(FetchError, match="could not connect"):
        await request("GET", url, CONTEXT, connect_timeout_s=5, read_timeout_s=5)


async def test_a_save_signs_natively_with_fetched_credentials_under_an_endpoint_path(
    setup: Setup, strict: StrictServer, checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save's uploads (PUT, multipart POST/PUT, the conditional ``.metadata`` PUT) are signed
    natively with credentials fetched from a source (web identity), under a gateway's path:
    every request the strict store received is accepted, under the path, signed with the
    fetched key; the checkpoint loads back."""
    with CredentialServer(mint=minting(strict)) as creds:
        env = web_identity_env(setup, creds)
        env["AWS_WEB_IDENTITY_TOKEN_FILE"] = setup.token_file(creds.web_token)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        strict.path_prefix("/s3")
        endpoint = strict.endpoint_url + "/s3"
        url = f"s3://{checkpoint.bucket}/saved-{os.urandom(4).hex()}"
        mark = len(strict.requests())
        await asyncio.wait_for(
            aiodcp.save_checkpoint(
                dict(checkpoint.state), url, endpoint_url=endpoint, addressing_style="path"
            ),
            LOAD_TIMEOUT_S,
        )
        records = strict.requests()[mark:]
        keys = {c["AccessKeyId"] for c in creds.issued}
        assert len(creds.issued) == 1, creds.issued
        # signatures all accepted (a 404: the save's look for an earlier .metadata)
        assert records and all(r["status"] in (200, 204, 404) for r in records), records
        assert {r["method"] for r in records} >= {"PUT"}, records
        puts = [r for r in records if r["method"] == "PUT"]
        assert puts[-1]["path"].endswith("/.metadata") and puts[-1]["status"] == 200, puts
        assert all(r["path"].startswith(f"/s3/{checkpoint.bucket}/") for r in records), records
        assert {r["access_key"] for r in records} == keys
        assert all(r["auth"] == "v4-query" for r in records), records
        state = checkpoint.template()
        await asyncio.wait_for(
            aiodcp.load_checkpoint(state, url, endpoint_url=endpoint, addressing_style="path"),
            LOAD_TIMEOUT_S,
        )
        assert_same(state, checkpoint.state)
