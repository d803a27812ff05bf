"""Alembic environment: migrates the database of tvforge.settings, or the URL set on the Alembic config."""
from alembic import context
from sqlalchemy import TypeDecorator, create_engine, pool, text

from store.db import connect_args_for
from store.models import Base
from tvforge.settings import get_settings

# No logging.config.fileConfig here: migrations run inside the CLI and the tests,
# whose logging configuration must not be replaced.
config = context.config
target_metadata = Base.metadata
MIGRATION_LOCK = 0x7476666F72676530  # "tvforge0": the advisory lock key migrators queue on (PostgreSQL)


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def render_item(type_, obj, autogen_context):
    """Render custom column types as their SQL type, so revisions never import app code."""
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"
    return False


def configure(url: str, **kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        render_item=render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = database_url()
    configure(url, url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args_for(url))
    try:
        with engine.connect() as connection:
            configure(url, connection=connection)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Migrators take turns (a second host's `tvforge migrate`, a `docker compose run migrate`):
                    # the next reads the version the last committed instead of failing on its tables.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
