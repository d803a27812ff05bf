"""Task vectors may be LoRA factors: the largest rank is recorded (null for a dense vector).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 13:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('task_vectors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lora_rank', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('task_vectors', schema=None) as batch_op:
        batch_op.drop_column('lora_rank')
