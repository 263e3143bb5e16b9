"""Initial schema: api keys, files, jobs, job events, checkpoints, models.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 05:03:21.993361
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table("api_keys",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("name", sa.String(length=128), nullable=False),
    sa.Column("prefix", sa.String(length=32), nullable=False),
    sa.Column("key_hash", sa.String(length=64), nullable=False),
    sa.Column("is_admin", sa.Boolean(), nullable=False),
    sa.Column("source", sa.String(length=16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash"))
    )
    op.create_table("files",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("owner_id", sa.String(length=64), nullable=False),
    sa.Column("filename", sa.String(length=255), nullable=False),
    sa.Column("purpose", sa.String(length=32), nullable=False),
    sa.Column("bytes", sa.Integer(), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("status_details", sa.Text(), nullable=True),
    sa.Column("validation", JSON, nullable=True),
    sa.Column("path", sa.String(length=255), nullable=False),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('uploaded', 'processed', 'error')", name=op.f("ck_files_status")),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_files_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_files"))
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_owner_id_id"), ["owner_id", "id"], unique=False)

    op.create_table("jobs",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("owner_id", sa.String(length=64), nullable=False),
    sa.Column("model", sa.String(length=512), nullable=False),
    sa.Column("training_file", sa.String(length=64), nullable=False),
    sa.Column("validation_file", sa.String(length=64), nullable=True),
    sa.Column("suffix", sa.String(length=64), nullable=True),
    sa.Column("seed", sa.Integer(), nullable=False),
    sa.Column("metadata", JSON, nullable=True),
    sa.Column("method", JSON, nullable=False),
    sa.Column("integrations", JSON, nullable=True),
    sa.Column("status", sa.String(length=32), nullable=False),
    sa.Column("stop_requested", sa.String(length=16), nullable=True),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("restarts", sa.Integer(), nullable=False),
    sa.Column("lease_owner", sa.String(length=255), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("send_count", sa.Integer(), nullable=False),
    sa.Column("progress", JSON, nullable=True),
    sa.Column("last_checkpoint_id", sa.String(length=64), nullable=True),
    sa.Column("error", JSON, nullable=True),
    sa.Column("fine_tuned_model", sa.String(length=512), nullable=True),
    sa.Column("trained_tokens", sa.Integer(), nullable=True),
    sa.Column("result_files", JSON, nullable=True),
    sa.Column("estimated_finish", sa.DateTime(timezone=True), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("idempotency_key", sa.String(length=255), nullable=True),
    sa.Column("request_hash", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('validating_files', 'queued', 'running', 'paused', 'succeeded', 'failed', "
                       "'cancelled')", name=op.f("ck_jobs_status")),
    sa.CheckConstraint("stop_requested IS NULL OR stop_requested IN ('cancel', 'pause', 'preempt')",
                       name=op.f("ck_jobs_stop_requested")),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_jobs_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    sa.UniqueConstraint("owner_id", "idempotency_key", name=op.f("uq_jobs_owner_id_idempotency_key"))
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_owner_id_id"), ["owner_id", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_owner_id_request_hash"), ["owner_id", "request_hash"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_status_enqueued_at"), ["status", "enqueued_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_status_lease_expires_at"), ["status", "lease_expires_at"],
                              unique=False)

    op.create_table("checkpoints",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("job_id", sa.String(length=64), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("step_number", sa.Integer(), nullable=False),
    sa.Column("metrics", JSON, nullable=False),
    sa.Column("path", sa.String(length=512), nullable=False),
    sa.Column("model_id", sa.String(length=512), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_checkpoints_job_id_jobs"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
    sa.UniqueConstraint("job_id", "step_number", name=op.f("uq_checkpoints_job_id_step_number")),
    sa.UniqueConstraint("model_id", name=op.f("uq_checkpoints_model_id"))
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoints_job_id_id"), ["job_id", "id"], unique=False)

    op.create_table("job_events",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("job_id", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("level", sa.String(length=8), nullable=False),
    sa.Column("type", sa.String(length=16), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("data", JSON, nullable=True),
    sa.CheckConstraint("level IN ('info', 'warn', 'error')", name=op.f("ck_job_events_level")),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events"))
    )
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_events_job_id_id"), ["job_id", "id"], unique=False)

    op.create_table("models",
    sa.Column("id", sa.String(length=512), nullable=False),
    sa.Column("kind", sa.String(length=16), nullable=False),
    sa.Column("owner_id", sa.String(length=64), nullable=True),
    sa.Column("parent", sa.String(length=512), nullable=True),
    sa.Column("root", sa.String(length=512), nullable=False),
    sa.Column("job_id", sa.String(length=64), nullable=True),
    sa.Column("checkpoint_id", sa.String(length=64), nullable=True),
    sa.Column("path", sa.String(length=512), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('base', 'fine_tune', 'checkpoint')", name=op.f("ck_models_kind")),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_models_job_id_jobs")),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_models_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_models"))
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_owner_id"), ["owner_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_owner_id"))

    op.drop_table("models")
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_events_job_id_id"))

    op.drop_table("job_events")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_job_id_id"))

    op.drop_table("checkpoints")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_status_lease_expires_at"))
        batch_op.drop_index(batch_op.f("ix_jobs_status_enqueued_at"))
        batch_op.drop_index(batch_op.f("ix_jobs_owner_id_request_hash"))
        batch_op.drop_index(batch_op.f("ix_jobs_owner_id_id"))

    op.drop_table("jobs")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_owner_id_id"))

    op.drop_table("files")
    op.drop_table("api_keys")
