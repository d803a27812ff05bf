"""Alembic migrations of the tvforge database; shipped inside the package so `tvforge migrate` works when installed."""
