"""A real S3 HTTP server for the tests: moto in server mode on 127.0.0.1, started (by the
same launcher as ``infra/s3_server.py``) and stopped by the tests themselves. Nothing here
mocks a client: every call goes over HTTP.

``s3_server`` (session scope) starts it, points the ``AWS_*`` environment at it with
fake keys, and stops it afterwards. ``FlakyProxy`` sits in front of it and injects
``503 SlowDown`` answers and bodies cut off midway, to test retries.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from infra.s3_server import start as start_s3_server

ACCESS_KEY = "AKIAMERGEFLEETTEST01"
SECRET_KEY = "mergefleet-test-secret-never-in-outputs-7f3a9c"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str

    def client(self, service: str = "s3", **kwargs: Any) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, **kwargs)

    def upload_dir(self, path: Path, bucket: str, prefix: str) -> str:
        """Upload every file under ``path`` to ``s3://bucket/prefix/…``; returns that URI."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(path).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def download(self, uri: str, dest: Path) -> Path:
        """Every object under ``uri`` into ``dest`` (so local readers can check it)."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for item in page.get("Contents", []):
                target = dest / item["Key"][len(prefix) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(target))
        return dest

    def bucket(self, name: str) -> str:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """Make the server check signatures and IAM policies, as AWS does (moto's switch)."""
        def reset(count: str) -> None:
            request = urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                headers={"Content-Type": "application/octet-stream"},
            )
            urllib.request.urlopen(request, timeout=10).read()

        reset("0")
        try:
            yield
        finally:
            reset("inf")


def s3_credentials() -> dict[str, str]:
    """The AWS environment of the tests' S3 server, without its endpoint: fake keys, and no
    profile, config file or instance metadata to fall back on."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The S3 server of ``infra/s3_server.py`` on a free port, for the whole session."""
    server, endpoint = start_s3_server("127.0.0.1", 0)
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        for name, value in (s3_credentials() | {"AWS_ENDPOINT_URL": endpoint}).items():
            patch.setenv(name, value)
        try:
            yield S3Server(endpoint)
        finally:
            server.stop()


# ---------------------------------------------------------------- a flaky link


_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyProxy:
    """An HTTP proxy to ``target`` that answers every ``throttle_every``-th request with
    503 SlowDown and cuts every ``cut_every``-th ranged GET's body off halfway; with
    ``drop_uploads`` (a text in the path), it reads half of each such PUT's body and
    closes the connection without an answer."""

    def __init__(self, target: str, *, throttle_every: int = 4, cut_every: int = 5, drop_uploads: str | None = None) -> None:
        self.target = target.removeprefix("http://")
        self.throttle_every, self.cut_every, self.drop_uploads = throttle_every, cut_every, drop_uploads
        self.requests = self.throttled = self.cut = self.dropped = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if proxy.drop_uploads and self.command == "PUT" and proxy.drop_uploads in self.path and length > 1:
                    self.rfile.read(length // 2)
                    with proxy._lock:
                        proxy.dropped += 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests += 1
                    number = proxy.requests
                    throttle = number % proxy.throttle_every == 0
                    ranged = self.command == "GET" and "Range" in self.headers
                    cut = ranged and not throttle and number % proxy.cut_every == 0
                    proxy.throttled += throttle
                    proxy.cut += cut
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(key, value)
                upstream_length = response.getheader("Content-Length")
                head = self.command == "HEAD" and upstream_length is not None
                self.send_header("Content-Length", upstream_length if head else str(len(data)))
                if cut and len(data) > 1:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def deny_policy(*actions: str) -> str:
    """An IAM policy allowing every S3 action except ``actions``."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": list(actions), "Resource": "*"},
            ],
        }
    )
