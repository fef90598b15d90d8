"""A local S3 server for trying mergefleet by hand: moto in server mode on 127.0.0.1.

    python infra/s3_server.py                    # port 9000, buckets 'models' and 'merges'
    python infra/s3_server.py --port 0 --bucket bench

It prints the environment that points boto3 (and so mergefleet) at it, then serves until
Ctrl-C. Objects live in memory and are gone when it stops. The keys are fake: any will do
while the server does not enforce authentication, which is moto's default.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "mergefleet-local",
    "AWS_SECRET_ACCESS_KEY": "mergefleet-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start(host: str = "127.0.0.1", port: int = 0, buckets: list[str] | tuple[str, ...] = ()):
    """Start the server in this process; returns ``(server, endpoint)``."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    endpoint = f"http://{bound_host}:{bound_port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=FAKE_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return server, endpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--bucket", action="append", help="create this bucket (repeatable; default: models, merges)")
    args = parser.parse_args()
    server, endpoint = start(args.host, args.port, args.bucket or ["models", "merges"])
    for name, value in {**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        print(f"export {name}={value}")
    print(f"# S3 server on {endpoint}; Ctrl-C stops it", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
