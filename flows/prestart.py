"""Shard flow runs that start in an interpreter which has already imported Prefect and torch.

A process work pool starts every flow run as a new ``python -m prefect.engine``: before
the shard's first byte it imports Prefect (~1 s here) and torch (~1.1 s), most of the
2 s that a shard may spend on orchestration. A *starter* (``serve``) imports them once
and then forks one child per flow run; the pool's command is this module's client
(``python -m flows.prestart``), which hands the starter its arguments, environment,
working folder and standard streams and waits for the child's exit status. To the
worker the client is the flow run's process: its output, its exit code, the signals the
worker sends (passed on to the child) and its death (the child is stopped) all behave as
they would for the engine itself. With no starter (the variable unset, nothing
listening, another Python, source changed since the starter imported it) the client
becomes ``python -m prefect.engine`` in place, so the command is safe on any machine.

The starter is single-threaded (a fork copies only the calling thread, and no lock can be
held by a thread that is not copied). Kubernetes pods are new containers and gain nothing
from it; it serves process pools (``infra/stack.sh`` starts one beside its worker).
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

SOCKET_VARIABLE = "MERGEFLEET_PRESTART_SOCKET"
_STREAMS = (0, 1, 2)
_PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
"""The signals a client passes on to its flow run, whose dispositions the flow run takes from the client."""
_MAX_MESSAGE = 1 << 20
_REQUEST_SECONDS = 5.0
_GRACE_SECONDS = 30.0  # how long a child whose client went away has to stop before SIGKILL


def _send(conn: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    payload = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(conn, [payload], list(fds))
    else:
        conn.sendall(payload)


def _receive(conn: socket.socket, reader: list[bytes], with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One newline-ended JSON message (None at end of stream) and any descriptors sent with it."""
    fds: list[int] = []
    while b"\n" not in b"".join(reader):
        if with_fds and not fds:
            data, received, _flags, _addr = socket.recv_fds(conn, 65536, len(_STREAMS))
            fds = list(received)
        else:
            data = conn.recv(65536)
        if not data:
            return None, fds
        reader.append(data)
        if sum(map(len, reader)) > _MAX_MESSAGE:
            raise ValueError("message too long")
    line, _, rest = b"".join(reader).partition(b"\n")
    reader[:] = [rest] if rest else []
    return json.loads(line), fds


# -- the client: the work pool's command ---------------------------------------------------


def _run_engine_here(args: list[str]) -> NoReturn:
    """Become ``python -m prefect.engine ARGS`` (the pool's usual command)."""
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *args])


def client(args: list[str]) -> int:
    """The pool's command: run the flow run ``args`` in a child of the starter, or here."""
    path = os.environ.get(SOCKET_VARIABLE)
    if not path:
        _run_engine_here(args)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader: list[bytes] = []
    try:
        conn.connect(path)
        ignored = [int(signum) for signum in _PASSED_ON if signal.getsignal(signum) == signal.SIG_IGN]
        request = {"argv": args, "env": dict(os.environ), "cwd": os.getcwd(), "executable": sys.executable, "ignored": ignored}
        _send(conn, request, _STREAMS)
        answer, _ = _receive(conn, reader)
    except OSError as error:
        answer = {"refused": f"no starter answers on {path} ({error.strerror or error})"}
    if not answer or "pid" not in answer:
        conn.close()
        reason = (answer or {}).get("refused", f"the starter on {path} hung up")
        print(f"mergefleet prestart: {reason}; starting the engine here", file=sys.stderr)
        _run_engine_here(args)
    child = int(answer["pid"])

    def pass_on(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in _PASSED_ON:
        signal.signal(signum, pass_on)
    ended, _ = _receive(conn, reader)  # a signal handled meanwhile does not interrupt the wait (PEP 475)
    if ended is None:  # the starter died: it stops its children as it goes
        print("mergefleet prestart: the starter went away before the flow run ended", file=sys.stderr)
        return 1
    status = int(ended["status"])
    if status < 0:  # killed by a signal: end the same way, so the worker sees what the engine would show
        if -status != signal.SIGKILL:  # SIGKILL has no handler to reset
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


# -- the starter ---------------------------------------------------------------------------


def _project_sources() -> dict[str, float]:
    """Modification times of the project's modules imported so far (flows/, orchestrator/)."""
    root = Path(__file__).resolve().parent.parent
    times: dict[str, float] = {}
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(root):
            try:
                times[origin] = os.stat(origin).st_mtime
            except OSError:
                times[origin] = -1.0
    return times


def _changed(sources: dict[str, float]) -> str | None:
    for origin, mtime in sources.items():
        try:
            now = os.stat(origin).st_mtime
        except OSError:
            now = -1.0
        if now != mtime:
            return origin
    return None


@dataclass
class _Child:
    conn: socket.socket
    pid: int
    pidfd: int
    stopped_at: float | None = None  # when its client went away and it was asked to stop


@dataclass
class _Request:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int]
    ignored: list[int]  # the signals the client ignores (started under nohup, say)


def _import_everything() -> None:
    """What each flow run would import before its first tensor."""
    import prefect.engine  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import torch  # noqa: F401

    import flows.merge_shard  # noqa: F401


def serve(path: str) -> _Request:
    """Import, listen on ``path`` and fork a child per request. Returns only in a child, with
    the request's streams, environment and folder in place; the caller runs the engine."""
    from orchestrator.memory import keep_freed_memory

    keep_freed_memory()
    _import_everything()
    sources = _project_sources()
    starter = os.getpid()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{starter}"
    try:
        listener.bind(staging)
    except OSError as error:
        raise SystemExit(f"mergefleet prestart: cannot listen on {staging}: {error.strerror or error} "
                         "(a Unix socket's path must be shorter than 108 bytes, in a folder you may write)") from None
    listener.listen(64)
    os.replace(staging, path)  # a client connects to a starter that has imported and listens, or to none
    bound = os.stat(path).st_ino
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    children: dict[int, _Child] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    print(f"mergefleet prestart: ready on {path} (pid {starter})", flush=True)

    try:
        while not stopping:
            for child in children.values():  # asked to stop and still there after the grace period
                if child.stopped_at is not None and time.monotonic() - child.stopped_at > _GRACE_SECONDS:
                    os.kill(child.pid, signal.SIGKILL)
            for key, _events in selector.select(timeout=1.0):
                if key.data is None:
                    conn, _ = listener.accept()
                    request = _accept(conn, sources)
                    if request is None:
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        selector.close()
                        listener.close()
                        for child in children.values():
                            child.conn.close()
                            os.close(child.pidfd)
                        conn.close()
                        _become(request, starter)
                        return request
                    for fd in request.fds:
                        os.close(fd)
                    child = _Child(conn, pid, os.pidfd_open(pid))
                    children[pid] = child
                    selector.register(child.pidfd, selectors.EVENT_READ, ("child", pid))
                    try:
                        _send(conn, {"pid": pid})
                        selector.register(conn, selectors.EVENT_READ, ("client", pid))
                    except OSError:  # the client is gone already
                        child.stopped_at = time.monotonic()
                        os.kill(pid, signal.SIGTERM)
                    print(f"mergefleet prestart: flow run {request.env.get('PREFECT__FLOW_RUN_ID', '?')} is pid {pid}", flush=True)
                elif key.data[0] == "child" and (child := children.pop(key.data[1], None)):
                    _, wait_status = os.waitpid(child.pid, 0)
                    selector.unregister(child.pidfd)
                    os.close(child.pidfd)
                    print(f"mergefleet prestart: pid {child.pid} ended with status {os.waitstatus_to_exitcode(wait_status)}", flush=True)
                    if child.stopped_at is None:  # its client is still there to hear how it ended
                        selector.unregister(child.conn)
                        try:
                            _send(child.conn, {"status": os.waitstatus_to_exitcode(wait_status)})
                        except OSError:
                            pass
                    child.conn.close()
                elif key.data[0] == "client" and (child := children.get(key.data[1])):
                    # a client never speaks after its request: this is its end, so the flow
                    # run's process is gone to the worker, and the child must go too
                    selector.unregister(child.conn)
                    child.stopped_at = time.monotonic()
                    os.kill(child.pid, signal.SIGTERM)
    finally:
        if os.getpid() == starter:
            for child in children.values():
                os.kill(child.pid, signal.SIGTERM)
            try:
                if os.stat(path).st_ino == bound:  # not a socket a newer starter bound
                    os.unlink(path)
            except OSError:
                pass
    raise SystemExit(0)


def _accept(conn: socket.socket, sources: dict[str, float]) -> _Request | None:
    """The client's request, or None (refused with a reason, or unreadable); the descriptors
    it sent are closed unless they go with the request."""
    conn.settimeout(_REQUEST_SECONDS)  # a client that connects and says nothing must not stall the rest
    fds: list[int] = []
    try:
        message, fds = _receive(conn, [], with_fds=True)
        conn.settimeout(None)
        if message is not None and len(fds) == len(_STREAMS):
            if message.get("executable") != sys.executable:
                _send(conn, {"refused": f"the starter runs {sys.executable}, the flow run asks for {message.get('executable')}"})
            elif changed := _changed(sources):
                _send(conn, {"refused": f"{changed} changed after the starter imported it (restart the starter)"})
            else:
                return _Request(argv=list(message["argv"]), env=dict(message["env"]), cwd=str(message["cwd"]), fds=fds,
                                ignored=[int(signum) for signum in message.get("ignored", [])])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for fd in fds:
        os.close(fd)
    return None


def _become(request: _Request, starter: int) -> None:
    """In a forked child: take the client's streams, environment, folder and signal
    dispositions (not the starter's: one started under nohup ignores hangups), and Prefect's
    settings from that environment."""
    from orchestrator.parent import exit_with_parent

    for signum in _PASSED_ON:
        signal.signal(signum, signal.SIG_IGN if signum in request.ignored else signal.SIG_DFL)
    os.setpgid(0, 0)
    exit_with_parent(starter)
    for target, fd in zip(_STREAMS, request.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request.env)
    os.chdir(request.cwd)
    sys.argv = ["prefect.engine", *request.argv]

    import prefect.context
    import prefect.logging.configuration

    prefect.context.refresh_global_settings_context()
    prefect.logging.configuration.setup_logging(incremental=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(argv[1])
        import runpy

        import prefect.engine

        runpy.run_path(prefect.engine.__file__, run_name="__main__")  # as `python -m prefect.engine` would
        return 0
    return client(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
