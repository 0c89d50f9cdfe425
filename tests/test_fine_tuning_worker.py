"""Workers as separate processes (`bastion worker`) over one database: a job whose worker is
killed mid-training is reclaimed by another and resumes from its checkpoint; a cancel stops the
training within one step; a worker stopped with SIGTERM hands its job back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import MODEL, RunningServer, database_rows, make_tenant, start_server, stop_server
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
        # billed once, for what it trained: an epoch is the file's tokens, and the steps the
        # dead worker ran past its checkpoint are not billed again
        (row,) = ledger_rows(srv, job.id)
        assert row["trained_tokens"] == final.trained_tokens and row["status"] == "cancelled"
        per_epoch, ran = file_tokens(sdk, job.id), last_step(after)
        assert per_epoch < final.trained_tokens <= per_epoch * -(-ran // 4)  # 4 steps an epoch
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
    assert not ledger_rows(srv, job.id)  # handed back, not ended: nothing billed yet
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    # the steps it ran (one epoch each) are billed when the job ends, once
    steps = last_step(events(sdk, job.id))
    assert cancelled.trained_tokens == file_tokens(sdk, job.id) * steps > 0
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # again: no second row
    (row,) = ledger_rows(srv, job.id)
    assert row["trained_tokens"] == cancelled.trained_tokens and row["model"] == MODEL


def ledger_rows(srv: RunningServer, job_id: str) -> list[dict]:
    return [r for r in database_rows(srv, "usage_records") if r["request_id"] == job_id]


def file_tokens(sdk: openai.OpenAI, job_id: str) -> int:
    """The training file's tokens, counted with the base model's tokenizer at creation."""
    created = [e for e in events(sdk, job_id) if e.message.startswith("Files validated")]
    return created[0].data["training"]["tokens"]


def dashboard_trained_tokens(srv: RunningServer, key: str) -> int:
    """The Usage page's 'Trained tokens' total, signed in with `key`."""
    with httpx.Client(base_url=srv.base_url, timeout=60) as web:
        form = web.get("/dashboard/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
        assert web.post("/dashboard/login", data={"api_key": key,
                                                  "csrf_token": csrf}).status_code == 303
        page = web.get("/dashboard/usage").text
    shown = re.search(r'data-total="trained_tokens">([\d,]+)<', page)
    assert shown, page[:2000]
    return int(shown.group(1).replace(",", ""))


@pytest.mark.timeout(900)
def test_jobs_are_taken_round_robin_billed_once_and_fail_without_leaking(
        srv: RunningServer, tmp_path: Path) -> None:
    """Organisation A queues two jobs before B and C queue one each: the worker runs A, B, C,
    then A's second (first come first served would run both of A's first). Each job that
    trains is one ledger row of tokens x epochs on its base model; C's job, whose stored
    training file has vanished, fails with a message that names no server path."""
    tenants = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        org, key = make_tenant(srv.api, permissions=("training",), name=f"fair-{name}")
        sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
        path = write_jsonl(tmp_path / f"{name}.jsonl", duck_examples(2, seed))
        with open(path, "rb") as f:
            file_id = sdk.files.create(file=f, purpose="fine-tune").id
        tenants[name] = {"org": org, "key": key, "sdk": sdk, "file": file_id}

    def create(name: str) -> str:
        t = tenants[name]
        return t["sdk"].fine_tuning.jobs.create(
            model=MODEL, training_file=t["file"],
            hyperparameters={"n_epochs": 2, "batch_size": 2}).id

    a1, a2, b1, c1 = create("a"), create("a"), create("b"), create("c")
    owner = {a1: "a", a2: "a", b1: "b", c1: "c"}
    stored = {r["id"]: r["storage_key"] for r in database_rows(srv, "files")}
    blob = srv.data_dir / "files" / stored[tenants["c"]["file"]]
    blob.unlink()  # the stored training file vanished from the disk

    def retrieve(job_id: str):
        return tenants[owner[job_id]]["sdk"].fine_tuning.jobs.retrieve(job_id)

    log = tmp_path / "worker.log"
    proc = worker(srv, log)
    try:
        done = wait_until(lambda: {j: retrieve(j) for j in owner},
                          lambda jobs: all(j.status in ("succeeded", "failed", "cancelled")
                                           for j in jobs.values()),
                          timeout=800, interval=1,
                          message=lambda jobs: {j: v.status for j, v in jobs.items()})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert {j: v.status for j, v in done.items()} == {
        a1: "succeeded", a2: "succeeded", b1: "succeeded", c1: "failed"}
    started = {r["id"]: r["started_at"] for r in database_rows(srv, "fine_tuning_jobs")
               if r["id"] in owner}
    assert sorted(owner, key=lambda j: started[j]) == [a1, b1, c1, a2]

    # the failure: a code and a message for the tenant, the details in the worker's log only
    error = done[c1].error
    assert error.code == "training_failed"
    assert error.message == (f"Training failed because of an internal error. The server's "
                             f"administrator can find the details in the fine-tuning worker's "
                             f"log under {c1}.")
    c_sdk = tenants["c"]["sdk"]
    seen = " ".join(e.message for e in events(c_sdk, c1))
    for secret in (str(srv.data_dir), str(blob), "Errno", "FileNotFoundError"):
        assert secret not in seen and secret not in error.message
    logged = log.read_text()
    assert f"job {c1} failed: FileNotFoundError" in logged and str(blob) in logged
    assert not ledger_rows(srv, c1)  # a failed job is not billed

    # billing: one row per job that trained, tokens x epochs, on the base, for the job's key
    for job_id in (a1, a2, b1):
        t = tenants[owner[job_id]]
        trained = done[job_id].trained_tokens
        assert trained == file_tokens(t["sdk"], job_id) * 2 > 0
        (row,) = ledger_rows(srv, job_id)
        assert (row["org_id"], row["key_id"], row["model"], row["endpoint"]) == (
            t["org"], t["key"]["id"], MODEL, "/v1/fine_tuning/jobs")
        assert (row["trained_tokens"], row["prompt_tokens"], row["completion_tokens"],
                row["status"]) == (trained, 0, 0, "succeeded")
    for name, jobs in (("a", (a1, a2)), ("b", (b1,))):
        key = tenants[name]["key"]["key"]
        usage = httpx.get(f"{srv.api}/usage", headers={"Authorization": f"Bearer {key}"}).json()
        trained = sum(done[j].trained_tokens for j in jobs)
        (row,) = usage["data"]
        assert (row["model"], row["key_id"], row["requests"], row["fine_tuning_jobs"],
                row["trained_tokens"], row["prompt_tokens"], row["total_tokens"]) == (
            MODEL, tenants[name]["key"]["id"], 0, len(jobs), trained, 0, trained)
        assert usage["total"]["trained_tokens"] == trained
        assert dashboard_trained_tokens(srv, key) == trained
    assert "Traceback" not in logged, logged[-3000:]
