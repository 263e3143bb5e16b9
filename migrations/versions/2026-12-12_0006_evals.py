"""Evals (OpenAI's Evals API): evals with their testing criteria, their runs (run by a worker, fenced by attempt like
jobs and exports) and each run's graded output items.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-12 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table("evals",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("owner_id", sa.String(length=64), nullable=False),
    sa.Column("name", sa.String(length=256), nullable=False),
    sa.Column("metadata", JSON, nullable=True),
    sa.Column("data_source_config", JSON, nullable=False),
    sa.Column("testing_criteria", JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_evals_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_evals"))
    )
    with op.batch_alter_table("evals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evals_owner_id_id"), ["owner_id", "id"], unique=False)

    op.create_table("eval_runs",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("eval_id", sa.String(length=64), nullable=False),
    sa.Column("owner_id", sa.String(length=64), nullable=False),
    sa.Column("name", sa.String(length=256), nullable=False),
    sa.Column("metadata", JSON, nullable=True),
    sa.Column("model", sa.String(length=512), nullable=False),
    sa.Column("data_source", JSON, nullable=False),
    sa.Column("testing_criteria", JSON, nullable=False),
    sa.Column("seed", sa.BigInteger(), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("restarts", sa.Integer(), nullable=False),
    sa.Column("lease_owner", sa.String(length=255), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("send_count", sa.Integer(), nullable=False),
    sa.Column("resend_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("result_counts", JSON, nullable=False),
    sa.Column("per_testing_criteria_results", JSON, nullable=False),
    sa.Column("per_model_usage", JSON, nullable=False),
    sa.Column("error", JSON, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'in_progress', 'completed', 'failed', 'canceled')",
                       name=op.f("ck_eval_runs_status")),
    sa.ForeignKeyConstraint(["eval_id"], ["evals.id"], name=op.f("fk_eval_runs_eval_id_evals"), ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_eval_runs_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_runs"))
    )
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_eval_runs_eval_id_id"), ["eval_id", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_runs_owner_id_status"), ["owner_id", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_runs_status_resend_at"), ["status", "resend_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_runs_status_lease_expires_at"), ["status", "lease_expires_at"],
                              unique=False)

    op.create_table("eval_output_items",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("run_id", sa.String(length=64), nullable=False),
    sa.Column("eval_id", sa.String(length=64), nullable=False),
    sa.Column("datasource_item_id", sa.Integer(), nullable=False),
    sa.Column("status", sa.String(length=8), nullable=False),
    sa.Column("datasource_item", JSON, nullable=False),
    sa.Column("sample", JSON, nullable=False),
    sa.Column("results", JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('pass', 'fail')", name=op.f("ck_eval_output_items_status")),
    sa.ForeignKeyConstraint(["run_id"], ["eval_runs.id"], name=op.f("fk_eval_output_items_run_id_eval_runs"),
                            ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_output_items")),
    sa.UniqueConstraint("run_id", "datasource_item_id", name=op.f("uq_eval_output_items_run_id_datasource_item_id"))
    )
    with op.batch_alter_table("eval_output_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_eval_output_items_run_id_id"), ["run_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("eval_output_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_eval_output_items_run_id_id"))
    op.drop_table("eval_output_items")
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_eval_runs_status_lease_expires_at"))
        batch_op.drop_index(batch_op.f("ix_eval_runs_status_resend_at"))
        batch_op.drop_index(batch_op.f("ix_eval_runs_owner_id_status"))
        batch_op.drop_index(batch_op.f("ix_eval_runs_eval_id_id"))
    op.drop_table("eval_runs")
    with op.batch_alter_table("evals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evals_owner_id_id"))
    op.drop_table("evals")
