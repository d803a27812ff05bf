"""Task vectors carry their global top-k magnitude cuts, measured at upload.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 09:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('task_vectors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('magnitude_cuts', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('task_vectors', schema=None) as batch_op:
        batch_op.drop_column('magnitude_cuts')
