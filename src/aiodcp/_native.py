"""The plain case: what botocore would resolve for a store, resolved without botocore.

Why: importing botocore, aiobotocore and aiohttp costs the first load of a process ~0.4 s
(imports plus the full garbage collection their objects trigger beside torch's). When a store's
configuration is plain, aiodcp resolves its endpoint, addressing, region and credentials itself,
exactly as botocore would, presigns its GETs with ``_sigv4`` and sends them through ``_http``;
botocore is imported only if something outside the plain case turns up (``_store``).

Data flow: ``plain_case(config, environ)`` -> a ``Plain`` (the resolved store) or the reason
(a string) it is not plain -> ``Plain.url(bucket, key, now, expires)`` -> a presigned URL (or
an unsigned one), or None when the bucket is not plain (botocore presigns it).

Invariant: anything not known to resolve as botocore 1.43 resolves it is not plain. The
conditions, each with why it is there, are in ``plain_case``; tests/test_native.py checks the
resolution against botocore's own URLs.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

from ._config import ReaderConfig
from ._sigv4 import Credentials, Presigner, encode_key, signed_host

__all__ = ["Plain", "ca_file", "plain_case"]

_ENV_UNDERSTOOD = frozenset(
    {
        # read here, as botocore reads them
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_CONFIG_FILE",
        # no effect on an S3 client made as the store makes it
        "AWS_REGION",  # botocore 1.43 reads only AWS_DEFAULT_REGION (AWS_REGION: defaults mode)
        "AWS_CA_BUNDLE",  # the store always passes ``verify`` explicitly, which wins over it
        "AWS_SHARED_CREDENTIALS_FILE",  # never read: the environment's credentials come first
        "AWS_EC2_METADATA_DISABLED",
        "AWS_METADATA_SERVICE_TIMEOUT",
        "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
        "AWS_MAX_ATTEMPTS",  # the store sets its client's retries explicitly
        "AWS_RETRY_MODE",
        "AWS_DEFAULT_OUTPUT",
        "AWS_PAGER",
        "AWS_STS_REGIONAL_ENDPOINTS",
    }
)
"""``AWS_*`` variables the plain case understands; any other one (FIPS, dual-stack, a profile,
a credential expiry, a data path, a defaults mode...) makes a store not plain."""
_CONFIG_FILE_UNDERSTOOD = frozenset({"region", "output"})
_REGION_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_PLAIN_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_AWS_REGION_RE = re.compile(r"^(?:us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-[0-9]+$")
"""The aws partition's regions: its ``regionRegex`` in botocore 1.43's ``partitions.json``
(``^(us|eu|ap|sa|ca|me|af|il|mx)\\-\\w+\\-\\d+$``), narrowed to letters in the middle. It
matches no region of another partition (``us-gov-west-1``, ``us-iso-east-1``, ``cn-north-1``,
``eu-isoe-west-1``...) nor ``aws-global``; tests/test_native.py checks it against every region
botocore lists."""


@dataclass(frozen=True, slots=True)
class Plain:
    """A store resolved without botocore: where its URLs point and how they are signed."""

    scheme: str
    netloc: str
    """As the endpoint spells it (botocore keeps an explicit default port in the URL)."""
    host: str
    port: int | None
    region: str
    addressing: Literal["path", "virtual"]
    credentials: Credentials | None
    """None: unsigned requests."""
    verify: bool | str
    presigner: Presigner | None

    def url(
        self, bucket: str, key: str, *, now: datetime.datetime, expires: int, payer: str | None
    ) -> str | None:
        """The URL of a GET of ``key``: presigned for ``expires`` seconds from ``now`` (UTC), or
        unsigned; None when ``bucket`` is not plain (dots, ``--`` suffixes such as directory
        buckets' ``--x-s3``, upper case, IP-like: botocore's rules for those are its own)."""
        if not _PLAIN_BUCKET_RE.match(bucket) or "--" in bucket:
            return None
        path = "/" + encode_key(key)
        if self.addressing == "virtual":
            base = f"{self.scheme}://{bucket}.{self.netloc}"
            host = signed_host(self.scheme, f"{bucket}.{self.host}", self.port)
        else:
            base = f"{self.scheme}://{self.netloc}"
            path = f"/{bucket}{path}"
            host = signed_host(self.scheme, self.host, self.port)
        if self.presigner is None:
            return base + path
        headers = {"x-amz-request-payer": payer} if payer is not None else None
        return self.presigner.presign(base, path, host, now=now, expires=expires, headers=headers)

    def request_url(
        self,
        method: str,
        bucket: str,
        key: str,
        *,
        now: datetime.datetime,
        expires: int,
        payer: str | None,
        query: tuple[tuple[str, str], ...] = (),
        headers: dict[str, str] | None = None,
    ) -> str | None:
        """The URL of a ``method`` request of ``key`` (``key`` "" for the bucket itself) with
        the operation's ``query`` parameters and signed ``headers`` (see
        ``Presigner.presign_request``): presigned for ``expires`` seconds from ``now`` (UTC),
        or unsigned; None when ``bucket`` is not plain (as ``url``)."""
        if not _PLAIN_BUCKET_RE.match(bucket) or "--" in bucket:
            return None
        path = "/" + encode_key(key)
        if self.addressing == "virtual":
            base = f"{self.scheme}://{bucket}.{self.netloc}"
            host = signed_host(self.scheme, f"{bucket}.{self.host}", self.port)
        else:
            base = f"{self.scheme}://{self.netloc}"
            path = f"/{bucket}{path}"
            host = signed_host(self.scheme, self.host, self.port)
        signed = dict(headers or {})
        if payer is not None:
            signed["x-amz-request-payer"] = payer
        if self.presigner is None:
            if not query:
                return base + path
            return base + path + "?" + "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in query)
        return self.presigner.presign_request(
            method, base, path, host, now=now, expires=expires, query=query, headers=signed
        )


def ca_file(verify: bool | str) -> str | None:
    """The CA bundle botocore verifies with (``botocore.httpsession.get_cert_path``): the path
    given, else certifi's bundle, else the one botocore ships; None when not verifying."""
    if verify is False:
        return None
    if isinstance(verify, str):
        return verify
    if importlib.util.find_spec("certifi") is not None:
        import certifi

        return str(certifi.where())
    spec = importlib.util.find_spec("botocore")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "cacert.pem")


def plain_case(config: ReaderConfig, environ: Mapping[str, str] | None = None) -> Plain | str:
    """The store ``config`` describes, resolved as botocore would, or why it is not plain.

    Plain means every one of these holds (each says why it is there):

    * ``fast_http`` is True: False asks for botocore's HTTP stack for every request.
    * ``extra`` is empty: any ``AioConfig`` option (FIPS, dual-stack, accelerate, client
      certificates, proxies, signature versions...) may change the request.
    * ``profile`` is None, and neither ``AWS_PROFILE`` nor ``AWS_DEFAULT_PROFILE`` is set: an
      explicit profile drops botocore's environment credential provider
      (``botocore.credentials.create_credential_resolver``), and a profile's settings are not
      read here.
    * No proxy in the environment (``*_proxy`` in any case but ``no_proxy``), and not macOS or
      Windows, where Python's ``getproxies`` (botocore's) also reads the system's settings:
      proxies need botocore's HTTP stack.
    * Every ``AWS_*`` variable is one of ``_ENV_UNDERSTOOD``.
    * The shared config file (``AWS_CONFIG_FILE``, ``~/.aws/config``) is absent, or parses and
      its ``[default]`` section sets nothing but ``region`` and ``output``: it may otherwise
      set endpoints, addressing, FIPS, a CA bundle...
    * Credentials: ``unsigned=True``, or ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``
      both set (non-empty), with ``AWS_SECURITY_TOKEN`` or else ``AWS_SESSION_TOKEN`` as the
      token (botocore's ``EnvProvider`` order). Without them botocore walks its credential
      chain (files, SSO, instance metadata), which is not reproduced here; with only one of
      them, botocore raises its own error.
    * A region: ``region``, else ``AWS_DEFAULT_REGION``, else the config file's; a plain name
      (lower-case DNS label, not ``aws-global``, no ``fips``). Without one, botocore's choice
      depends on its endpoint rules.
    * An endpoint: ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``
      (unless ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true), of the form
      ``http(s)://host[:port]`` (no path, query, user, upper case), not an accelerate one
      (``s3-accelerate.*``: botocore addresses those virtual-hosted); or none, and then the
      region is one of the aws partition's commercial regions (``_AWS_REGION_RE``): AWS S3's
      regional endpoint ``https://s3.<region>.amazonaws.com``, and for ``us-east-1`` the
      global ``https://s3.amazonaws.com`` (botocore's default, "legacy",
      ``s3_us_east_1_regional_endpoint``). Other partitions (China, GovCloud, ISO, EUSC) and
      ``aws-global`` are left to botocore's rule set; so are FIPS, dual-stack, accelerate and
      the us-east-1 regional setting, since each needs an ``AWS_*`` variable, a config file
      setting or ``extra`` that is not understood here.

    Addressing, as botocore 1.43's rule set gives it. For a custom endpoint: ``auto`` and
    ``path`` are path-style; ``virtual`` is ``bucket.host`` unless the host is an IP address
    (then path-style). For AWS: ``path`` is path-style; ``auto`` and ``virtual`` are
    ``bucket.s3...`` (botocore's virtual-hostable check, which every plain bucket passes).
    Each bucket is checked again when its URL is made (``Plain.url``): dotted names, ``--``
    and the rest are botocore's.
    """
    env = os.environ if environ is None else environ
    if not config.fast_http:
        return "fast_http=False"
    if config.extra:
        return "ReaderConfig.extra is set"
    if config.profile is not None:
        return "a profile is given"
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        if env.get(name):
            return f"{name} is set"
    if sys.platform in ("darwin", "win32"):
        return f"proxies may come from the system's settings on {sys.platform}"
    for name, value in env.items():
        lower = name.lower()
        if lower.endswith("_proxy") and lower != "no_proxy" and value:
            return f"{name} is set"
        if name.upper().startswith("AWS_") and name not in _ENV_UNDERSTOOD:
            return f"{name} is set"
    file_region = _config_file_region(env)
    if not isinstance(file_region, tuple):
        return file_region
    credentials: Credentials | None = None
    if not config.unsigned:
        access_key = env.get("AWS_ACCESS_KEY_ID", "")
        secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
        if not access_key or not secret_key:
            return "no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        token = env.get("AWS_SECURITY_TOKEN", "") or env.get("AWS_SESSION_TOKEN", "") or None
        credentials = Credentials(access_key, secret_key, token)
    region = config.region
    if region is None:
        region = env["AWS_DEFAULT_REGION"] if "AWS_DEFAULT_REGION" in env else file_region[0]
    if region is None:
        return "no region"
    if not _REGION_RE.match(region) or region == "aws-global" or "fips" in region:
        return f"region {region!r} is not a plain region name"
    endpoint = config.endpoint_url
    if endpoint is None and env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if name in env:
                endpoint = env[name]
                break
    if endpoint is None:
        return _aws_plain(config, region, credentials)
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        return f"endpoint {endpoint!r} has a malformed port"
    host = parts.hostname
    if (
        parts.scheme not in ("http", "https")
        or not host
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or parts.netloc != parts.netloc.lower()
    ):
        return f"endpoint {endpoint!r} is not of the form http(s)://host[:port]"
    if host.split(".")[0] == "s3-accelerate":
        # botocore's is_s3_accelerate_url: such an endpoint is addressed virtual-hosted in
        # "auto" (not path-style as other endpoints are); left to botocore
        return f"endpoint {endpoint!r} is S3 Transfer Acceleration's"
    addressing: Literal["path", "virtual"] = "path"
    if config.addressing_style == "virtual":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if re.fullmatch(r"[0-9.]+", host):
                return f"endpoint host {host!r} looks like an IP address but is not one"
            addressing = "virtual"
    presigner = Presigner(credentials, region) if credentials is not None else None
    return Plain(
        scheme=parts.scheme,
        netloc=parts.netloc,
        host=host,
        port=port,
        region=region,
        addressing=addressing,
        credentials=credentials,
        verify=config.verify,
        presigner=presigner,
    )


def _aws_plain(config: ReaderConfig, region: str, credentials: Credentials | None) -> Plain | str:
    """AWS S3 itself (no endpoint): the regional endpoint of a commercial region, as botocore
    1.43's rule set gives it with nothing but a region set, or why that is not plain."""
    if not _AWS_REGION_RE.match(region):
        return (
            f"no endpoint_url, and region {region!r} is not one of the aws partition's"
            " commercial regions (other partitions: botocore's endpoint rules)"
        )
    # botocore's default s3_us_east_1_regional_endpoint ("legacy") keeps us-east-1 on the
    # global endpoint; AWS_S3_US_EAST_1_REGIONAL_ENDPOINT is not understood: not plain.
    host = "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"
    return Plain(
        scheme="https",
        netloc=host,
        host=host,
        port=None,
        region=region,
        addressing="path" if config.addressing_style == "path" else "virtual",
        credentials=credentials,
        verify=config.verify,
        presigner=Presigner(credentials, region) if credentials is not None else None,
    )


def _config_file_region(env: Mapping[str, str]) -> tuple[str | None] | str:
    """(the config file's default region or None,), or why the file makes the store not plain."""
    path = os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    if not os.path.exists(path):
        return (None,)
    import configparser  # only when there is a file: ~1 ms of the first load's import otherwise

    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeError, configparser.Error) as exc:
        return f"the config file {path} could not be read as botocore reads it ({exc})"
    if parser.has_section("profile default"):
        return f"the config file {path} has a [profile default] section"
    if not parser.has_section("default"):
        return (None,)
    keys = set(parser.options("default"))
    if not keys <= _CONFIG_FILE_UNDERSTOOD:
        return f"the config file {path} sets {sorted(keys - _CONFIG_FILE_UNDERSTOOD)}"
    region = parser.get("default", "region", fallback=None)
    return (region or None,)
