"""Job rollouts: the prompts a reinforcement (GRPO) job sampled at its logged steps, with their completions, rewards
and advantages, one row per prompt.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-11 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table("job_rollouts",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("job_id", sa.String(length=64), nullable=False),
    sa.Column("step", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("data", JSON, nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_rollouts_job_id_jobs"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_job_rollouts"))
    )
    with op.batch_alter_table("job_rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_rollouts_job_id_id"), ["job_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_rollouts_job_id_id"))
    op.drop_table("job_rollouts")
