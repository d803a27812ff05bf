"""A merge job may start from an earlier job's checkpoint instead of theta_0 (chaining).

No foreign key, as for the checkpoints an evaluation names: a finished job keeps naming a checkpoint its
owner deleted later; a queued or running one keeps it from being deleted (app.routes.checkpoints).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 14:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('start_checkpoint_id', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('start_checkpoint_id')
