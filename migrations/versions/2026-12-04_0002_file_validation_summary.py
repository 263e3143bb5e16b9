"""Files: a validation summary beside the report, for lists (the report without its errors).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 18:05:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
files = sa.table("files", sa.column("id", sa.String), sa.column("validation", JSON),
                 sa.column("validation_summary", JSON))


def summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if report is None else {k: v for k, v in report.items() if k != "errors"}


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("validation_summary", JSON, nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(files.c.id, files.c.validation).where(files.c.validation.is_not(None))):
        conn.execute(files.update().where(files.c.id == row.id).values(validation_summary=summary(row.validation)))


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_column("validation_summary")
