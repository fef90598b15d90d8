#!/usr/bin/env bash
# The local stack on 127.0.0.1: S3 (moto), an MLflow server, a Prefect server, a process worker
# and the shard starter its flow runs start from (flows/prestart.py).
#
#   infra/stack.sh up        # start all five (each waits until it answers), print the variables to export
#   infra/stack.sh status    # which are running, and their addresses
#   infra/stack.sh down      # stop all five (SIGINT to each process group, SIGKILL after 20 s)
#
# Pids, logs and data live in the state folder ($MERGEFLEET_STACK_DIR, default
# ~/.local/state/mergefleet-stack); `down` keeps the data, `down --purge` removes the folder.
# Ports and pool: S3_PORT (9000), MLFLOW_PORT (5000), PREFECT_PORT (4200), POOL (local).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
bin="$(dirname "$python")"
state="${MERGEFLEET_STACK_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/mergefleet-stack}"
s3_port="${S3_PORT:-9000}"
mlflow_port="${MLFLOW_PORT:-5000}"
prefect_port="${PREFECT_PORT:-4200}"
pool="${POOL:-local}"
services=(s3 mlflow prefect prestart worker)
prestart_socket="$state/prestart.sock"

health_url() {
  case "$1" in
    s3) echo "http://127.0.0.1:$s3_port/moto-api/" ;;
    mlflow) echo "http://127.0.0.1:$mlflow_port/health" ;;
    prefect) echo "http://127.0.0.1:$prefect_port/api/health" ;;
    worker) echo "http://127.0.0.1:$prefect_port/api/work_pools/$pool" ;;
    prestart) echo "unix:$prestart_socket" ;;
  esac
}

alive() {  # alive PID: the process exists and has not exited (a zombie waits only to be reaped)
  local stat; stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  [[ "$stat" != Z* ]]
}

running() {  # running NAME: its pid file names a live process
  [[ -f "$state/$1.pid" ]] && alive "$(cat "$state/$1.pid")"
}

answers() {  # answers URL: an http URL answers 200; unix:PATH accepts a connection
  "$python" - "$1" <<'PY'
import socket, sys, urllib.request
if sys.argv[1].startswith("unix:"):
    with socket.socket(socket.AF_UNIX) as probe:
        sys.exit(probe.connect_ex(sys.argv[1][5:]))
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

start() {  # start NAME COMMAND...: in its own session, output to NAME.log
  local name="$1"; shift
  if running "$name"; then echo "$name: already running (pid $(cat "$state/$name.pid"))"; return; fi
  # a script's background job starts with SIGINT and SIGQUIT ignored (as does everything under a
  # shell that ignored them, which `trap` cannot undo), and so would every service: `down` could
  # then only kill them (Prefect's worker re-sends itself the ignored SIGINT and runs on)
  "$python" -c 'import os, signal, sys
for number in (signal.SIGINT, signal.SIGQUIT): signal.signal(number, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
  local url; url="$(health_url "$name")"
  for _ in $(seq 1 240); do
    if answers "$url"; then echo "$name: up ($url)"; return; fi
    if ! running "$name"; then echo "$name: exited; last lines of $state/$name.log:" >&2; tail -20 "$state/$name.log" >&2; exit 1; fi
    sleep 0.5
  done
  echo "$name: no answer from $url within 120 s; see $state/$name.log" >&2
  exit 1
}

stop() {  # stop NAME: SIGINT to its process group, SIGKILL after 20 s
  local name="$1"
  running "$name" || { rm -f "$state/$name.pid"; return; }
  local pid; pid="$(cat "$state/$name.pid")"
  kill -INT -- "-$pid" 2>/dev/null || kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do alive "$pid" || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do alive "$pid" || break; sleep 0.5; done  # SIGKILL takes effect soon, not at once
  rm -f "$state/$name.pid"
  echo "$name: stopped"
}

pool_engine_command() {  # the pool runs each flow run as `$python -m flows.prestart`: a child of the
  # starter, which has imported Prefect and torch already, or else `$python -m prefect.engine`
  # (left unset, Prefect 3.8's process worker starts a workspace supervisor that imports
  # Prefect and then execs the engine, which imports it again: ~2 CPU-s more per shard)
  "$python" - "http://127.0.0.1:$prefect_port/api" "$pool" "$python" <<'PY'
import shlex, sys
import httpx
from prefect.workers.process import ProcessWorker
api, pool, python = sys.argv[1:]
template = ProcessWorker.get_default_base_job_template()
template["variables"]["properties"]["command"]["default"] = shlex.join([python, "-m", "flows.prestart"])
found = httpx.get(f"{api}/work_pools/{pool}", timeout=30)
if found.status_code == 200 and found.json()["type"] != "process":
    sys.exit(f"work pool '{pool}' is a {found.json()['type']} pool; the stack's worker needs a process pool (set POOL)")
if found.status_code == 404:
    done = httpx.post(f"{api}/work_pools/", json={"name": pool, "type": "process", "base_job_template": template}, timeout=30)
else:
    done = httpx.patch(f"{api}/work_pools/{pool}", json={"base_job_template": template}, timeout=30)
if done.is_error:
    sys.exit(f"work pool '{pool}': the Prefect server refused its job template ({done.status_code}): {done.text[:300]}")
PY
  echo "pool $pool: flow runs start as '$python -m flows.prestart' (children of the starter)"
}

write_env() {
  cat >"$state/env.sh" <<ENV
export AWS_ACCESS_KEY_ID=mergefleet-local
export AWS_SECRET_ACCESS_KEY=mergefleet-local
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port
export PREFECT_API_URL=http://127.0.0.1:$prefect_port/api
ENV
}

case "${1:-}" in
  up)
    mkdir -p "$state/prefect" "$state/mlflow-artifacts"
    write_env
    start s3 "$python" "$here/s3_server.py" --port "$s3_port"
    start mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" \
      --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$state/mlflow-artifacts"
    # PREFECT_UI_API_URL: the UI in a browser asks this address, which Prefect otherwise takes
    # from the server's default port (4200) or from a PREFECT_API_URL left in this shell
    start prefect env PREFECT_HOME="$state/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false \
      PREFECT_UI_API_URL="http://127.0.0.1:$prefect_port/api" \
      "$bin/prefect" server start --host 127.0.0.1 --port "$prefect_port"
    pool_engine_command
    start prestart env PREFECT_HOME="$state/prefect" PREFECT_API_URL="http://127.0.0.1:$prefect_port/api" \
      "$python" -m flows.prestart serve "$prestart_socket"
    start worker env PREFECT_HOME="$state/prefect" PREFECT_API_URL="http://127.0.0.1:$prefect_port/api" \
      MERGEFLEET_PRESTART_SOCKET="$prestart_socket" \
      PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-1}" "$bin/prefect" worker start --pool "$pool" --type process
    echo "# the stack is up; in your shell:  source $state/env.sh"
    cat "$state/env.sh"
    echo "# then: mergefleet deploy recipe.yaml s3://merges/out --pool $pool"
    ;;
  down)
    for ((i = ${#services[@]} - 1; i >= 0; i--)); do stop "${services[$i]}"; done
    if [[ "${2:-}" == "--purge" ]]; then rm -rf "$state"; echo "removed $state"; fi
    ;;
  status)
    for name in "${services[@]}"; do
      if running "$name" && answers "$(health_url "$name")"; then echo "$name: up (pid $(cat "$state/$name.pid"), $(health_url "$name"))"
      elif running "$name"; then echo "$name: running but not answering (pid $(cat "$state/$name.pid")); see $state/$name.log"
      else echo "$name: down"; fi
    done
    ;;
  *)
    echo "usage: $0 up | status | down [--purge]" >&2
    exit 2
    ;;
esac
