"""Jobs have a kind: merges (a method writes a checkpoint) and evaluations (weights measured on datasets).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 21:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=20), server_default='merge', nullable=False))
        batch_op.alter_column('method', existing_type=sa.String(length=40), nullable=True)


def downgrade() -> None:
    # They have no method, which 0002 requires. Their inputs first: migrations run on SQLite without its foreign
    # keys (a batch operation's table copy would cascade), so the jobs' delete would not cascade to them.
    op.execute("DELETE FROM job_inputs WHERE job_id IN (SELECT id FROM jobs WHERE kind = 'evaluation')")
    op.execute("DELETE FROM jobs WHERE kind = 'evaluation'")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('method', existing_type=sa.String(length=40), nullable=False)
        batch_op.drop_column('kind')
