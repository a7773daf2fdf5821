"""The AWS shared config and credentials files, read as botocore 1.43 reads them.

Why: the plain case (``_native``) must see exactly the profile botocore's session would see
(its region, credential settings and anything else it sets) without importing botocore. This is
a port of ``botocore.configloader`` (``raw_config_parse``, ``build_profile_map``) and of
``Session.full_config``, stdlib only.

Data flow: ``load_files(environ)`` -> ``AwsFiles``: ``config`` (the config file's profiles:
``[default]``, ``[profile NAME]``), ``credentials`` (the credentials file's sections, by their
plain names) and ``profiles``: what botocore's session works from, the config file's profiles
each updated with the credentials file's section of the same name (``Session.full_config``).
A file that does not exist is empty; one that does not parse is a reason (a string) the store is
not plain, since botocore then raises its own error.

Paths: ``AWS_CONFIG_FILE`` (else ``~/.aws/config``) and ``AWS_SHARED_CREDENTIALS_FILE`` (else
``~/.aws/credentials``), a variable that is set but empty included, as botocore's config chain
reads them; ``$VARS`` and ``~`` are expanded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["AwsFiles", "load_files", "raw_parse"]

Section = dict[str, Any]
"""One section: option -> value (a string, or for an indented block a dict of strings)."""


class AwsFiles(NamedTuple):
    """What the two files hold (see the module docstring)."""

    config: dict[str, Section]
    credentials: dict[str, Section]
    profiles: dict[str, Section]
    config_path: str
    credentials_path: str


class ParseError(Exception):
    """A file botocore would refuse to parse (``ConfigParseError``)."""


def _path(env: Mapping[str, str], name: str, default: str) -> str:
    path = env[name] if name in env else default
    return os.path.expanduser(os.path.expandvars(path))


def raw_parse(path: str) -> dict[str, Section] | None:
    """``botocore.configloader.raw_config_parse(path)``: sections by name, indented blocks
    parsed into dicts; None when ``path`` is not a file. Raises ``ParseError``."""
    if not path or not os.path.isfile(path):
        return None
    import configparser  # only when there is a file (~1 ms of import otherwise)

    parser = configparser.RawConfigParser()
    try:
        parser.read([path])
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ParseError(f"{path}: {exc}") from None
    parsed: dict[str, Section] = {}
    for section in parser.sections():
        parsed[section] = {}
        for option in parser.options(section):
            value = parser.get(section, option)
            if value.startswith("\n"):
                nested: dict[str, str] = {}
                for line in value.splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    if "=" not in line:
                        raise ParseError(f"{path}: a nested line without '=': {line!r}")
                    key, _, nested_value = line.partition("=")
                    nested[key.strip()] = nested_value.strip()
                parsed[section][option] = nested
            else:
                parsed[section][option] = value
    return parsed


def _profile_name(section: str) -> str | None:
    """The name in ``[profile NAME]`` (shell-split, as botocore's ``_parse_section``)."""
    import shlex

    try:
        parts = shlex.split(section)
    except ValueError:
        return None
    return parts[1] if len(parts) == 2 else None


def profile_map(parsed: Mapping[str, Section]) -> dict[str, Section]:
    """The ``profiles`` of ``botocore.configloader.build_profile_map``: ``[default]`` and every
    ``[profile NAME]`` (a later section of the same name replaces an earlier one)."""
    profiles: dict[str, Section] = {}
    for key, values in copy.deepcopy(dict(parsed)).items():
        if key.startswith("profile"):
            name = _profile_name(key)
            if name is not None:
                profiles[name] = values
        elif key == "default":
            profiles[key] = values
    return profiles


def load_files(env: Mapping[str, str]) -> AwsFiles | str:
    """Both files as botocore's session reads them, or why they make a store not plain."""
    config_path = _path(env, "AWS_CONFIG_FILE", "~/.aws/config")
    credentials_path = _path(env, "AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    try:
        config_raw = raw_parse(config_path)
        credentials_raw = raw_parse(credentials_path)
    except ParseError as exc:
        return f"an AWS config file does not parse as botocore parses it ({exc})"
    config = profile_map(config_raw or {})
    credentials = copy.deepcopy(credentials_raw or {})
    profiles = copy.deepcopy(config)
    for name, values in credentials.items():
        if name not in profiles:
            profiles[name] = copy.deepcopy(values)
        else:
            profiles[name].update(copy.deepcopy(values))
    return AwsFiles(
        config=config,
        credentials=credentials,
        profiles=profiles,
        config_path=config_path,
        credentials_path=credentials_path,
    )
