"""Task vectors record the sha256 of the file uploaded (for a fine-tuned checkpoint, not of the task vector stored),
so that a client finds what it uploaded before (`GET /v1/task-vectors?source_sha256=`).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 12:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('task_vectors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_sha256', sa.String(length=64), nullable=True))
    # A task vector uploaded as such is its own source; a fine-tuned checkpoint's bytes were not kept (null).
    op.execute("UPDATE task_vectors SET source_sha256 = sha256 WHERE source_kind = 'task_vector'")


def downgrade() -> None:
    with op.batch_alter_table('task_vectors', schema=None) as batch_op:
        batch_op.drop_column('source_sha256')
