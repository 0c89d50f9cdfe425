"""Fine-tuning billed and capped: usage_records.trained_tokens (a job's ledger row) and
fine_tuning_jobs.key_id (the key the job's trained tokens are billed to)

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("trained_tokens", sa.Integer(), nullable=False,
                                   server_default="0"))
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("key_id")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("trained_tokens")
