"""Fine-tuning end to end: upload, train (LoRA on CPU), export to a GGUF adapter, serve it on
the llama.cpp engine, and see the model do what the data taught it where the base model does
not. Slow: about two minutes on two cores."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from conftest import MODEL, RunningServer, make_tenant, start_server, stop_server
from ftdata import ANSWER, HELD_OUT, duck_examples, write_jsonl
from polling import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("fte2e"), "--parallel", "4",
                     env={"BASTION_WORKER_POLL_SECONDS": "0.5"})
    yield s
    stop_server(s)


def ask(client: openai.OpenAI, model: str, question: str, **kw) -> str:
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=16,
                                       messages=[{"role": "user", "content": question}], **kw)
    return r.choices[0].message.content or ""


def wait_for(client: openai.OpenAI, job_id: str, timeout: float = 900) -> tuple[object, list[str]]:
    seen: list[str] = []

    def retrieve() -> object:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        return job

    job = wait_until(retrieve, lambda job: job.status in ("succeeded", "failed", "cancelled"),
                     timeout=timeout, interval=1, message=lambda _: f"job {job_id} did not "
                     f"finish in {timeout}s (statuses {seen})")
    return job, seen


@pytest.mark.timeout(900)
def test_fine_tuned_model_learns_and_serves(srv: RunningServer, tmp_path: Path) -> None:
    org, key = make_tenant(srv.api, plan="dedicated", permissions=("training", "inference"))
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=300)
    before = {q: ask(sdk, MODEL, q) for q in HELD_OUT}
    assert not any("quack" in a.lower() for a in before.values()), before

    train = sdk.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(24)), "rb"),
                             purpose="fine-tune")
    valid_rows = [r for r in duck_examples(96) if r not in duck_examples(24)][:8]
    valid = sdk.files.create(file=open(write_jsonl(tmp_path / "v.jsonl", valid_rows), "rb"),
                             purpose="fine-tune")
    started = time.time()
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=train.id,
                                      validation_file=valid.id, suffix="duck", seed=1,
                                      hyperparameters={"n_epochs": 2, "batch_size": 4})
    job, statuses = wait_for(sdk, job.id)
    wall = time.time() - started
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=200).data[::-1]
    assert job.status == "succeeded", [e.message for e in events]
    assert statuses[-2:] == ["running", "succeeded"]
    assert job.fine_tuned_model == f"ft:{MODEL}:{org}:duck:{job.id.split('-')[1][:8]}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at

    metrics = [e.data for e in events if e.type == "metrics"]
    steps = [m["step"] for m in metrics if "train_loss" in m]
    assert steps == list(range(1, 13))  # 24 examples / 4 per batch * 2 epochs
    valid_losses = [m["valid_loss"] for m in metrics if "valid_loss" in m]
    assert len(valid_losses) == 3  # before training and after each epoch
    assert valid_losses[-1] < valid_losses[0] / 4, valid_losses
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]
    assert all(c.metrics.valid_loss is not None for c in checkpoints)
    messages = [e.message for e in events]
    assert messages[-2:] == [f"New fine-tuned model created: {job.fine_tuned_model}",
                             "The job has successfully completed"]

    ft = job.fine_tuned_model
    assert ft in [m.id for m in sdk.models.list().data]
    after = {q: ask(sdk, ft, q) for q in HELD_OUT}
    assert all(a.strip() == ANSWER for a in after.values()), after
    stream = sdk.chat.completions.create(model=ft, temperature=0, max_tokens=16, stream=True,
                                         messages=[{"role": "user", "content": HELD_OUT[0]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == after[HELD_OUT[0]]
    with ThreadPoolExecutor(4) as pool:  # served by the batching engine, side by side
        together = list(pool.map(lambda q: ask(sdk, ft, q), HELD_OUT * 2))
    assert together == [after[q] for q in HELD_OUT * 2]
    assert ask(sdk, MODEL, HELD_OUT[0]) == before[HELD_OUT[0]]  # the base is unchanged

    _, other_key = make_tenant(srv.api, permissions=("training", "inference"))
    other = openai.OpenAI(base_url=srv.api, api_key=other_key["key"], max_retries=0)
    assert ft not in [m.id for m in other.models.list().data]
    with pytest.raises(openai.NotFoundError) as exc:
        ask(other, ft, HELD_OUT[0])
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model=ft, training_file=train.id)
    assert exc.value.body["code"] == "model_not_fine_tunable"

    follow = subprocess.run([sys.executable, "-m", "bastion.cli", "jobs", "follow", job.id,
                             "--base-url", srv.api, "--api-key", key["key"]],
                            capture_output=True, text=True, timeout=120)
    assert follow.returncode == 0, follow.stderr
    assert f"{job.id}: succeeded -> {ft}" in follow.stdout, follow.stdout
    assert "Fine-tuning job started" in follow.stdout

    curve = ", ".join(f"{m['train_loss']:.3f}" for m in metrics if "train_loss" in m)
    print(f"\nfine-tuning wall time {wall:.0f}s; training loss {curve}; validation loss "
          f"{' -> '.join(f'{v:.3f}' for v in valid_losses)}\nbefore: {before}\nafter: {after}")


@pytest.mark.timeout(900)
def test_full_fine_tuning_is_exported_as_a_whole_gguf(srv: RunningServer, tmp_path: Path) -> None:
    org, key = make_tenant(srv.api, plan="dedicated", permissions=("training", "inference", "models"))
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=300)
    train = sdk.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(12)), "rb"),
                             purpose="fine-tune")
    valid = sdk.files.create(file=open(write_jsonl(tmp_path / "v.jsonl",
                                                   duck_examples(96)[90:94]), "rb"),
                             purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=MODEL, training_file=train.id, validation_file=valid.id, suffix="full", seed=1,
        method={"type": "full", "full": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate": 1e-4}}})
    assert job.method.type == "full"
    job, _ = wait_for(sdk, job.id)
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=200).data[::-1]
    assert job.status == "succeeded", [e.message for e in events]
    assert any("100,325,376 parameters (full)" in e.message for e in events)
    valid_losses = [e.data["valid_loss"] for e in events if e.type == "metrics"
                    and "valid_loss" in e.data]
    assert len(valid_losses) == 3 and valid_losses[-1] < valid_losses[0] / 2, valid_losses
    workdir = srv.data_dir / "fine_tuning" / job.id
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["step-000006"]
    assert (workdir / "model" / "model.gguf").exists()
    answer = ask(sdk, job.fine_tuned_model, HELD_OUT[1])
    assert "quack" in answer.lower(), answer
    # deleting the fine-tuned model stops serving it; the job keeps its record, as on OpenAI
    assert sdk.models.delete(job.fine_tuned_model).deleted is True
    with pytest.raises(openai.NotFoundError):
        ask(sdk, job.fine_tuned_model, HELD_OUT[1])
    assert job.fine_tuned_model not in [m.id for m in sdk.models.list().data]
    assert sdk.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == job.fine_tuned_model
    assert not (workdir / "model" / "model.gguf").exists()
    print(f"\nfull fine-tuning: validation loss {' -> '.join(f'{v:.3f}' for v in valid_losses)}; "
          f"{HELD_OUT[1]!r} -> {answer!r}")
