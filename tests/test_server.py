"""The node as a server: connections past the open-file limit, slow headers and bodies, declared
oversize bodies, the command line, and the log. Real `python -m app` processes, real sockets."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.server import ConnectionGuard, connection_cap
from tests.conftest import ROOT, NodeProcess, free_port, wait_until

FD_LIMIT = 256


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class LimitedNode(NodeProcess):
    """A node started as under `ulimit -n 256`."""

    def start(self, timeout: float = 20) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
                preexec_fn=_limit_fds,
            )
        wait_until(self._healthy, timeout, f"node on port {self.port} (log: {self.log})")
        return self


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for n in started:
        n.kill9()


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the node has closed `sock` (whatever it wrote first is read and dropped)."""
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def read_response(sock: socket.socket, within: float) -> bytes:
    """Everything the node writes until it closes the connection, or `within` seconds pass."""
    sock.settimeout(0.1)
    data = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_idle_connections_past_the_fd_limit_leave_the_node_serving(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node = LimitedNode(tmp_path, HEADER_TIMEOUT_MS="1500", LOG_LEVEL="info")
    nodes.append(node.start())
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(FD_LIMIT + 40)]
    try:
        # Another client is answered at once (served, or refused cleanly), never left hanging.
        started = time.monotonic()
        try:
            answer = httpx.get(node.url + "/health", timeout=3).status_code
        except httpx.TransportError as exc:
            assert not isinstance(exc, httpx.TimeoutException), "the node left a client hanging"
            answer = 0  # reset after the node's 503: a refusal too
        assert answer in (0, 200, 503) and time.monotonic() - started < 3
        # The idle connections are closed at the header deadline...
        for sock in idle:
            sock.setblocking(False)
        wait_until(lambda: all(closed_by_peer(s) for s in idle), 6, "idle connections closed")
        # ...then everyone is served again, and the refusals were logged (once, not per refusal).
        assert httpx.get(node.url + "/health", timeout=3).status_code == 200
        log = node.log.read_text()
        assert log.count("connection limit reached") == 1, log
        assert "accepting up to 192 connections" in log
    finally:
        for sock in idle:
            sock.close()


def test_the_watcher_is_capped_below_its_fd_limit_too(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env |= {"WATCHER_PORT": str(port), "WATCHER_TOKEN": "w" * 16, "WATCHER_LOG_LEVEL": "info"}
    log = tmp_path / "watcher.log"
    url = f"http://127.0.0.1:{port}/health"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher"],
            cwd=tmp_path,
            env=env | {"PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=out,
            preexec_fn=_limit_fds,
        )
    idle: list[socket.socket] = []
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 20, "the watcher")
        idle += [socket.create_connection(("127.0.0.1", port)) for _ in range(FD_LIMIT + 40)]
        started = time.monotonic()
        try:
            answer = httpx.get(url, timeout=3).status_code
        except httpx.TransportError as exc:
            assert not isinstance(exc, httpx.TimeoutException), "the watcher left a client hanging"
            answer = 0
        assert answer in (0, 200, 503) and time.monotonic() - started < 3
        wait_until(lambda: "connection limit reached" in log.read_text(), 5, "the log line")
    finally:
        for sock in idle:
            sock.close()
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def quick_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with short deadlines for the tests below (each uses its own connections)."""
    node = NodeProcess(
        tmp_path_factory.mktemp("quick"), HEADER_TIMEOUT_MS="800", BODY_TIMEOUT_MS="800"
    )
    try:
        yield node.start()
    finally:
        node.kill9()


def test_headers_that_never_arrive_are_timed_out(quick_node: NodeProcess) -> None:
    silent = socket.create_connection(("127.0.0.1", quick_node.port))
    partial = socket.create_connection(("127.0.0.1", quick_node.port))
    partial.sendall(b"POST /channels/x/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    with silent, partial:
        assert read_response(silent, 4) == b""  # nothing asked, nothing answered: closed
        assert read_response(partial, 4).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 3


def test_trickled_headers_do_not_move_the_deadline(quick_node: NodeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", quick_node.port))
    sock.settimeout(0.1)
    with sock:
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 100
        closed_after = None
        for byte in request[:40]:  # one byte every 100 ms: 4 s if the node waited for all
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(65536) == b"":
                    raise ConnectionResetError
            except TimeoutError:
                continue
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and closed_after < 2.5


def test_endless_headers_are_refused_before_they_fill_memory(quick_node: NodeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", quick_node.port))
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        lines = (b"X-Padding: " + b"a" * 1000 + b"\r\n") * 64
        sent, closed = 0, False
        try:
            while sent < 256 * 1024 * 1024:  # the node kept all of this before (GBs in 10 s)
                sock.sendall(lines)
                sent += len(lines)
        except ConnectionError:
            closed = True
        # Refused after 64 KiB; what got through is what the two sockets' buffers hold.
        assert closed and sent < 32 * 1024 * 1024, sent


def test_a_body_that_never_arrives_is_timed_out(quick_node: NodeProcess) -> None:
    head = (
        b"POST /channels/x/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", quick_node.port))
    with sock:
        sock.sendall(head + b'{"messages": [')
        started = time.monotonic()
        assert read_response(sock, 4).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 3
    # Nothing of it was stored.
    depth = httpx.get(quick_node.url + "/channels/x", timeout=5)
    assert depth.status_code == 404 or depth.json()["counts"]["ready"] == 0


def test_a_body_cut_short_is_not_acted_on_even_when_what_came_is_valid_json(
    quick_node: NodeProcess,
) -> None:
    body = b'{"messages": [{"body": 1}]}'
    head = (
        b"POST /channels/cut/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body) + 8).encode()  # eight bytes of trailing space that never come
        + b"\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", quick_node.port))
    with sock:
        sock.sendall(head + body)
        assert read_response(sock, 4).startswith(b"HTTP/1.1 408 ")
    depth = httpx.get(quick_node.url + "/channels/cut", timeout=5)
    assert depth.status_code == 404 or depth.json()["counts"]["ready"] == 0, depth.text


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [("POST", "/channels/x/enqueue", 16 * 1024 * 1024), ("PUT", "/channels/x", 4096)],
)
def test_a_declared_oversize_body_is_refused_before_it_is_read(
    quick_node: NodeProcess, method: str, path: str, limit: int
) -> None:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit + 1}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", quick_node.port))
    with sock:
        sock.sendall(head)  # and not one byte of the body
        sock.settimeout(0.5)  # well before BODY_TIMEOUT_MS (800): no waiting for the body
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")


def test_requests_in_pieces_and_on_kept_alive_connections_still_work(
    quick_node: NodeProcess,
) -> None:
    body = b'{"messages": [{"body": 1}]}'
    head = (
        b"POST /channels/pieces/enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", quick_node.port))
    sock.settimeout(3)
    with sock:
        for _ in range(2):  # two requests on one connection, each sent in three pieces
            for piece in (head, b"\r\n" + body[:5], body[5:]):
                sock.sendall(piece)
                time.sleep(0.1)
            assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")
    with httpx.Client(base_url=quick_node.url, timeout=5) as client:
        for _ in range(3):  # kept alive past the deadlines: each request arms its own
            assert client.get("/health").status_code == 200
            time.sleep(0.5)


def test_max_connections_above_the_fd_limit_is_refused_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "MAX_CONNECTIONS": "5000", "STORE_URL": f"sqlite:///{tmp_path}/x.db"}
    run = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_limit_fds,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "MAX_CONNECTIONS" in lines[0] and "ulimit -n" in lines[0]


# ------------------------------------------------------------------------ the command line


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.parametrize("program", ["app", "watcher"])
def test_help_and_version_print_and_exit(program: str, tmp_path: Path) -> None:
    port = str(free_port())
    helped = run_cli(program, "--help", PORT=port, WATCHER_PORT=port, WATCHER_TOKEN="x" * 8)
    assert helped.returncode == 0 and "usage:" in helped.stdout and "--port" in helped.stdout
    assert "--log-level" in helped.stdout
    version = run_cli(program, "--version")
    assert version.returncode == 0 and re.fullmatch(r"lionmq-\w+ \d+\.\d+\.\d+\n", version.stdout)


@pytest.mark.parametrize(
    ("program", "args", "named"),
    [
        ("app", ["--port", "eighty"], "PORT"),
        ("app", ["--log-level", "loud"], "LOG_LEVEL"),
        ("app", ["--store-url", "postgres://x/y"], "STORE_URL"),
        ("app", ["--no-such-flag"], "--no-such-flag"),
        ("watcher", ["--port", "70000"], "WATCHER_PORT"),
    ],
)
def test_a_bad_flag_exits_2_with_one_line(
    program: str, args: list[str], named: str, tmp_path: Path
) -> None:
    run = run_cli(program, *args, WATCHER_TOKEN="x" * 8, STORE_URL=f"sqlite:///{tmp_path}/x.db")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in run.stderr


def test_flags_win_over_the_environment(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, PORT="1", NODE_ID="from-env", STORE_URL="sqlite:///nowhere/x")
    node.port = port
    node.data_dir.mkdir(parents=True, exist_ok=True)
    args = ["--port", str(port), "--node-id", "from-flag", "--log-level", "info"]
    args += ["--store-url", f"sqlite:///{tmp_path}/flag.db"]
    with node.log.open("ab") as log:
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "app", *args], cwd=ROOT, env=node.env, stdout=log, stderr=log
        )
    nodes.append(node)
    wait_until(node._healthy, 20, "the node on the flag's port")
    assert httpx.get(node.url + "/health").json()["node_id"] == "from-flag"
    assert (tmp_path / "flag.db").exists()


# ------------------------------------------------------------------------------- the log

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: \S")


def test_debug_logs_one_access_line_per_request_in_the_one_format(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path, LOG_LEVEL="debug")
    nodes.append(node.start())
    with httpx.Client(base_url=node.url, timeout=5) as client:
        assert client.post("/channels/logged/enqueue", json={"messages": [{"body": 1}]}).is_success
        assert client.get("/channels/missing").status_code == 404
    node.stop()
    lines = node.log.read_text().splitlines()
    bad = [line for line in lines if not LINE.match(line)]
    assert not bad, bad  # uvicorn's lines and LionMQ's alike
    access = [line for line in lines if " lionmq.access: " in line]
    assert sum("POST /channels/logged/enqueue 201 " in line for line in access) == 1, access
    assert sum("GET /channels/missing 404 " in line for line in access) == 1, access
    assert any(re.search(r"uvicorn[.\w]*: ", line) for line in lines)
    store = os.path.abspath(tmp_path / "lionmq.db")
    assert any(" ready on " in line and store in line for line in lines), lines


def test_info_logs_no_access_lines(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    node = NodeProcess(tmp_path, LOG_LEVEL="info")
    nodes.append(node.start())
    assert httpx.post(node.url + "/channels/quiet/enqueue", json={"messages": [{"body": 1}]})
    node.stop()
    text = node.log.read_text()
    assert "lionmq.access" not in text and "/channels/quiet" not in text
    assert all(LINE.match(line) for line in text.splitlines()), text


def test_the_start_up_line_names_mongodb_without_its_credentials() -> None:
    from app.settings import Settings

    url = "mongodb://lion:s3cret@db1:27017,db2:27017/queue?replicaSet=rs0"
    label = Settings(_env_file=None, store_url=url).store_label  # type: ignore[call-arg]
    assert label == "mongodb://db1:27017,db2:27017/queue"


# ------------------------------------------------------------------- the guard's arithmetic


@pytest.mark.parametrize(
    ("soft", "configured", "cap"),
    [(1024, None, 896), (256, None, 192), (65536, None, 57344), (1024, 100, 100)],
)
def test_the_connection_cap_keeps_a_reserve_below_the_fd_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, configured: int | None, cap: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, soft))
    assert connection_cap(configured) == cap


def test_refusals_are_logged_at_most_every_ten_seconds(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    guard = ConnectionGuard(10, 1.0, 1.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="lionmq.server"):
        for _ in range(500):
            guard.refuse()
        now[0] = 9.9
        guard.refuse()
        now[0] = 10.0
        guard.refuse()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and guard.refused == 502
    assert "refused 1 connection(s)" in lines[0] and "refused 501 connection(s)" in lines[1]
