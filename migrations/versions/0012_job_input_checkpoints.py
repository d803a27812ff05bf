"""The checkpoints a job reads are job inputs too: a merge's start checkpoint, an evaluation's evaluated and
reference checkpoints. job_inputs' foreign key RESTRICTs their deletion (and their job's, which cascades to
them) while the job is queued or running, as for task vectors and datasets, instead of a check made before the
delete that a job created in between could slip past.

Jobs queued or running when this runs get their rows here; finished jobs need none.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 18:00:00
"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _checkpoints_named(kind: str, start_checkpoint_id: str | None, params) -> set[str]:
    params = json.loads(params) if isinstance(params, str) else params or {}
    named = {start_checkpoint_id}
    if kind == 'evaluation':
        named.add(params.get('checkpoint_id'))
        named.update(item.get('reference_checkpoint_id') for item in params.get('datasets', []))
    return named - {None}


def upgrade() -> None:
    with op.batch_alter_table('job_inputs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checkpoint_id', sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f('ix_job_inputs_checkpoint_id'), ['checkpoint_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_job_inputs_checkpoint_id_checkpoints'), 'checkpoints',
                                    ['checkpoint_id'], ['id'], ondelete='RESTRICT')
    connection = op.get_bind()
    existing = set(connection.scalars(sa.text('SELECT id FROM checkpoints')))
    active = connection.execute(sa.text(
        "SELECT id, kind, start_checkpoint_id, params FROM jobs WHERE status IN ('queued', 'running')"))
    rows = [{'job_id': job_id, 'checkpoint_id': checkpoint_id}
            for job_id, kind, start, params in active
            for checkpoint_id in sorted(_checkpoints_named(kind, start, params) & existing)]
    if rows:
        connection.execute(sa.text('INSERT INTO job_inputs (job_id, checkpoint_id) VALUES (:job_id, :checkpoint_id)'),
                           rows)


def downgrade() -> None:
    op.execute('DELETE FROM job_inputs WHERE checkpoint_id IS NOT NULL')
    with op.batch_alter_table('job_inputs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_job_inputs_checkpoint_id_checkpoints'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_job_inputs_checkpoint_id'))
        batch_op.drop_column('checkpoint_id')
