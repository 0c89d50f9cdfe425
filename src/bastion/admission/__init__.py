"""Admission: concurrency slots, tokens per request and per hour, requests per minute."""
