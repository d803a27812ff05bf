"""tvforge_job_duration_seconds is kept as totals, one row per bucket, that each succeeded job adds to: read from
the succeeded jobs' rows, the histogram went down when a job was deleted (a counter reset to Prometheus). The
jobs that succeeded before this are counted here once.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 18:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# store.models.JOB_SECONDS_BUCKETS when this was written, as Prometheus writes them
BUCKETS = [(1.0, '1.0'), (5.0, '5.0'), (15.0, '15.0'), (60.0, '60.0'), (300.0, '300.0'), (900.0, '900.0'),
           (3600.0, '3600.0'), (14400.0, '14400.0'), (float('inf'), '+Inf')]


def upgrade() -> None:
    buckets = op.create_table(
        'job_duration_buckets',
        sa.Column('le', sa.String(length=20), nullable=False),
        sa.Column('jobs', sa.BigInteger(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('le', name=op.f('pk_job_duration_buckets')),
    )
    jobs = sa.table('jobs', sa.column('status', sa.String), sa.column('started_at', sa.DateTime),
                    sa.column('finished_at', sa.DateTime))
    totals = {label: [0, 0.0] for _, label in BUCKETS}
    for started, finished in op.get_bind().execute(sa.select(jobs.c.started_at, jobs.c.finished_at).where(
            jobs.c.status == 'succeeded', jobs.c.started_at.is_not(None), jobs.c.finished_at.is_not(None))):
        seconds = (finished - started).total_seconds()
        label = next(label for upper, label in BUCKETS if seconds <= upper)
        totals[label][0] += 1
        totals[label][1] += seconds
    op.bulk_insert(buckets, [{'le': label, 'jobs': count, 'seconds': seconds}
                             for label, (count, seconds) in totals.items()])


def downgrade() -> None:
    op.drop_table('job_duration_buckets')
