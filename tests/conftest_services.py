"""Pytest plugin: real Redis and PostgreSQL servers, one of each per test session.

A missing binary fails the test rather than skipping it: the test command installs them.
"""
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.services import ServiceNotInstalled, start_postgres, start_redis


def _started(start):
    try:
        return start()
    except ServiceNotInstalled as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url, stop = _started(start_redis)
    yield url
    stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the `tvforge` database of a session-wide PostgreSQL server; tests sharing it share its tables."""
    url, stop = _started(start_postgres)
    yield url
    stop()


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """URL of an empty database of its own on the session's PostgreSQL server, dropped after the test."""
    server = make_url(postgres_url)
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin_dsn = server.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield server.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        # FORCE: a test may leave pooled connections open.
        connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
