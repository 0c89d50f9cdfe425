"""What an organisation may ask of the fine-tuning workers, checked when a job is created (no
worker runs here): a base model whose float32 weights fit the workers' memory, the plan's cap
on jobs queued or running, and no job that trains more than the plan's tokens per hour. Each
refusal is OpenAI's error body, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, database_rows, make_tenant,
                      start_server, stop_server)
from ftdata import duck_examples, write_jsonl

SMOLLM2 = "smollm2-135m-instruct"
# Between SmolLM2's float32 weights (135M parameters: 0.54 GB) and Gemma 3 270M's (1.07 GB).
MAX_BASE_BYTES = 700_000_000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("ftlimits"), "--parallel", "2", "--no-worker",
                     env={"BASTION_FINE_TUNE_MAX_BASE_BYTES": str(MAX_BASE_BYTES)})
    yield s
    stop_server(s)


def tenant(srv: RunningServer, tmp: Path, plan: str, *, limits: dict | None = None,
           examples: int = 2) -> tuple[str, openai.OpenAI, str]:
    """(org id, an SDK client with a training key, an uploaded training file's id)."""
    org, key = make_tenant(srv.api, plan, limits=limits, permissions=("training",))
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=120)
    path = write_jsonl(tmp / f"{org}.jsonl", duck_examples(examples))
    with open(path, "rb") as f:
        file_id = sdk.files.create(file=f, purpose="fine-tune").id
    return org, sdk, file_id


def written(srv: RunningServer) -> tuple[int, int]:
    return (len(database_rows(srv, "fine_tuning_jobs")),
            len(database_rows(srv, "fine_tuning_events")))


def test_a_base_model_too_large_for_the_workers_is_refused(srv: RunningServer,
                                                           tmp_path: Path) -> None:
    _, sdk, train = tenant(srv, tmp_path, "dedicated")
    before = written(srv)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model=MODEL, training_file=train)
    err = exc.value.body
    assert (exc.value.status_code, err["type"], err["param"], err["code"]) == (
        400, "invalid_request_error", "model", "model_too_large")
    assert err["message"].startswith(f"The model '{MODEL}' is too large to fine-tune here: its "
                                     f"weights take 1.07 GB as float32"), err["message"]
    assert "at most 0.70 GB (BASTION_FINE_TUNE_MAX_BASE_BYTES)" in err["message"]
    assert written(srv) == before  # refused before anything was written
    # a base that fits is accepted by the same server
    job = sdk.fine_tuning.jobs.create(model=SMOLLM2, training_file=train,
                                      hyperparameters={"n_epochs": 1})
    assert job.status == "queued" and job.model == SMOLLM2
    sdk.fine_tuning.jobs.cancel(job.id)


def test_the_plan_caps_jobs_queued_or_running(srv: RunningServer, tmp_path: Path) -> None:
    org, sdk, train = tenant(srv, tmp_path, "spark")  # spark: one job at a time
    listed = httpx.get(f"{srv.api}/organizations/{org}", headers=bearer(ADMIN_KEY)).json()
    assert listed["limits"]["fine_tuning_jobs"] == 1

    def create() -> openai.types.fine_tuning.FineTuningJob:
        return sdk.fine_tuning.jobs.create(model=SMOLLM2, training_file=train,
                                           hyperparameters={"n_epochs": 1})

    first = create()
    before = written(srv)
    r = httpx.post(f"{srv.api}/fine_tuning/jobs", headers=bearer(sdk.api_key),
                   json={"model": SMOLLM2, "training_file": train,
                         "hyperparameters": {"n_epochs": 1}})
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == (
        "rate_limit_error", "fine_tuning_jobs_limit_exceeded", None)
    assert err["message"] == ("Your organization already has 1 fine-tuning job queued or "
                              "running, the most its plan allows (1). Wait for one to finish or "
                              "cancel one, then create this job again.")
    assert r.headers["x-should-retry"] == "false" and int(r.headers["retry-after"]) >= 60
    assert written(srv) == before
    with pytest.raises(openai.RateLimitError):
        create()
    # the cap is per organisation: another spark organisation starts its own job
    _, other, other_train = tenant(srv, tmp_path, "spark")
    theirs = other.fine_tuning.jobs.create(model=SMOLLM2, training_file=other_train,
                                           hyperparameters={"n_epochs": 1})
    # a job that ends frees its place
    assert sdk.fine_tuning.jobs.cancel(first.id).status == "cancelled"
    second = create()
    # the server administrator raises the cap for this organisation
    r = httpx.patch(f"{srv.api}/organizations/{org}", headers=bearer(ADMIN_KEY),
                    json={"limits": {"fine_tuning_jobs": 2}})
    assert r.status_code == 200 and r.json()["limits"]["fine_tuning_jobs"] == 2
    third = create()
    with pytest.raises(openai.RateLimitError) as exc:
        create()
    assert "already has 2 fine-tuning jobs queued or running" in exc.value.body["message"]
    for client, job in ((sdk, second), (sdk, third), (other, theirs)):
        client.fine_tuning.jobs.cancel(job.id)


def test_a_job_must_fit_the_plans_tokens_per_hour(srv: RunningServer, tmp_path: Path) -> None:
    _, sdk, train = tenant(srv, tmp_path, "seed", limits={"tokens_per_hour": 1000})
    job = sdk.fine_tuning.jobs.create(model=SMOLLM2, training_file=train,
                                      hyperparameters={"n_epochs": 1})
    validated = sdk.fine_tuning.jobs.list_events(job.id, limit=1).data[0]
    tokens = validated.data["training"]["tokens"]  # counted with SmolLM2's tokenizer
    assert 20 <= tokens <= 1000, validated.message
    sdk.fine_tuning.jobs.cancel(job.id)
    epochs = 1000 // tokens + 1  # one epoch more than an hour's budget takes
    before = written(srv)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model=SMOLLM2, training_file=train,
                                    hyperparameters={"n_epochs": epochs})
    err = exc.value.body
    assert (err["param"], err["code"]) == ("training_file", "tokens_per_hour_exceeded")
    assert err["message"] == (f"This job would train {tokens * epochs:,} tokens (the training "
                              f"file's tokens times n_epochs), more than your organization's "
                              f"plan allows in an hour (1,000). Use fewer epochs or a smaller "
                              f"training file.")
    assert written(srv) == before
    ok = sdk.fine_tuning.jobs.create(model=SMOLLM2, training_file=train,
                                     hyperparameters={"n_epochs": epochs - 1})
    sdk.fine_tuning.jobs.cancel(ok.id)
