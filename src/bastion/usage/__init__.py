"""The usage ledger: one row per request, written in batches, aggregated for billing."""
