#!/usr/bin/env bash
# Start the local S3 server (moto) on 127.0.0.1 and print the variables to export.
#   infra/s3-server.sh                 # port 9000, buckets models and merges
#   infra/s3-server.sh --port 9100 --bucket bench
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
exec "$python" "$here/s3_server.py" "$@"
