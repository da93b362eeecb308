"""Run ``cxr-agent serve`` as a real subprocess for integration, fault and load tests.

:class:`AgentProcess` writes a config file under a temporary root (every folder inside it, free
loopback ports, short settle/draft waits, the ``fake`` grounding profile), starts the agent
with its output appended to ``<root>/agent.log``, waits until the health endpoint answers and
the listener accepts a C-ECHO, and stops it by PID: SIGTERM for a clean stop, SIGKILL for a
crash. A restart reuses the same config and folders, which is what crash-recovery tests need.

The helpers below it (:func:`wait_until`, :func:`echo`, :func:`store`, :func:`storescu`) are the
small client side every scenario shares.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from pydicom.dataset import Dataset

from dicom_agent.config import deep_merge
from tests.conftest import free_port, var_paths

T = TypeVar("T")

AGENT_AET = "CXRAUDIT"
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 Annex A)
SENDER_AET = "TESTSCU"
# The console script the package installs: the entry point a deployment runs.
CXR_AGENT = str(Path(sys.executable).parent / "cxr-agent")


def wait_until(
    predicate: Callable[[], T | None | bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    alive: Callable[[], None] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    ``alive`` is called on every round and may raise (e.g. the agent process died), so a
    crash fails the test at once instead of after the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def agent_config(root: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config mapping for a test agent living entirely under ``root``.

    Waits are short (settle 1 s, draft wait 2 s) and the grounder is the deterministic
    ``fake`` profile; ``overrides`` is deep-merged on top (``{"scp": {"min_free_bytes": 0}}``).
    """
    var = root / "var"
    config: dict[str, Any] = {
        "scp": {
            "ae_title": AGENT_AET,
            "host": "127.0.0.1",
            "port": free_port(),
            "min_free_bytes": 0,
            "acse_timeout_seconds": 10,
            "dimse_timeout_seconds": 10,
            "network_timeout_seconds": 10,
        },
        "paths": {name: str(path) for name, path in var_paths(var).items()},
        "pairing": {
            "settle_seconds": 1,
            "draft_wait_seconds": 2,
            "study_wait_seconds": 30,
            "poll_seconds": 0.2,
        },
        "worker": {
            "batch_wait_seconds": 0.1,
            "retry_backoff_seconds": 0.5,
            "retry_backoff_max_seconds": 2,
            "model_retry_seconds": 1,
        },
        "drafts": {"stable_seconds": 0.2, "poll_seconds": 0.2},
        "grounding": {"profile": "fake", "input_size": 64},
        "logging": {"level": "INFO"},
        "health": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
    }
    return deep_merge(config, overrides or {})


class AgentDied(RuntimeError):
    """The agent process exited while a test was waiting on it."""


class AgentProcess:
    """One ``cxr-agent serve`` subprocess under a temporary root; stopped by PID.

    ``wrapper`` prefixes the command (``["strace", "-f", ...]``); the agent is then a child of
    the wrapper, so :meth:`kill` signals the process group this object started.
    """

    def __init__(
        self,
        root: Path,
        overrides: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.config = agent_config(root, overrides)
        self.config_path = root / "agent.yaml"
        self.log_path = root / "agent.log"
        self.env = env or {}
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.write_config()

    # -- configuration and folders -------------------------------------------------------

    def write_config(self) -> None:
        """(Re)write the config file; call after changing :attr:`config` and before a start."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")

    def path(self, name: str) -> Path:
        """A configured folder: ``spool``, ``drafts``, ``out``, ``quarantine`` or ``state``."""
        if name == "state":
            return Path(self.config["paths"]["state"]).parent
        return Path(self.config["paths"][name])

    @property
    def port(self) -> int:
        return int(self.config["scp"]["port"])

    @property
    def health_url(self) -> str:
        h = self.config["health"]
        return f"http://{h['host']}:{h['port']}"

    # -- process control -----------------------------------------------------------------

    def command(self) -> list[str]:
        return [*self.wrapper, CXR_AGENT, "serve", "--config", str(self.config_path)]

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start the agent (appending to the log) and, by default, wait until it serves."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("agent already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AGENT")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- test harness: start #{self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: a wrapper and its child die together
            )
        if wait:
            self.wait_ready(timeout)

    def check_alive(self) -> None:
        """Raise :class:`AgentDied` (with the log tail) when the process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise AgentDied(f"agent exited with {code}; log tail:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for ``/healthz`` to answer and the listener to accept a C-ECHO."""
        wait_until(self.healthz, timeout=timeout, what="agent health", alive=self.check_alive)
        wait_until(
            lambda: echo(self.port) == 0,
            timeout=timeout,
            what="agent C-ECHO",
            alive=self.check_alive,
        )

    @property
    def pid(self) -> int:
        """PID of the agent itself: the wrapper's child when the wrapper forks one (strace), else
        the wrapper's own (memray runs the agent in its process)."""
        if self.proc is None:
            raise RuntimeError("agent not started")
        if not self.wrapper:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0]) if children else self.proc.pid

    def kill(self) -> None:
        """SIGKILL: a crash. With a wrapper, the whole process group started here dies."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.wrapper:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (clean shutdown); SIGKILL when it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        target = self.pid if self.wrapper else self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    # -- observation -----------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def healthz(self) -> dict[str, Any] | None:
        """The ``/healthz`` JSON body, or None while the endpoint does not answer 200."""
        try:
            r = httpx.get(f"{self.health_url}/healthz", timeout=2.0)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def metrics(self) -> str:
        return httpx.get(f"{self.health_url}/metrics", timeout=5.0).text

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run another ``cxr-agent`` command against this agent's config (e.g. ``status``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AGENT")}
        return subprocess.run(
            [CXR_AGENT, *args, "--config", str(self.config_path)],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        """``cxr-agent status --json`` parsed."""
        done = self.cli("status", "--json")
        if done.returncode != 0:
            raise RuntimeError(f"status failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)

    def rss_kib(self) -> int:
        """Resident set size of the agent process (VmRSS from /proc, KiB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS not found")

    def db_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Read the agent's state DB (a second, read-only connection; WAL allows it)."""
        import sqlite3

        uri = f"file:{self.config['paths']['state']}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()

    def files_under_root(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    def result(self, study_uid: str) -> dict[str, Any] | None:
        """The study's latest ``out/<study>/audit.json`` parsed, or None before there is one."""
        path = self.path("out") / study_uid / "audit.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def versions(self, study_uid: str) -> list[int]:
        """Result versions present on disk (``out/<study>/v<N>/audit.json``)."""
        folder = self.path("out") / study_uid
        return sorted(int(p.parent.name[1:]) for p in folder.glob("v*/audit.json"))

    def drop_draft(self, name: str, text: str) -> Path:
        """Write a draft atomically (temp name the reader ignores, then rename)."""
        folder = self.path("drafts")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{name}.part"
        tmp.write_text(text, encoding="utf-8")
        return tmp.rename(folder / name)


@contextlib.contextmanager
def running_agent(
    root: Path,
    overrides: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    start: bool = True,
) -> Iterator[AgentProcess]:
    """Context manager: an :class:`AgentProcess`, started, always stopped by PID on exit."""
    agent = AgentProcess(root, overrides, env=env)
    try:
        if start:
            agent.start()
        yield agent
    finally:
        agent.stop()


# -- the client side --------------------------------------------------------------------------


def make_study(images: int, *, accession: str, size: int = 128, **kw: Any) -> list[Dataset]:
    """``images`` synthetic radiographs of one new study (one series), sentinel identity."""
    from pydicom.uid import generate_uid

    from tests.support.builders import make_cxr

    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for k in range(images):
        ds = make_cxr(rows=size, cols=size, study_uid=study_uid, series_uid=series_uid,
                      accession=accession, seed=k, **kw)
        ds.InstanceNumber = k + 1
        out.append(ds)
    return out


def echo(port: int, *, called_aet: str = AGENT_AET, calling_aet: str = SENDER_AET,
         host: str = "127.0.0.1", timeout: float = 5.0,
         tls: ssl.SSLContext | None = None) -> int | None:
    """C-ECHO (PS3.4 Annex A); the status, or None when no association could be made.

    ``tls``: a client context; the association then runs over TLS (PS3.15 Annex B.1).
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port, ae_title=called_aet,
                         tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def store(
    port: int,
    datasets: Sequence[Dataset],
    *,
    called_aet: str = AGENT_AET,
    calling_aet: str = SENDER_AET,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    on_status: Callable[[Dataset, int], None] | None = None,
    tls: ssl.SSLContext | None = None,
    source: str | None = None,
) -> list[int | None]:
    """C-STORE (PS3.4 Annex B) each dataset over one association; statuses in order.

    A status is None when the association ended before the response arrived. ``on_status``
    is called as soon as each response is in, so a sender killed mid-run still has a record
    of what was acknowledged. ``source``: the local address to send from (another loopback
    address stands for another host).
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, ts in sorted({(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets}):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_aet,
                         tls_args=(tls, host) if tls is not None else None,
                         bind_address=(source, 0) if source is not None else None)
    if not assoc.is_established:
        return [None] * len(datasets)
    out: list[int | None] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                out.append(None)
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except (RuntimeError, ValueError):
                out.append(None)
                continue
            status = int(rsp.Status) if "Status" in rsp else None
            out.append(status)
            if status is not None and on_status is not None:
                on_status(ds, status)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    called_aet: str = AGENT_AET,
    calling_aet: str = SENDER_AET,
    extra: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk ``storescu`` (``-R``: propose only the classes of the files sent, TCP_NODELAY)."""
    return subprocess.run(
        ["storescu", "-R", "-aet", calling_aet, "-aec", called_aet, *extra, "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )


# -- a model server that misbehaves on request --------------------------------------------------


class StubModelServer:
    """A local OpenAI-compatible chat-completions server with a switchable behaviour.

    ``mode``: ``ok`` answers ``answer`` (a grounding JSON list) after ``delay`` seconds;
    ``error`` answers HTTP 500; ``hang`` holds the request open until the server stops (the
    client's timeout fires). Every request is counted and time-stamped in :attr:`requests`
    (arrival) and :attr:`answered` (response sent), so a test can act right after an answer.
    Serves on 127.0.0.1 in a daemon thread; :meth:`stop` ends it.
    """

    def __init__(self, mode: str = "ok", *, delay: float = 0.0,
                 answer: str = '[{"label": "no_finding", "box_2d": null}]') -> None:
        import http.server
        import threading

        self.mode, self.delay, self.answer = mode, delay, answer
        self.requests: list[float] = []
        self.answered: list[float] = []
        self._release = threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                stub.requests.append(time.time())
                if stub.mode == "hang":
                    stub._release.wait()
                    return
                if stub.mode == "error":
                    self.send_response(500)
                    self.end_headers()
                    stub.answered.append(time.time())
                    return
                stub._release.wait(stub.delay)
                body = json.dumps(
                    {"choices": [{"index": 0, "message": {"role": "assistant",
                                                          "content": stub.answer}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                stub.answered.append(time.time())

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def write_profile(self, folder: Path, *, name: str = "stub-model",
                      timeout_seconds: float = 2.0) -> str:
        """Write a grounding profile (``backend: openai``) for this server; return its name."""
        folder.mkdir(parents=True, exist_ok=True)
        profile = {
            "name": name,
            "task": "grounding",
            "description": "test stub behind a local OpenAI-compatible server",
            "backend": "openai",
            "model": "stub",
            "base_url": self.base_url,
            "timeout_seconds": timeout_seconds,
            "max_retries": 0,
            "backoff_seconds": 0,
            "concurrency": 2,
            "prompt": "grounding",
            "parser": "grounding_json",
            "generation": {"max_new_tokens": 64, "retries": 0},
            "routing": [{"modality": ["CR", "DX"]}],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
        return name

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
