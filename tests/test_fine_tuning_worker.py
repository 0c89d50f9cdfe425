"""Workers as separate processes (`bastion worker`) over one database: a job whose worker is
killed mid-training is reclaimed by another and resumes from its checkpoint; a cancel stops the
training within one step; a worker stopped with SIGTERM hands its job back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from conftest import MODEL, RunningServer, make_tenant, start_server, stop_server
from ftdata import duck_examples, write_jsonl
from polling import wait_until

pytestmark = pytest.mark.slow
LEASE = 6


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("ftworker"), "--parallel", "2", "--no-worker")
    yield s
    stop_server(s)


def worker(srv: RunningServer, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BASTION_DATA_DIR": str(srv.data_dir),
           "BASTION_DATABASE_URL": srv.database_url, "BASTION_WORKER_POLL_SECONDS": "0.5",
           "BASTION_WORKER_LEASE_SECONDS": str(LEASE)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "bastion.cli", "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def events(sdk: openai.OpenAI, job_id: str) -> list:
    return sdk.fine_tuning.jobs.list_events(job_id, limit=500).data[::-1]


def wait_event(sdk: openai.OpenAI, job_id: str, check, timeout: float = 300) -> list:
    return wait_until(lambda: events(sdk, job_id), check, timeout=timeout, interval=0.5,
                      message=lambda _: [e.message for e in events(sdk, job_id)])


def last_step(evs: list) -> int:
    return max([e.data["step"] for e in evs if e.type == "metrics"] or [0])


@pytest.mark.timeout(900)
def test_dead_worker_is_replaced_and_cancel_stops_within_a_step(srv: RunningServer,
                                                                 tmp_path: Path) -> None:
    _, key = make_tenant(srv.api, permissions=("training",))
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    f = sdk.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(8)), "rb"),
                         purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                      hyperparameters={"n_epochs": 6, "batch_size": 2})
    first = worker(srv, tmp_path / "worker-a.log")
    try:  # let it pass its first checkpoint (step 4, the end of epoch 1), then kill it hard
        wait_event(sdk, job.id, lambda evs: last_step(evs) >= 5)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = last_step(events(sdk, job.id))
        assert sdk.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody knows yet
    finally:
        if first.poll() is None:
            first.kill()
    second = worker(srv, tmp_path / "worker-b.log")
    try:
        resume = "Resuming from the checkpoint at step 4"

        def stepped_after_resume(evs: list) -> bool:
            messages = [e.message for e in evs]
            return resume in messages and any(
                e.type == "metrics" for e in evs[messages.index(resume):])

        evs = wait_event(sdk, job.id, stepped_after_resume)
        messages = [e.message for e in evs]
        assert any("stopped responding" in m for m in messages), messages
        assert any("attempt 2" in m for m in messages), messages
        steps = [e.data["step"] for e in evs if e.type == "metrics"]
        resumed = messages.index(resume)
        later = [e.data["step"] for e in evs[resumed:] if e.type == "metrics"]
        assert later[0] == 5 and killed_at >= 5 and steps.count(5) == 2  # step 5 ran twice
        assert sdk.fine_tuning.jobs.retrieve(job.id).status == "running"

        wait_event(sdk, job.id, lambda evs: last_step(evs) >= later[0] + 1)
        at_cancel = last_step(events(sdk, job.id))
        assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        time.sleep(LEASE)  # long enough for several more steps if it did not stop
        after = events(sdk, job.id)
        assert last_step(after) <= at_cancel + 1, [e.message for e in after]
        final = sdk.fine_tuning.jobs.retrieve(job.id)
        assert final.status == "cancelled" and final.fine_tuned_model is None
        assert second.poll() is None  # the worker lives on, idle
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    log = (tmp_path / "worker-b.log").read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(600)
def test_sigterm_hands_the_job_back(srv: RunningServer, tmp_path: Path) -> None:
    _, key = make_tenant(srv.api, permissions=("training",))
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    f = sdk.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(4)), "rb"),
                         purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                      hyperparameters={"n_epochs": 10, "batch_size": 4})
    proc = worker(srv, tmp_path / "worker.log")
    try:
        wait_event(sdk, job.id, lambda evs: last_step(evs) >= 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert "The worker is shutting down" in events(sdk, job.id)[-1].message
    sdk.fine_tuning.jobs.cancel(job.id)
