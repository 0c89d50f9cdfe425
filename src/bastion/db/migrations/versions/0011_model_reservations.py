"""model_upload_reservations: the share of an organisation's model quota an upload under way
holds, claimed atomically before its body is read

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_upload_reservations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_model_reservations_org", "model_upload_reservations", ["org_id"])


def downgrade() -> None:
    op.drop_index("ix_model_reservations_org", table_name="model_upload_reservations")
    op.drop_table("model_upload_reservations")
