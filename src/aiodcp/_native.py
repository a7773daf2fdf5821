"""The plain case: what botocore would resolve for a store, resolved without botocore.

Why: importing botocore, aiobotocore and aiohttp costs the first load of a process ~0.4 s
(imports plus the full garbage collection their objects trigger beside torch's). When a store's
configuration is plain, aiodcp resolves its endpoint, addressing, region and credentials itself,
exactly as botocore would, presigns its GETs with ``_sigv4`` and sends them through ``_http``;
botocore is imported only if something outside the plain case turns up (``_store``).

Data flow: ``plain_case(config, environ)`` -> a ``Plain`` (the resolved store: endpoint,
addressing, region, and where its credentials come from: static ones, or a ``_credentials``
source the store fetches and refreshes) or the reason (a string) it is not plain ->
``Plain.with_credentials(credentials)`` once they are fetched -> ``Plain.url(bucket, key, now,
expires)`` -> a presigned URL (or an unsigned one), or None when the bucket is not plain
(botocore presigns it).

Invariant: anything not known to resolve as botocore 1.43 resolves it is not plain. The
conditions, each with why it is there, are in ``plain_case``; tests/test_native.py and
tests/test_credentials_native.py check the resolution against botocore's own.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple
from urllib.parse import quote, urlsplit

from ._awsconfig import load_files
from ._config import ReaderConfig
from ._credentials import AWS_REGION_RE, PROFILE_KEYS, Source, resolve_chain
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
        "AWS_ENDPOINT_URL_STS",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_STS_REGIONAL_ENDPOINTS",
        "AWS_CA_BUNDLE",  # STS's (the S3 client passes ``verify`` explicitly, which wins)
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
        "AWS_EC2_METADATA_V1_DISABLED",
        "AWS_IMDS_USE_IPV6",
        "AWS_METADATA_SERVICE_TIMEOUT",
        "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
        # no effect on an S3 client made as the store makes it
        "AWS_REGION",  # botocore 1.43 reads only AWS_DEFAULT_REGION (AWS_REGION: defaults mode)
        "AWS_MAX_ATTEMPTS",  # the store sets its client's retries explicitly
        "AWS_RETRY_MODE",
        "AWS_DEFAULT_OUTPUT",
        "AWS_PAGER",
        "AWS_ACCOUNT_ID",  # account-based endpoints: DynamoDB's, not S3's
        "AWS_EXECUTION_ENV",  # the User-Agent only
    }
)
"""``AWS_*`` variables the plain case understands; any other one (FIPS, dual-stack, a
credential expiry, a data path, a defaults mode...) makes a store not plain."""
_REGION_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_PLAIN_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]*$")
"""A segment of an endpoint's path the plain case takes: unreserved characters, not ``.`` or
``..`` nor starting with a dot (botocore normalises some of those, and double-encodes ``%``)."""


class Plain(NamedTuple):
    """A store resolved without botocore: where its URLs point and how they are signed."""

    scheme: str
    netloc: str
    """As the endpoint spells it (botocore keeps an explicit default port in the URL)."""
    host: str
    port: int | None
    region: str
    addressing: Literal["path", "virtual"]
    credentials: Credentials | None
    """The credentials URLs are signed with now; None: unsigned requests, or (with ``source``)
    not fetched yet."""
    verify: bool | str
    presigner: Presigner | None
    source: Source | None = None
    """Where refreshable credentials come from (``_credentials``): the store fetches them at
    open and refreshes them; None: static credentials, or unsigned."""
    path: str = ""
    """The endpoint's path (``/s3`` for ``http://host/s3``; "" for none), before the bucket
    (path-style) or the key (virtual-hosted), as botocore puts it."""

    def with_credentials(self, credentials: Credentials) -> Plain:
        """The same store signing with ``credentials`` (fetched, or refreshed)."""
        return self._replace(credentials=credentials, presigner=Presigner(credentials, self.region))

    def url(
        self, bucket: str, key: str, *, now: datetime.datetime, expires: int, payer: str | None
    ) -> str | None:
        """The URL of a GET of ``key``: presigned for ``expires`` seconds from ``now`` (UTC), or
        unsigned; None when ``bucket`` is not plain (dots, ``--`` suffixes such as directory
        buckets' ``--x-s3``, upper case, IP-like: botocore's rules for those are its own)."""
        if not _PLAIN_BUCKET_RE.match(bucket) or "--" in bucket:
            return None
        if self.presigner is None and self.source is not None:
            raise RuntimeError("credentials from a source must be fetched before signing")
        path = f"{self.path}/{encode_key(key)}"
        if self.addressing == "virtual":
            base = f"{self.scheme}://{bucket}.{self.netloc}"
            host = signed_host(self.scheme, f"{bucket}.{self.host}", self.port)
        else:
            base = f"{self.scheme}://{self.netloc}"
            path = f"{self.path}/{bucket}/{encode_key(key)}"
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
        if self.presigner is None and self.source is not None:
            raise RuntimeError("credentials from a source must be fetched before signing")
        path = f"{self.path}/{encode_key(key)}"
        if self.addressing == "virtual":
            base = f"{self.scheme}://{bucket}.{self.netloc}"
            host = signed_host(self.scheme, f"{bucket}.{self.host}", self.port)
        else:
            base = f"{self.scheme}://{self.netloc}"
            path = f"{self.path}/{bucket}/{encode_key(key)}"
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


def plain_case(
    config: ReaderConfig,
    environ: Mapping[str, str] | None = None,
    *,
    now: Callable[[], float] = time.time,
) -> Plain | str:
    """The store ``config`` describes, resolved as botocore would, or why it is not plain.

    Plain means every one of these holds (each says why it is there):

    * ``fast_http`` is True: False asks for botocore's HTTP stack for every request.
    * ``extra`` is empty: any ``AioConfig`` option (FIPS, dual-stack, accelerate, client
      certificates, proxies, signature versions...) may change the request.
    * No proxy in the environment (``*_proxy`` in any case but ``no_proxy``), and not macOS or
      Windows, where Python's ``getproxies`` (botocore's) also reads the system's settings:
      proxies need botocore's HTTP stack.
    * Every ``AWS_*`` variable is one of ``_ENV_UNDERSTOOD``.
    * The config and credentials files parse (``_awsconfig``, botocore's parser). The profile
      botocore's session selects (``profile``, else ``AWS_DEFAULT_PROFILE``, else
      ``AWS_PROFILE``, else ``default``) exists if one was named (botocore raises
      ``ProfileNotFound`` otherwise), and sets nothing but ``_credentials.PROFILE_KEYS``
      (the region, credential settings): it may otherwise set endpoints, addressing, FIPS, a
      CA bundle, SSO...
    * Credentials: ``unsigned=True``, or the first of botocore's default chain that applies
      (``_credentials.resolve_chain``): the environment (not when ``profile`` is passed: an
      explicit profile drops botocore's environment provider), assume-role from the profile,
      web identity, the shared credentials file, ``credential_process``, the config file,
      container credentials, instance metadata; SSO, ``aws login``, MFA prompts, boto2 files
      and expiring environment credentials are left to botocore, as is a chain that finds
      nothing (botocore raises its own error).
    * A region: ``region``, else ``AWS_DEFAULT_REGION``, else the profile's; a plain name
      (lower-case DNS label, not ``aws-global``, no ``fips``). Without one, botocore's choice
      depends on its endpoint rules.
    * An endpoint: ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``
      (the first that is set and not empty; none if ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is
      true), of the form ``http(s)://host[:port][/path]`` (no query, user, upper case; a path
      of plain segments, ``_PATH_SEGMENT_RE``, with or without a trailing ``/``), not an
      accelerate one (``s3-accelerate.*``: botocore addresses those virtual-hosted); or none,
      and then the region is one of the aws partition's commercial regions
      (``_credentials.AWS_REGION_RE``): AWS S3's regional endpoint
      ``https://s3.<region>.amazonaws.com``, and for ``us-east-1`` the global
      ``https://s3.amazonaws.com`` (botocore's default, "legacy",
      ``s3_us_east_1_regional_endpoint``). Other partitions (China, GovCloud, ISO, EUSC) and
      ``aws-global`` are left to botocore's rule set; so are FIPS, dual-stack, accelerate and
      the us-east-1 regional setting, since each needs an ``AWS_*`` variable, a config file
      setting or ``extra`` that is not understood here.

    Addressing, as botocore 1.43's rule set gives it. For a custom endpoint: ``auto`` and
    ``path`` are path-style (``<endpoint path>/<bucket>/<key>``); ``virtual`` is
    ``bucket.host`` with ``<endpoint path>/<key>`` unless the host is an IP address (then
    path-style). For AWS: ``path`` is path-style; ``auto`` and ``virtual`` are
    ``bucket.s3...`` (botocore's virtual-hostable check, which every plain bucket passes).
    Each bucket is checked again when its URL is made (``Plain.url``): dotted names, ``--``
    and the rest are botocore's.

    Files are read (blocking): the store calls this in a worker thread. ``now`` names the web
    identity session as botocore does (``botocore-session-<seconds>``).
    """
    env = os.environ if environ is None else environ
    if not config.fast_http:
        return "fast_http=False"
    if config.extra:
        return "ReaderConfig.extra is set"
    if sys.platform in ("darwin", "win32"):
        return f"proxies may come from the system's settings on {sys.platform}"
    for name, value in env.items():
        lower = name.lower()
        if lower.endswith("_proxy") and lower != "no_proxy" and value:
            return f"{name} is set"
        if name.upper().startswith("AWS_") and name not in _ENV_UNDERSTOOD:
            return f"{name} is set"
    files = load_files(env)
    if isinstance(files, str):
        return files
    explicit = config.profile is not None
    profile = config.profile
    if profile is None:
        for name in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE"):
            if name in env:
                profile = env[name]
                break
    if profile is not None and profile not in files.profiles:
        return (
            f"profile {profile!r} is in neither {files.config_path} nor {files.credentials_path}"
            " (botocore raises ProfileNotFound)"
        )
    scoped = files.profiles.get(profile or "default", {})
    unknown = sorted(set(scoped) - PROFILE_KEYS)
    if unknown:
        return f"profile {profile or 'default'!r} sets {unknown}"
    region = config.region
    if region is None:
        region = env["AWS_DEFAULT_REGION"] if "AWS_DEFAULT_REGION" in env else scoped.get("region")
    if region is None:
        return "no region"
    if not isinstance(region, str) or not _REGION_RE.match(region) or region == "aws-global":
        return f"region {region!r} is not a plain region name"
    if "fips" in region:
        return f"region {region!r} is not a plain region name"
    found: Credentials | Source | None = None
    if not config.unsigned:
        chain = resolve_chain(
            env,
            files,
            profile=profile or "default",
            explicit_profile=explicit,
            region=region,
            now=now,
        )
        if isinstance(chain, str):
            return chain
        found = chain
    credentials = found if isinstance(found, Credentials) else None
    source = None if found is None or isinstance(found, Credentials) else found
    endpoint = config.endpoint_url
    if endpoint is None and env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if env.get(name):
                endpoint = env[name]
                break
    if endpoint is None:
        return _aws_plain(config, region, credentials, source)
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        return f"endpoint {endpoint!r} has a malformed port"
    host = parts.hostname
    path = _endpoint_path(parts.path)
    if (
        parts.scheme not in ("http", "https")
        or not host
        or path is None
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or parts.netloc != parts.netloc.lower()
    ):
        return f"endpoint {endpoint!r} is not of the form http(s)://host[:port][/path]"
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
    return Plain(
        scheme=parts.scheme,
        netloc=parts.netloc,
        host=host,
        port=port,
        region=region,
        addressing=addressing,
        credentials=credentials,
        verify=config.verify,
        presigner=Presigner(credentials, region) if credentials is not None else None,
        source=source,
        path=path,
    )


def _endpoint_path(path: str) -> str | None:
    """The path of an endpoint as the plain case puts it before bucket or key: "" for none or
    ``/``, ``/a/b`` for ``/a/b`` or ``/a/b/``; None for a path botocore rewrites (empty, dot
    or odd segments, percent signs: not plain)."""
    if path in ("", "/"):
        return ""
    segments = path[1:].removesuffix("/").split("/")
    if not path.startswith("/") or not all(_PATH_SEGMENT_RE.match(s) for s in segments):
        return None
    return "/" + "/".join(segments)


def _aws_plain(
    config: ReaderConfig, region: str, credentials: Credentials | None, source: Source | None
) -> Plain | str:
    """AWS S3 itself (no endpoint): the regional endpoint of a commercial region, as botocore
    1.43's rule set gives it with nothing but a region set, or why that is not plain."""
    if not AWS_REGION_RE.match(region):
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
        source=source,
    )
