"""Fine-tuning jobs over the API (no worker runs here): creation with auto hyperparameters,
both URL spellings, pagination, events, cancel, and every bad input refused before anything is
written."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from conftest import MODEL, RunningServer, database_rows, make_tenant, start_server, stop_server
from ftdata import duck_examples, write_jsonl


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("ftapi"), "--parallel", "2", "--no-worker")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def tenant(srv: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An organisation with a training key and two uploaded files (48 and 8 examples)."""
    org, key = make_tenant(srv.api, permissions=("training", "inference"), name="ducks")
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    tmp = tmp_path_factory.mktemp("ftdata")
    train = sdk.files.create(file=open(write_jsonl(tmp / "t.jsonl", duck_examples(48)), "rb"),
                             purpose="fine-tune")
    valid = sdk.files.create(file=open(write_jsonl(tmp / "v.jsonl", duck_examples(8, 1)), "rb"),
                             purpose="fine-tune")
    batch = sdk.files.create(file=open(write_jsonl(tmp / "b.jsonl", duck_examples(2)), "rb"),
                             purpose="batch")
    return {"org": org, "key": key["key"], "sdk": sdk, "train": train.id, "valid": valid.id,
            "batch": batch.id}


def test_create_retrieve_and_auto_hyperparameters(tenant: dict) -> None:
    sdk: openai.OpenAI = tenant["sdk"]
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=tenant["train"],
                                      validation_file=tenant["valid"], suffix="duck", seed=7,
                                      metadata={"team": "qa"})
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "queued" and job.model == MODEL and job.seed == 7
    assert job.organization_id == tenant["org"] and job.user_provided_suffix == "duck"
    assert job.fine_tuned_model is None and job.finished_at is None and job.error is None
    # 48 examples: 3 epochs (at least 100 examples seen), batches of 4 (an eighth, a power of 2)
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.type == "lora" and job.metadata == {"team": "qa"}
    assert sdk.fine_tuning.jobs.retrieve(job.id) == job
    events = sdk.fine_tuning.jobs.list_events(job.id).data
    assert [e.message for e in events][::-1][:2] == [
        f"Created fine-tuning job: {job.id}",
        f"Validating training file: {tenant['train']} and validation file: {tenant['valid']}"]
    assert "48 training examples" in events[0].message
    sdk.fine_tuning.jobs.cancel(job.id)


def test_explicit_hyperparameters_and_method(tenant: dict) -> None:
    sdk: openai.OpenAI = tenant["sdk"]
    job = sdk.fine_tuning.jobs.create(
        model="gemma", training_file=tenant["train"],
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}}})
    assert job.model == MODEL  # the alias resolves to the base model's id
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size,
            job.hyperparameters.learning_rate_multiplier) == (2, 8, 0.5)
    r = httpx.post(f"{tenant['sdk'].base_url}fine-tuning/jobs",
                   headers={"Authorization": f"Bearer {tenant['key']}"},
                   json={"model": MODEL, "training_file": tenant["train"],
                         "hyperparameters": {"n_epochs": 3, "batch_size": 4,
                                             "learning_rate": 5e-4}})
    assert r.status_code == 200, r.text
    assert r.json()["hyperparameters"]["learning_rate"] == 5e-4
    assert r.json()["hyperparameters"]["learning_rate_multiplier"] == 0.5
    lora = sdk.fine_tuning.jobs.create(model=MODEL, training_file=tenant["train"],
                                       method={"type": "lora", "lora": {"rank": 4, "alpha": 8}})
    assert lora.method.to_dict()["lora"]["rank"] == 4
    for j in (job.id, r.json()["id"], lora.id):
        sdk.fine_tuning.jobs.cancel(j)


def test_list_pagination_and_both_spellings(srv: RunningServer, tmp_path: Path) -> None:
    _, key = make_tenant(srv.api, permissions=("training",))
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    f = sdk.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(4)), "rb"),
                         purpose="fine-tune")
    ids = [sdk.fine_tuning.jobs.create(model=MODEL, training_file=f.id).id for _ in range(3)]
    page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
    rest = sdk.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
    assert [j.id for j in rest.data] == ids[:1] and not rest.has_more
    spec = httpx.get(f"{srv.api}/fine-tuning/jobs", headers={"Authorization": f"Bearer {key['key']}"})
    assert [j["id"] for j in spec.json()["data"]] == ids[::-1]
    one = httpx.get(f"{srv.api}/fine-tuning/jobs/{ids[0]}",
                    headers={"Authorization": f"Bearer {key['key']}"}).json()
    assert one == sdk.fine_tuning.jobs.retrieve(ids[0]).to_dict(mode="json") | {
        k: v for k, v in one.items() if v is None}
    assert len(sdk.fine_tuning.jobs.list().data) == 3  # default limit 20 covers them


def test_cancel(tenant: dict) -> None:
    sdk: openai.OpenAI = tenant["sdk"]
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=tenant["train"])
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent
    assert sdk.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message == "Job cancelled"
    assert sdk.fine_tuning.jobs.checkpoints.list(job.id).data == []


def test_file_used_by_a_queued_job_cannot_be_deleted(tenant: dict, tmp_path: Path) -> None:
    sdk: openai.OpenAI = tenant["sdk"]
    f = sdk.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(4)), "rb"),
                         purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    with pytest.raises(openai.ConflictError) as exc:
        sdk.files.delete(f.id)
    assert exc.value.body["code"] == "file_in_use" and job.id in exc.value.body["message"]
    sdk.fine_tuning.jobs.cancel(job.id)
    assert sdk.files.delete(f.id).deleted


def bad_cases(t: dict, other_file: str) -> list[tuple[dict, str, str]]:
    ok = {"model": MODEL, "training_file": t["train"]}
    return [
        (ok | {"training_file": other_file}, "training_file", "file_not_found"),
        (ok | {"training_file": "file-nope"}, "training_file", "file_not_found"),
        (ok | {"validation_file": other_file}, "validation_file", "file_not_found"),
        (ok | {"training_file": t["batch"]}, "training_file", "invalid_file_purpose"),
        (ok | {"model": "no-such-model"}, "model", "model_not_available"),
        (ok | {"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs", "invalid_value"),
        (ok | {"hyperparameters": {"n_epochs": 1.5}}, "hyperparameters.n_epochs", "invalid_value"),
        (ok | {"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size", "invalid_value"),
        (ok | {"hyperparameters": {"learning_rate": 10}}, "hyperparameters.learning_rate",
         "invalid_value"),
        (ok | {"hyperparameters": {"learning_rate_multiplier": 0}},
         "hyperparameters.learning_rate_multiplier", "invalid_value"),
        (ok | {"hyperparameters": {"learning_rate_multiplier": 100}},
         "hyperparameters.learning_rate_multiplier", "invalid_value"),
        (ok | {"suffix": "my model!"}, "suffix", "invalid_value"),
        (ok | {"suffix": "a:b"}, "suffix", "invalid_value"),
        (ok | {"suffix": "x" * 41}, "suffix", "invalid_value"),
        (ok | {"method": {"type": "dpo"}}, "method", "invalid_value"),
        (ok | {"method": {"type": "reinforcement"}}, "method", "invalid_value"),
        (ok | {"method": {"type": "lora", "lora": {"rank": 0}}}, "method.lora.rank",
         "invalid_value"),
        (ok | {"hyperparameters": {"n_epochs": 2},
               "method": {"type": "supervised",
                          "supervised": {"hyperparameters": {"n_epochs": 3}}}},
         "hyperparameters", "invalid_value"),
        (ok | {"seed": -3}, "seed", "invalid_value"),
        (ok | {"temperature": 1}, "temperature", "unknown_parameter"),
        ({"training_file": t["train"]}, "model", "missing_required_parameter"),
    ]


def test_bad_job_requests_leave_nothing_behind(srv: RunningServer, tenant: dict,
                                               tmp_path: Path) -> None:
    _, key = make_tenant(srv.api, permissions=("training",))
    other = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    theirs = other.files.create(file=open(write_jsonl(tmp_path / "x.jsonl", duck_examples(2)),
                                          "rb"), purpose="fine-tune").id
    before = len(database_rows(srv, "fine_tuning_jobs")), len(database_rows(srv, "fine_tuning_events"))
    for body, param, code in bad_cases(tenant, theirs):
        for url in ("fine_tuning/jobs", "fine-tuning/jobs"):
            r = httpx.post(f"{srv.api}/{url}", json=body,
                           headers={"Authorization": f"Bearer {tenant['key']}"})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert (err["type"], err["param"], err["code"]) == (
                "invalid_request_error", param, code), (body, err)
    after = len(database_rows(srv, "fine_tuning_jobs")), len(database_rows(srv, "fine_tuning_events"))
    assert after == before


def test_precise_messages(tenant: dict) -> None:
    sdk: openai.OpenAI = tenant["sdk"]
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model=MODEL, training_file=tenant["train"],
                                    hyperparameters={"n_epochs": -1})
    assert exc.value.body["message"] == ("Invalid value for 'hyperparameters.n_epochs': n_epochs "
                                         "must be 'auto' or an integer from 1 to 50 (got -1).")
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model=MODEL, training_file=tenant["batch"])
    assert exc.value.body["message"] == (
        f"training_file '{tenant['batch']}' was uploaded with purpose 'batch'; training data "
        f"must be uploaded with purpose 'fine-tune'.")


def test_jobs_are_private_to_their_organisation(srv: RunningServer, tenant: dict) -> None:
    job = tenant["sdk"].fine_tuning.jobs.create(model=MODEL, training_file=tenant["train"])
    _, key = make_tenant(srv.api, permissions=("training",))
    other = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list().data]
    for call in (other.fine_tuning.jobs.retrieve, other.fine_tuning.jobs.cancel,
                 other.fine_tuning.jobs.list_events, other.fine_tuning.jobs.checkpoints.list):
        with pytest.raises(openai.NotFoundError) as exc:
            call(job.id)
        assert exc.value.body["code"] == "fine_tuning_job_not_found"
    assert tenant["sdk"].fine_tuning.jobs.retrieve(job.id).status == "queued"
    tenant["sdk"].fine_tuning.jobs.cancel(job.id)


def test_training_permission_is_required(srv: RunningServer, tenant: dict) -> None:
    _, key = make_tenant(srv.api, permissions=("inference",))
    client = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.fine_tuning.jobs.create(model=MODEL, training_file=tenant["train"])
    with pytest.raises(openai.PermissionDeniedError):
        client.fine_tuning.jobs.list()
