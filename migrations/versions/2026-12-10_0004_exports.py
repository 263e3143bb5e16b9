"""Exports (GGUF, merged, PEFT; run by a worker), and 64-bit file sizes on PostgreSQL (an exported GGUF is gigabytes;
SQLite's INTEGER is 64-bit already).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("files", "bytes", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)
    op.create_table("exports",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("owner_id", sa.String(length=64), nullable=False),
    sa.Column("model", sa.String(length=512), nullable=False),
    sa.Column("format", sa.String(length=16), nullable=False),
    sa.Column("quantization", sa.String(length=16), nullable=True),
    sa.Column("ollama", sa.Boolean(), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("restarts", sa.Integer(), nullable=False),
    sa.Column("lease_owner", sa.String(length=255), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("send_count", sa.Integer(), nullable=False),
    sa.Column("resend_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("result_files", JSON, nullable=True),
    sa.Column("verification", JSON, nullable=True),
    sa.Column("error", JSON, nullable=True),
    sa.Column("idempotency_key", sa.String(length=255), nullable=True),
    sa.Column("request_hash", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                       name=op.f("ck_exports_status")),
    sa.CheckConstraint("format IN ('gguf', 'merged', 'peft')", name=op.f("ck_exports_format")),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_exports_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
    sa.UniqueConstraint("owner_id", "idempotency_key", name=op.f("uq_exports_owner_id_idempotency_key"))
    )
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_exports_owner_id_id"), ["owner_id", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_exports_owner_id_request_hash"), ["owner_id", "request_hash"],
                              unique=False)
        batch_op.create_index(batch_op.f("ix_exports_status_resend_at"), ["status", "resend_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_exports_status_lease_expires_at"), ["status", "lease_expires_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_exports_status_lease_expires_at"))
        batch_op.drop_index(batch_op.f("ix_exports_status_resend_at"))
        batch_op.drop_index(batch_op.f("ix_exports_owner_id_request_hash"))
        batch_op.drop_index(batch_op.f("ix_exports_owner_id_id"))
    op.drop_table("exports")
    if op.get_bind().dialect.name == "postgresql":  # sizes past 2 GiB would not fit: the downgrade refuses them
        op.alter_column("files", "bytes", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
