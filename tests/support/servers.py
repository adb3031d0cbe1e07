"""Private, throwaway servers on free loopback ports, started from the machine's binaries.

Every class has the same interface, so that tests can break any backend the same way:
``url`` and ``port``; ``start()``, ``stop()`` (graceful), ``kill()`` (SIGKILL),
``pause()`` (SIGSTOP), ``resume()`` (SIGCONT) and ``restart()`` (same port, same data).
``close()`` stops the server for good and deletes its data directory.

Each server runs in a process group (session) of its own and every signal goes to that
group, so a paused PostgreSQL is paused with its backends, and a killed one leaves no
orphan behind. Only processes started here are ever signalled; the machine's shared
servers (Redis 6379, PostgreSQL 5432, MariaDB 3306) are never touched.

A missing binary is a skip with the reason (a failure under CI): see ``missing_backend``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

from .helpers import missing_backend

__all__ = [
    "SERVERS",
    "PrivateEtcd",
    "PrivateMariaDB",
    "PrivateMemcached",
    "PrivatePgBouncer",
    "PrivatePostgreSQL",
    "PrivateRedis",
    "PrivateRedisCluster",
    "PrivateServer",
    "PrivateZooKeeper",
    "free_port",
    "wait_for_port",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now (a cluster node's own address: a port
    free on 127.0.0.1 may be taken on another loopback address)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def _dying_with_this_process(command: list[str]) -> list[str]:
    """``command`` under ``setpriv --pdeathsig KILL``: no server outlives a killed pytest.

    The kernel sends the signal when the *thread* that started the server exits, so
    only servers started from the main thread get it (a server restarted from a worker
    thread would otherwise die when that thread idles out). setpriv applies it after
    any change of user, which would clear a signal set before exec.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return command
    if command[0] == setpriv:
        return [setpriv, "--pdeathsig", "KILL", *command[1:]]
    return [setpriv, "--pdeathsig", "KILL", *command]


def _as_user(user: str, command: list[str]) -> list[str]:
    """``command`` run as ``user`` (when we are root), through setpriv."""
    entry = pwd.getpwnam(user)
    return [
        _binary("setpriv"),
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",  # "nobody" has the group "nogroup", not "nobody"
        "--clear-groups",
        *command,
    ]


def _binary(*candidates: str) -> str:
    """The first of ``candidates`` found (a name on PATH or an absolute path), or skip."""
    for candidate in candidates:
        found = shutil.which(candidate)
        if found is not None:
            return found
    missing_backend(f"{candidates[0]} is not installed (needed for a private test server)")
    raise AssertionError("unreachable")  # missing_backend skips or fails


class PrivateServer:
    """A server process of the test session's own; subclasses say how to run it."""

    #: The backend name, as in the conformance suite's parameters.
    name: ClassVar[str]
    #: The signal for a graceful stop.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: How long start() waits for the server to be ready.
    start_timeout: ClassVar[float] = 60.0

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        #: The loopback address it listens on (cluster nodes have one each).
        self.host = "127.0.0.1"
        self.port = free_port()
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"

    # -- what subclasses provide ----------------------------------------------------

    def _prepare(self) -> None:
        """Create the data directory (once, before the first start)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """The server answers (beyond accepting TCP connections); called repeatedly."""
        return True

    # -- the common interface --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the server (on the same port and data as before) and wait until ready."""
        if self.running:
            return
        if not self._prepared:
            self._prepare()
            self._prepared = True
        log = (self._workdir / f"{self.name}.log").open("ab")
        with log:
            self._proc = subprocess.Popen(
                _dying_with_this_process(self._command()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, see _signal
            )
        deadline = time.monotonic() + self.start_timeout
        try:
            # A server that exits while starting is reported at once, with what it
            # printed (waiting out the port's timeout hid why a MariaDB never came up).
            while not (self._listening() and self._ready()):
                if not self.running:
                    raise RuntimeError(f"{self!r} exited while starting: {self._log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self!r} not ready after {self.start_timeout} s: {self._log_tail()}"
                    )
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Stop gracefully (SIGKILL after 15 s)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal(signal.SIGCONT)  # a paused server cannot stop
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(self.stop_signal)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server and everything in its process group."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing answers.

        Returns once every thread of the group has stopped: ``killpg`` only queues the
        signal, and a busy server thread on the other core answered one more query after
        it (a "hung" MariaDB granted a slot 1 ms after pause() returned, in CI).
        """
        self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while self._proc is not None and not self._group_stopped():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__}: SIGSTOP did not stop the server")
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self._signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop gracefully and start again, on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop for good and delete the data."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _group_stopped(self) -> bool:
        """Whether every thread of every process in the server's group is stopped."""
        assert self._proc is not None
        group = self._proc.pid
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                # Fields after the parenthesised command: state, ppid, pgrp, ...
                fields = (proc / "stat").read_text().rpartition(")")[2].split()
                if int(fields[2]) != group:
                    continue
                for task in (proc / "task").iterdir():
                    state = (task / "stat").read_text().rpartition(")")[2].split()[0]
                    if state not in ("T", "t", "Z", "X"):
                        return False
            except (OSError, IndexError, ValueError):
                continue  # the process or thread went away meanwhile
        return True

    def _signal(self, signum: signal.Signals) -> None:
        if self._proc is None:
            return
        # The group is the one start_new_session made for this server: its pgid is the
        # server's own pid, so this never reaches a process this harness did not start.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), 0.2):
                return True
        except OSError:
            return False

    def _log_tail(self) -> str:
        path = self._workdir / f"{self.name}.log"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


class PrivateRedis(PrivateServer):
    """A redis-server without persistence; with ``password``, one that requires it."""

    name = "redis"

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self._binary = _binary("redis-server")
        self._password = password
        super().__init__(workdir)
        userinfo = f":{password}@" if password else ""
        self.url = f"redis://{userinfo}127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        auth = ["--requirepass", self._password] if self._password else []
        return [
            self._binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._workdir),
            *auth,
        ]


class _RedisClusterNode(PrivateRedis):
    """One node of a :class:`PrivateRedisCluster` (its state in ``nodes.conf``).

    Its cluster bus gets a free port of its own: the default (the port + 10000) is past
    65535 for half the free ports, and may be taken.
    """

    name = "redis-cluster-node"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.bus_port = free_port()

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self._workdir / "nodes.conf"),
            "--cluster-node-timeout",
            "2000",
        ]


class PrivateRedisCluster:
    """A Redis Cluster of ``primaries`` nodes (and ``replicas`` per primary) on loopback.

    The same interface as :class:`PrivateServer`, for the whole cluster (``kill()`` kills
    every node); ``nodes`` are the nodes themselves, for faults of one node. The slots are
    assigned by ``redis-cli --cluster create``, once: a restart keeps them (``nodes.conf``).
    """

    name = "redis-cluster"

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 0) -> None:
        self._cli = _binary("redis-cli")
        workdir.mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        self._replicas = replicas
        self.nodes = [
            _RedisClusterNode(workdir / f"node-{number}")
            for number in range(primaries * (1 + replicas))
        ]
        self.port = self.nodes[0].port
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        self.url = f"redis+cluster://{hosts}"
        self._created = False

    def __repr__(self) -> str:
        return f"<PrivateRedisCluster {self.url}>"

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        if not self._created:
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            replicas = ["--cluster-replicas", str(self._replicas)]
            subprocess.run(
                [self._cli, "--cluster", "create", *addresses, *replicas, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._created = True
        self.wait_until_ok()

    def wait_until_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says the cluster is ok (all slots served), and every
        replica is in sync with its primary (else it could not take over)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while node.running:
                info = self._ask(node, "cluster", "info") + self._ask(node, "info", "replication")
                if b"cluster_state:ok" in info and (
                    b"role:master" in info or b"master_link_status:up" in info
                ):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self!r}: cluster not ok after {timeout} s: {info!r}")
                time.sleep(0.1)

    def _ask(self, node: PrivateServer, *command: str) -> bytes:
        return subprocess.run(
            [self._cli, "-p", str(node.port), *command],
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def pause(self) -> None:
        for node in self.nodes:
            node.pause()

    def resume(self) -> None:
        for node in self.nodes:
            node.resume()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


class PrivateMemcached(PrivateServer):
    """A memcached (it keeps nothing across restarts, by nature)."""

    name = "memcached"

    def __init__(self, workdir: Path) -> None:
        self._binary = _binary("memcached")
        super().__init__(workdir)
        self.url = f"memcached://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        command = [self._binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "32"]
        if os.geteuid() == 0:  # it refuses to run as root
            return _as_user("nobody", command)
        return command


class PrivateEtcd(PrivateServer):
    """A single-member etcd; tooz talks to its v3 API through the HTTP gateway."""

    name = "etcd"

    def __init__(self, workdir: Path) -> None:
        self._binary = _binary("etcd")
        super().__init__(workdir)
        self.peer_port = free_port()
        self.url = f"etcd3+http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.port}"
        return [
            self._binary,
            "--name",
            "aiotooz-test",
            "--data-dir",
            str(self._workdir / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"aiotooz-test={peer}",
            "--log-level",
            "warn",
        ]

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False


class PrivateZooKeeper(PrivateServer):
    """A standalone ZooKeeper, run with java from Debian's jars (no zkServer.sh, no /etc)."""

    name = "zookeeper"
    JARS = ("/usr/share/java/zookeeper.jar", "/usr/share/zookeeper/lib/zookeeper.jar")

    def __init__(self, workdir: Path) -> None:
        self._java = _binary("java")
        jar = next((jar for jar in self.JARS if os.path.exists(jar)), None)
        if jar is None:
            missing_backend("ZooKeeper is not installed (Debian package: zookeeper)")
        self._jar = str(jar)
        super().__init__(workdir)
        self.url = f"zookeeper://127.0.0.1:{self.port}"

    def _prepare(self) -> None:
        (self._workdir / "data").mkdir(parents=True, exist_ok=True)
        (self._workdir / "zoo.cfg").write_text(
            "tickTime=500\n"
            f"dataDir={self._workdir / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "maxClientCnxns=0\n"
        )

    def _command(self) -> list[str]:
        return [
            self._java,
            "-Xmx128m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # starts in about a second instead of several
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.4lw.commands.whitelist=srvr",
            "-cp",
            self._jar,  # its manifest lists the jars it needs
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self._workdir / "zoo.cfg"),
        ]

    def _ready(self) -> bool:
        # Not "ruok": it answers "imok" as soon as the port is open, before the server
        # serves sessions (a connect right after could then time out on a loaded
        # machine). "srvr" says "Mode: standalone" only once it serves.
        try:
            with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                sock.sendall(b"srvr")
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
                return b"Mode:" in reply
        except OSError:
            return False


def _unprivileged_user() -> str | None:
    """The account to run a server as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return user
    return None


def _children(pid: int) -> list[int]:
    """The processes under ``pid`` (descendants, read from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after it.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent]
        found.extend(children)
        frontier.extend(children)
    return found


class PrivatePostgreSQL(PrivateServer):
    """``initdb`` + ``postgres`` in a directory of its own, trust auth, TCP only."""

    name = "postgresql"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM waits for clients to leave

    def __init__(self, workdir: Path) -> None:
        self._initdb = _binary("initdb", *self._pg_bins("initdb"))
        self._postgres = _binary("postgres", *self._pg_bins("postgres"))
        self._user = _unprivileged_user()
        # The data directory must belong to the server's user; pytest's tmp dirs are
        # private to root, so it lives in a temporary directory of its own.
        workdir = Path(tempfile.mkdtemp(prefix="aiotooz-pg-"))
        super().__init__(workdir)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def _pg_bins(program: str) -> list[str]:
        return sorted(
            (str(path) for path in Path("/usr/lib/postgresql").glob(f"*/bin/{program}")),
            reverse=True,
        )

    def _as_user(self, command: list[str]) -> list[str]:
        return command if self._user is None else _as_user(self._user, command)

    def _prepare(self) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self._workdir, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._as_user(
                [
                    self._initdb,
                    "-D",
                    str(self._workdir / "data"),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def _command(self) -> list[str]:
        return self._as_user(
            [
                self._postgres,
                "-D",
                str(self._workdir / "data"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                "",  # no Unix socket
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]
        )

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def _group_stopped(self) -> bool:
        """Whether every thread of every process in the server's group is stopped."""
        assert self._proc is not None
        group = self._proc.pid
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                # Fields after the parenthesised command: state, ppid, pgrp, ...
                fields = (proc / "stat").read_text().rpartition(")")[2].split()
                if int(fields[2]) != group:
                    continue
                for task in (proc / "task").iterdir():
                    state = (task / "stat").read_text().rpartition(")")[2].split()[0]
                    if state not in ("T", "t", "Z", "X"):
                        return False
            except (OSError, IndexError, ValueError):
                continue  # the process or thread went away meanwhile
        return True

    def _signal(self, signum: signal.Signals) -> None:
        # Each backend calls setsid(): a session and process group of its own, out of
        # the postmaster's. A pause must reach them too, or sessions that stay open
        # keep being served while new connections hang.
        backends = _children(self._proc.pid) if self._proc is not None else []
        super()._signal(signum)
        for pid in backends:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


class PrivatePgBouncer(PrivateServer):
    """PgBouncer on a port of its own, in front of the shared PostgreSQL (127.0.0.1:5432).

    Args:
        workdir: where its configuration and log go.
        pool_mode: ``session``, ``transaction`` or ``statement``.
        upstream: the PostgreSQL server's port.
    """

    name = "pgbouncer"

    def __init__(self, workdir: Path, pool_mode: str = "session", upstream: int = 5432) -> None:
        self._binary = _binary("pgbouncer", "/usr/sbin/pgbouncer")
        self._user = _unprivileged_user()  # it refuses to run as root
        # Its files must be readable by that user; pytest's tmp dirs are private to root.
        workdir = Path(tempfile.mkdtemp(prefix="aiotooz-pgbouncer-"))
        super().__init__(workdir)
        self.pool_mode = pool_mode
        self.upstream = upstream
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def _prepare(self) -> None:
        (self._workdir / "users.txt").write_text('"postgres" ""\n')
        (self._workdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.upstream}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self._workdir / 'users.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            "default_pool_size = 10\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for path in (self._workdir, *self._workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _command(self) -> list[str]:
        command = [self._binary, str(self._workdir / "pgbouncer.ini")]
        return command if self._user is None else _as_user(self._user, command)

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True


class PrivateMariaDB(PrivateServer):
    """``mariadb-install-db`` + ``mariadbd`` in a directory of its own; no grant checks."""

    name = "mysql"

    def __init__(self, workdir: Path) -> None:
        self._install = _binary("mariadb-install-db", "mysql_install_db")
        self._server = _binary("mariadbd", "/usr/sbin/mariadbd", "mysqld", "/usr/sbin/mysqld")
        super().__init__(workdir)
        self.url = f"mysql://root@127.0.0.1:{self.port}/mysql"
        # A Unix socket path holds at most 107 bytes, and pytest's tmp_path under nox's
        # TMPDIR (.nox/<session>/tmp/pytest-of-root/...) is longer: mariadbd then exits
        # at start. The socket gets a short directory of its own in /tmp.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="aiotooz-my-", dir="/tmp"))

    def _user(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []  # root must be asked for

    def _prepare(self) -> None:
        data = self._workdir / "data"
        command = [
            self._install,
            "--no-defaults",
            f"--datadir={data}",
            *self._user(),
            "--skip-test-db",
            "--auth-root-authentication-method=normal",
        ]
        # Seen once in a run of three test processes at once: mariadb-install-db exited
        # with 1. It is a throwaway directory, so start it over once, and if it fails
        # again say what the tool printed (CalledProcessError alone does not).
        for _attempt in (1, 2):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                return
            shutil.rmtree(data, ignore_errors=True)
        raise RuntimeError(
            f"{self._install} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )

    def _command(self) -> list[str]:
        data = self._workdir / "data"
        return [
            self._server,
            "--no-defaults",
            f"--datadir={data}",
            *self._user(),
            "--bind-address=127.0.0.1",
            f"--port={self.port}",
            f"--socket={self._socket_dir / 'mysqld.sock'}",
            f"--pid-file={self._workdir / 'mysqld.pid'}",
            "--skip-grant-tables",  # a throwaway server: anyone on loopback is root
            "--skip-name-resolve",
            "--skip-log-bin",
            "--performance-schema=off",
            "--innodb-buffer-pool-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
            "--max-connections=300",
        ]

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _ready(self) -> bool:
        import pymysql

        try:
            pymysql.connect(
                host="127.0.0.1", port=self.port, user="root", connect_timeout=1
            ).close()
        except pymysql.MySQLError:
            return False
        return True


#: The private server class behind each backend that needs a server.
SERVERS: dict[str, type[PrivateServer] | type[PrivateRedisCluster]] = {
    server.name: server
    for server in (
        PrivateRedisCluster,
        PrivateRedis,
        PrivateMemcached,
        PrivateEtcd,
        PrivateZooKeeper,
        PrivatePostgreSQL,
        PrivateMariaDB,
    )
}
