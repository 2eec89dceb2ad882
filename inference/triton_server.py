"""A real ``tritonserver`` the node starts itself, from the nvidia-pytriton wheel (Triton 2.51, python backend).

The wheel ships the server binary, the python backend and one backend stub per Python version, but the server
only runs when its surroundings are right; what this module arranges, each point found the hard way:

- ``--backend-directory`` is a folder of our own holding ``python/libtriton_python.so``,
  ``python/triton_python_backend_utils.py`` and ``python/triton_python_backend_stub`` for the running Python
  (copied from the wheel; the wheel keeps the stubs apart, one folder per Python version);
- ``LD_LIBRARY_PATH`` names ``sysconfig LIBDIR`` first (the stub links ``libpython3.11.so.1.0``; without it a
  pyenv Python's stub loads the system's older libpython and fails) and the wheel's ``nvidia_pytriton.libs/``
  (libtritonserver, libcudart);
- ``PATH`` starts with this interpreter's ``bin/``: the stub finds its packages (numpy, onnxruntime for the
  model's ``model.py``) through the ``python`` first on ``PATH``.

``ManagedTriton`` starts the server, waits until the named models are ready (or fails with an error naming the
model and quoting the server log), and stops it: SIGTERM, then SIGKILL of its process group after a grace
period. ``serve_forever`` is ``dicom-node triton``.

This module knows nothing of the node's settings: it takes plain values (``TritonServerOptions``), or any object
with the port and timeout attributes (``TritonPorts``, which the node's ``TritonSection`` satisfies).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Protocol

from inference.errors import BackendUnavailable, ModelMismatch

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
"""Lines of the server log quoted in a start-up error."""


class TritonPorts(Protocol):
    """What ``serve_forever`` needs of a configuration (the node's ``TritonSection`` has these)."""

    @property
    def http_port(self) -> int: ...

    @property
    def grpc_port(self) -> int: ...

    @property
    def metrics_port(self) -> int: ...

    @property
    def startup_timeout_s(self) -> float: ...

    @property
    def url(self) -> str: ...


@dataclass(frozen=True, slots=True)
class TritonServerOptions:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    """Address the HTTP, gRPC and metrics endpoints listen on: loopback for a server the node starts for itself,
    0.0.0.0 for ``dicom-node triton`` serving other hosts."""
    startup_timeout_s: float = 180.0
    stop_grace_s: float = 15.0
    """After SIGTERM, wait this long for a clean exit before SIGKILL."""
    models: tuple[str, ...] | None = None
    """Models to load and wait for; None: every model folder (with a config.pbtxt) in the repository."""
    log_verbose: int = 0
    echo_log: IO[str] | None = None
    """Also copy the server's log lines to this stream (``dicom-node triton`` uses stderr)."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class TritonDistribution:
    """Where the wheel keeps what the server needs."""

    binary: Path
    python_backend: Path
    stub: Path
    libs: Path

    @staticmethod
    def find() -> TritonDistribution:
        try:
            import pytriton
        except ImportError as exc:
            raise BackendUnavailable(
                "tritonserver: the nvidia-pytriton package is not installed (it ships the server binary)"
            ) from exc
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = TritonDistribution(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=root.parent.parent / "nvidia_pytriton.libs",
        )
        for path in (dist.binary, dist.python_backend / "libtriton_python.so", dist.stub):
            if not path.exists():
                raise BackendUnavailable(
                    f"tritonserver: {path} not found in the nvidia-pytriton wheel (Python {version} stub missing?)"
                )
        return dist


def build_backend_directory(dest: Path, dist: TritonDistribution | None = None) -> Path:
    """Fill ``dest/python/`` with the python backend and the stub for this Python; returns ``dest``."""
    dist = dist or TritonDistribution.find()
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (dist.python_backend / "libtriton_python.so", dist.python_backend / "triton_python_backend_utils.py"):
        shutil.copy2(src, py / src.name)
    shutil.copy2(dist.stub, py / "triton_python_backend_stub")
    os.chmod(py / "triton_python_backend_stub", 0o755)
    return dest


def server_environment(dist: TritonDistribution, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its python stub need (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libdirs = [str(sysconfig.get_config_var("LIBDIR") or ""), str(dist.libs)]
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", os.defpath)])
    # The stub must not pick up a PYTHONHOME/PYTHONPATH meant for another interpreter.
    env.pop("PYTHONHOME", None)
    return env


def repository_models(repository: Path) -> tuple[str, ...]:
    """Model folders of a repository: those with a config.pbtxt."""
    if not repository.is_dir():
        return ()
    return tuple(sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()))


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM the server when the process that started it dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class ManagedTriton:
    """A tritonserver process on ``repository``; a context manager. ``start()`` returns when the models are ready."""

    def __init__(self, repository: Path, options: TritonServerOptions | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.options = options or TritonServerOptions()
        self.models: tuple[str, ...] = ()
        self.startup_s: float | None = None
        """Seconds from process start until every model answered ready."""
        self._proc: subprocess.Popen[str] | None = None
        self._workdir: Path | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._reader: threading.Thread | None = None
        self._log_file: IO[str] | None = None

    # -- endpoints -----------------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.address in ("0.0.0.0", "") else self.options.address

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.options.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "tritonserver.log" if self._workdir else None

    def log_tail(self) -> str:
        return "".join(self._tail)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> ManagedTriton:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _check_repository(self) -> tuple[str, ...]:
        if not self.repository.is_dir():
            raise ModelMismatch(f"model repository {self.repository} not found")
        present = repository_models(self.repository)
        wanted = self.options.models if self.options.models is not None else present
        if not wanted:
            raise ModelMismatch(f"model repository {self.repository} holds no model (no <name>/config.pbtxt)")
        for name in wanted:
            if name not in present:
                raise ModelMismatch(
                    f"model {name!r} is missing from the model repository {self.repository} "
                    f"(no {name}/config.pbtxt; present: {', '.join(present) or 'none'})"
                )
        return tuple(wanted)

    def command(self, backend_dir: Path, dist: TritonDistribution) -> list[str]:
        o = self.options
        cmd = [
            str(dist.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={max(1, int(o.stop_grace_s) - 2)}",
            f"--http-address={o.address}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.address}",
            f"--grpc-port={o.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={o.address}",
            f"--metrics-port={o.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={o.log_verbose}",
            *o.extra_args,
        ]
        return cmd

    def start(self) -> ManagedTriton:
        if self._proc is not None:
            raise RuntimeError("ManagedTriton: already started")
        self.models = self._check_repository()
        o = self.options
        ports = {"http": o.http_port, "grpc": o.grpc_port, "metrics": o.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise BackendUnavailable(f"tritonserver: HTTP, gRPC and metrics ports must differ, got {ports}")
        for kind, port in ports.items():
            if not _port_free(o.address, port):
                raise BackendUnavailable(
                    f"tritonserver: cannot start on {self.repository}: {kind} port {port} is already in use"
                )
        dist = TritonDistribution.find()
        self._workdir = Path(tempfile.mkdtemp(prefix="dicom-node-triton-"))
        backend_dir = build_backend_directory(self._workdir / "backends", dist)
        cmd = self.command(backend_dir, dist)
        log.info("starting tritonserver on %s (models %s): %s", self.repository, ", ".join(self.models), cmd)
        self._log_file = open(self._workdir / "tritonserver.log", "w", encoding="utf-8")  # noqa: SIM115
        started = time.monotonic()
        main_thread = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            cmd,
            env=server_environment(dist),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            # Our own process group: a terminal's Ctrl-C is ours to relay, and killpg reaches the stubs.
            start_new_session=True,
            # PR_SET_PDEATHSIG fires when the creating *thread* exits, so only ask for it from the main thread.
            preexec_fn=_die_with_parent if main_thread else None,
        )
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info(
            "tritonserver ready in %.1f s (pid %d, gRPC %s, HTTP %s)",
            self.startup_s,
            self.pid,
            self.grpc_url,
            self.http_url,
        )
        return self

    def _read_log(self) -> None:
        proc, sink, echo = self._proc, self._log_file, self.options.echo_log
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            self._tail.append(line)
            if sink is not None:
                with contextlib.suppress(ValueError, OSError):
                    sink.write(line)
                    sink.flush()
            if echo is not None:
                with contextlib.suppress(ValueError, OSError):
                    echo.write(line)
                    echo.flush()

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _cause(self) -> str:
        """The server's own reason, from its log: the last error line (``error: ...`` or an ``E<date>`` line)."""
        lines = [ln.strip() for ln in self._tail if ln.strip()]
        for line in reversed(lines):
            if "load failed for model" in line or line.startswith("error:"):
                return line.removeprefix("error: ")[:400]
        for line in reversed(lines):
            if re.match(r"^E\d{4} ", line):
                return line[:400]
        return ""

    def _failure(self, what: str) -> str:
        """First line: what happened, to which model, and the server's reason; then the end of its log."""
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        tail = self.log_tail().rstrip()
        models = ", ".join(repr(m) for m in self.models)
        cause = self._cause()
        head = f"tritonserver on {self.repository}: model {models}: {what}" + (f": {cause}" if cause else "")
        return f"{head}\nlast lines of the server log:\n{tail}" if tail else f"{head} (the server wrote no log)"

    def _wait_ready(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.options.startup_timeout_s
        pending = list(self.models)
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BackendUnavailable(self._failure(f"exited with status {code} before the model was ready"))
            pending = [m for m in pending if not self._http_ok(f"/v2/models/{m}/ready")]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    self._failure(f"not ready after {self.options.startup_timeout_s:g} s (waiting for {pending})")
                )
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM, wait ``stop_grace_s``, then SIGKILL the process group. Idempotent; returns the exit status."""
        proc, code = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.options.stop_grace_s)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "tritonserver (pid %d) ignored SIGTERM for %.0f s; killing it",
                        proc.pid,
                        self.options.stop_grace_s,
                    )
            # Whatever is left of its process group (python stubs) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            if self._reader is not None:
                self._reader.join(timeout=5.0)
            if proc.stdout is not None:
                proc.stdout.close()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def split_url(url: str) -> tuple[str, int | None]:
    """``host:port`` (optionally with a scheme) -> (host, port)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):  # [::1]:8001
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    return host, int(port) if port.isdigit() else None


def is_local_host(host: str) -> bool:
    """True when ``host`` names this machine's loopback (where a server we start on 127.0.0.1 answers)."""
    host = host.strip("[]")
    if host in LOOPBACK_HOSTS:
        return True
    try:
        addrs = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(a.startswith("127.") or a == "::1" for a in addrs)


def serve_forever(model_repository: Path, triton: TritonPorts, *, address: str | None = None) -> int:
    """``dicom-node triton``: start tritonserver on the repository, block, stop it on SIGTERM/SIGINT; returns 0.

    The endpoints listen on loopback when the configured URL is a loopback address (the default: only this
    machine's node uses it), on every interface otherwise (e.g. ``url: triton:8001`` in a compose deployment).
    Returns 1 when the server dies on its own. Start-up failures raise (BackendUnavailable / ModelMismatch).
    """
    if address is None:
        host, _ = split_url(triton.url)
        address = "127.0.0.1" if is_local_host(host) else "0.0.0.0"
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    options = TritonServerOptions(
        http_port=triton.http_port,
        grpc_port=triton.grpc_port,
        metrics_port=triton.metrics_port,
        startup_timeout_s=triton.startup_timeout_s,
        address=address,
        echo_log=sys.stderr,
    )
    server = ManagedTriton(model_repository, options)
    try:
        server.start()
        print(
            f"dicom-node triton: ready in {server.startup_s:.1f} s: models {', '.join(server.models)} on gRPC "
            f"{address}:{options.grpc_port}, HTTP {address}:{options.http_port}, metrics :{options.metrics_port}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.running():
                print("dicom-node triton: tritonserver exited on its own", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
