"""Uploaded files: the blob store, streamed multipart uploads and JSONL validation."""
