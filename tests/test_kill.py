"""A server killed with SIGKILL (issue 15's kill tests): the usage ledger writes each row in a
batch a fifth of a second after it arrives, so a hard kill loses at most the last second of rows,
and a restarted server bills nothing twice. (The fine-tuning worker's kill test is in
test_fine_tuning_worker.py: a job resumes from its checkpoint on another worker.)"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import openai

from conftest import ADMIN_KEY, MODEL, database_rows, start_server, stop_server

# A row is in the database COLLECT_S (0.2 s) after its request settles, plus the write itself
# (two, when it settles during one; bastion/usage/ledger.py): what settled longer ago than a
# second must have survived the kill.
LOST_AT_MOST_S = 1.0
# Quiet long enough for the ledger to write everything and sleep: the request after it (the
# probe) starts a batch of its own, and the kill comes just over a second after its answer, so
# a ledger that held rows longer than that loses the probe's row on every run, not only when
# the kill happens to land late in a batch.
QUIET_S = 2.0


def test_sigkill_mid_stream_loses_at_most_a_second_of_usage_and_bills_nothing_twice(
        tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    client = openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    finished: list[tuple[str, float]] = []  # (completion id, when its answer arrived)
    killed_at = 0.0

    def ask() -> None:
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
        finished.append((r.id, time.monotonic()))

    def kill() -> None:
        nonlocal killed_at
        killed_at = time.monotonic()
        srv.proc.send_signal(signal.SIGKILL)

    try:
        ask()  # the first request also warms the model up (seconds)
        until = time.monotonic() + 5
        while time.monotonic() < until or len(finished) < 6:  # steady traffic
            ask()
        time.sleep(QUIET_S)
        ask()
        probe_id, probe_at = finished[-1]
        stream = client.completions.create(model=MODEL, prompt="Once upon a time",
                                           max_tokens=1000, stream=True)
        next(iter(stream))  # generating now
        timer = threading.Timer(probe_at + LOST_AT_MOST_S + 0.05 - time.monotonic(), kill)
        timer.start()
        with contextlib.suppress(openai.APIConnectionError):
            while True:  # traffic beside the stream, so the kill lands amid batches
                ask()
        timer.join()
        srv.proc.wait(10)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()

    again = start_server(tmp_path, data_dir=srv.data_dir)
    try:
        # the restarted server serves and bills as before
        r = client.with_options(base_url=again.api).completions.create(
            model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
        deadline = time.monotonic() + 30
        while True:
            rows = database_rows(again, "usage_records")
            if r.id in {row["request_id"] for row in rows} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        stop_server(again)
    ids = [row["request_id"] for row in rows]
    assert r.id in ids
    assert len(ids) == len(set(ids)), "a request billed twice"
    billed = set(ids)
    lost = [(rid, at) for rid, at in finished if rid not in billed]
    assert probe_id in billed, f"the row of a request {killed_at - probe_at:.2f} s old was lost"
    assert all(killed_at - at < LOST_AT_MOST_S for _, at in lost), \
        f"rows lost from more than {LOST_AT_MOST_S:.1f} s before the kill: " \
        f"{[(rid, round(killed_at - at, 2)) for rid, at in lost]}"
