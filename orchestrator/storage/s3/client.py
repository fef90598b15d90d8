"""S3 references, boto3 clients (one per process, settings and AWS environment) and the
one-line errors for failed calls. Credentials never pass through here: boto3 finds them."""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from orchestrator.errors import CheckpointError, MergefleetError
from orchestrator.storage.base import StorageOptions

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")

_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
}
_DENIED_HINTS = {
    "InvalidAccessKeyId": "the endpoint does not know the access key id in use",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


# ---------------------------------------------------------------- references


def parse_s3_uri(uri: str, error: type[MergefleetError] = CheckpointError) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")`` (no slashes at the ends)."""
    match = re.match(r"^[sS]3://([^/]*)/?(.*)$", uri)
    if match is None:
        raise error(f"{uri!r} is not an S3 reference; write s3://bucket/prefix")
    bucket, prefix = match.group(1), match.group(2).strip("/")
    if not _BUCKET.match(bucket):
        raise error(
            f"{uri}: {bucket!r} is not a valid bucket name (3 to 63 lowercase letters, digits, '.', '-')"
        )
    if ".." in PurePosixPath(prefix).parts or "//" in prefix:
        raise error(f"{uri}: the prefix must not contain '..' or '//'")
    return bucket, prefix


def join_key(prefix: str, file: str, error: type[MergefleetError], uri: str) -> str:
    rel = PurePosixPath(file)
    if not file or rel.is_absolute() or ".." in rel.parts or file.endswith("/"):
        raise error(f"{file!r} is not a relative file name inside {uri}")
    return f"{prefix}/{file}" if prefix else file


def s3_uri(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


# ---------------------------------------------------------------- clients

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _environment_key() -> str:
    """A digest of the ``AWS_*`` environment boto3 reads, so a client made under other
    credentials or another endpoint is not reused. Only the digest is kept."""
    digest = hashlib.sha256()
    for name in sorted(os.environ):
        if name.startswith("AWS_"):
            digest.update(f"{name}\0{os.environ[name]}\0".encode())
    return digest.hexdigest()


def s3_client(options: StorageOptions | None = None, *, error: type[MergefleetError] = CheckpointError) -> Any:
    """A boto3 S3 client for ``options`` (one per process, options and AWS environment)."""
    options = options or StorageOptions()
    key = (os.getpid(), options, _environment_key())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _make_client(options, error)
        return client


def _make_client(options: StorageOptions, error: type[MergefleetError]) -> Any:
    import boto3
    from botocore.config import Config

    settings: dict[str, Any] = {
        "retries": {"mode": "standard", "total_max_attempts": options.max_attempts},
        "max_pool_connections": 2 * options.max_concurrency + 4,
        "connect_timeout": 10,
        "read_timeout": 60,
        "tcp_keepalive": True,
    }
    if options.region:
        settings["region_name"] = options.region
    if options.addressing_style:
        settings["s3"] = {"addressing_style": options.addressing_style}
    try:
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=options.endpoint_url, config=Config(**settings))
    except ProfileNotFound as exc:
        raise error(f"{exc}; set AWS_PROFILE to a profile of ~/.aws/config, or unset it") from None
    except (BotoCoreError, ValueError) as exc:
        raise error(f"cannot set up an S3 client: {exc}") from None


def request_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool for ranged GETs (shared by every input, so the total is bounded)."""
    key = (os.getpid(), workers)
    with _clients_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="s3-get")
        return pool


def backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: up to 0.2 s × 2^attempt, at most 10 s."""
    return random.random() * min(10.0, 0.2 * 2**attempt)


# ---------------------------------------------------------------- errors


def s3_error(
    exc: Exception,
    *,
    action: str,
    bucket: str,
    key: str = "",
    endpoint: str | None = None,
    error: type[MergefleetError] = CheckpointError,
) -> MergefleetError:
    """One actionable line for a failed S3 call; names bucket and key, never credentials."""
    label = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    where = endpoint or "the default AWS endpoint"
    if isinstance(exc, ClientError):
        details = exc.response.get("Error", {})
        code = str(details.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return error(
                f"cannot {action} {label}: the bucket {bucket!r} does not exist at {where}; "
                "check the bucket name, fleet.storage.endpoint_url / AWS_ENDPOINT_URL and the region"
            )
        if code in MISSING_CODES:
            return error(f"cannot {action} {label}: no such object (NoSuchKey)")
        if code in _DENIED or status == 403:
            hint = _DENIED_HINTS.get(code, "the credentials in use are not allowed to (check the IAM policy and the bucket policy)")
            return error(
                f"access denied: cannot {action} {label} ({code or status}): {hint}; credentials come from "
                "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), a profile (AWS_PROFILE) or the pod's role"
            )
        if code in ("PreconditionFailed", "412") or status == 412:
            return error(
                f"{label} changed during the merge (its ETag is no longer the planned one); "
                "run 'mergefleet plan' again (or 'mergefleet merge --overwrite')"
            )
        if code == "InvalidRange" or status == 416:
            return error(f"cannot {action} {label}: the object is shorter than its header says; it is truncated or was replaced")
        if status is not None and (status >= 500 or status == 429 or code in ("SlowDown", "Throttling")):
            return error(
                f"cannot {action} {label}: the S3 endpoint kept failing ({code or status}) through every retry; "
                "try again later, or lower fleet.storage.max_concurrency"
            )
        message = str(details.get("Message", ""))[:200]
        return error(f"cannot {action} {label}: S3 said {code or status}" + (f" ({message})" if message else ""))
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return error(
            f"cannot {action} {label}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run with a role"
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
        return error(
            f"cannot {action} {label}: the S3 endpoint {where} is unreachable ({type(exc).__name__}); check "
            "fleet.storage.endpoint_url or AWS_ENDPOINT_URL, the network, and that the server is up"
        )
    return error(f"cannot {action} {label}: {type(exc).__name__}: {exc}")
