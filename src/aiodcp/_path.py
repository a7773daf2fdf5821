"""``s3://bucket[/prefix]`` URLs and the keys of a checkpoint's files under them."""

from __future__ import annotations

import os
import posixpath
import re
from typing import NamedTuple

from ._errors import InvalidPathError

__all__ = ["CheckpointPath", "parse_checkpoint_path"]

# S3 bucket naming rules (3-63 chars, lowercase letters, digits, dots, hyphens); we also accept
# underscores and upper case, which some S3-compatible stores and legacy buckets allow.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
_HINT = "expected 's3://bucket' or 's3://bucket/prefix/of/checkpoint'"


class CheckpointPath(NamedTuple):
    """A checkpoint location: a bucket and a key prefix (no leading or trailing slash)."""

    bucket: str
    prefix: str

    def key(self, relative_path: str) -> str:
        """The key of ``relative_path`` under the checkpoint; refuses paths that escape it."""
        if (
            not isinstance(relative_path, str)
            or not relative_path
            or relative_path.startswith("/")
            or "://" in relative_path
            or "\\" in relative_path
            or "\x00" in relative_path
        ):
            raise InvalidPathError(
                f"checkpoint s3://{self.bucket}/{self.prefix} names a data file "
                f"{relative_path!r} that is not a plain relative path; refusing to read it",
                bucket=self.bucket,
                key=str(relative_path),
            )
        normalized = posixpath.normpath(relative_path)
        if normalized.startswith("..") or normalized in (".", ""):
            raise InvalidPathError(
                f"checkpoint s3://{self.bucket}/{self.prefix} names a data file "
                f"{relative_path!r} outside its prefix; refusing to read it",
                bucket=self.bucket,
                key=relative_path,
            )
        return f"{self.prefix}/{normalized}" if self.prefix else normalized

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __str__(self) -> str:
        return self.url


def parse_checkpoint_path(path: str | os.PathLike[str]) -> CheckpointPath:
    """Parse ``s3://bucket[/prefix]``; raise ``InvalidPathError`` saying what is wrong."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise InvalidPathError(
            f"checkpoint path must be a str like 's3://bucket/prefix', got {type(path).__name__}",
            path=repr(path),
        )
    if not path.startswith("s3://"):
        raise InvalidPathError(f"{path!r} is not an S3 URL: {_HINT}", path=path)
    bucket, _, prefix = path[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidPathError(f"{path!r} has no valid bucket name: {_HINT}", path=path)
    prefix = prefix.rstrip("/")
    if prefix and (
        prefix.startswith("/")
        or "//" in prefix
        or any(part in (".", "..") for part in prefix.split("/"))
    ):
        raise InvalidPathError(
            f"{path!r} has an empty, '.' or '..' segment in its prefix: {_HINT}", path=path
        )
    return CheckpointPath(bucket=bucket, prefix=prefix)


def is_checkpoint_path(path: object) -> bool:
    """True for a well-formed ``s3://bucket[/prefix]``, False for anything else."""
    try:
        parse_checkpoint_path(path)  # type: ignore[arg-type]
    except InvalidPathError:
        return False
    return True
