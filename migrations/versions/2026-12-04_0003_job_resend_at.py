"""Jobs: `resend_at`, when the re-send loop may send a queued job's message again (the loop asks for due jobs).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 18:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resend_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_status_resend_at"), ["status", "resend_at"], unique=False)
    # Jobs queued before this revision are due at once: one more message each, which a claim makes harmless.


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_status_resend_at"))
        batch_op.drop_column("resend_at")
