"""The dashboard's Files and Fine-tuning pages in a real headless Chromium, against a server of
their own that runs no fine-tuning worker (jobs stay queued until a test moves them). A job's
progress is written the way the worker writes it: queue.claim_next, the worker's JobReporter and
queue.finish, over the server's own database. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, make_tenant, start_server,
                      stop_server)
from ftdata import duck_examples, write_jsonl
from dashboard_browser import (CHROMIUM, Page, browser, csrf_of, session_cookie, shot, sign_in,
                               sync_api)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")
expect = sync_api.expect
__all__ = ["browser"]  # the browser fixture, shared by the dashboard tests


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("dashft"), "--parallel", "2", "--no-worker",
                     env={"BASTION_WORKER_POLL_SECONDS": "0.5"})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def org(srv: RunningServer) -> dict:
    """An organisation with a training key and an inference-only key."""
    org_id, key = make_tenant(srv.api, "seed", permissions=("training", "inference"),
                              name="Tuning Co")
    r = httpx.post(f"{srv.api}/organizations/{org_id}/api-keys", headers=bearer(ADMIN_KEY),
                   json={"name": "chat only", "permissions": ["inference"]})
    assert r.status_code == 200, r.text
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=120)
    return {"org": org_id, "training": key["key"], "inference": r.json()["key"], "sdk": sdk}


@pytest.fixture(scope="module")
def page(browser: object, srv: RunningServer, org: dict) -> Iterator[Page]:
    p = sign_in(browser, srv, org["training"])
    yield p
    p.context.close()


@pytest.fixture(scope="module")
def sessions(srv: RunningServer):
    """The server's database, as a worker process opens it."""
    from bastion.db.session import make_engine, session_factory

    engine = make_engine(srv.database_url)
    yield session_factory(engine)
    engine.dispose()


def upload_sdk(org: dict, path: Path, purpose: str = "fine-tune") -> str:
    with open(path, "rb") as f:
        return org["sdk"].files.create(file=f, purpose=purpose).id


def claim(sessions, job_id: str):
    """Claim the job as a worker does (the oldest queued job: the tests leave no other)."""
    from bastion.finetune import queue

    got = queue.claim_next(sessions, "dashboard-test-worker")
    assert got is not None and got.job_id == job_id, got
    return got


def cancel_quietly(org: dict, job_id: str) -> None:
    job = org["sdk"].fine_tuning.jobs.retrieve(job_id)
    if job.status in ("queued", "running", "validating_files"):
        org["sdk"].fine_tuning.jobs.cancel(job_id)


# --- files ------------------------------------------------------------------------------------

def test_training_key_uploads_a_file(page: Page, org: dict, tmp_path: Path) -> None:
    nav = page.locator("header nav")
    expect(nav.get_by_role("link", name="Fine-tuning")).to_be_visible()
    nav.get_by_role("link", name="Files").click()
    expect(page.locator("h1")).to_have_text("Files")
    expect(page.locator("table.files")).to_contain_text("No files yet")
    path = write_jsonl(tmp_path / "ducks.jsonl", duck_examples(12))
    page.locator("#upload-file").set_input_files(str(path))
    page.get_by_label("Purpose").select_option("fine-tune")
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r"/dashboard/files\?uploaded=file-"))
    file_id = page.url.split("uploaded=")[1]
    expect(page.locator(".notice")).to_have_text(f"Uploaded ducks.jsonl as {file_id}.")
    row = page.locator(f"tr[data-file-id='{file_id}']")
    expect(row).to_have_class(re.compile("highlight"))
    expect(row.locator("td").nth(0)).to_have_text("ducks.jsonl")
    expect(row.locator("td").nth(2)).to_have_text("fine-tune")
    size = path.stat().st_size
    assert row.locator("td").nth(3).get_attribute("title") == f"{size:,} bytes"
    validation = row.locator("td.validation")
    expect(validation.locator(".badge")).to_have_text("valid")
    expect(validation).to_contain_text("12 examples")
    expect(validation).to_contain_text(f"checked with {MODEL}")
    found = re.search(r"([\d,]+) tokens", validation.inner_text())
    assert found is not None
    tokens = int(found.group(1).replace(",", ""))
    assert tokens > 12 * 10  # every example is a dozen tokens or more
    # the API sees the same file
    got = org["sdk"].files.retrieve(file_id)
    assert (got.filename, got.bytes, got.purpose) == ("ducks.jsonl", size, "fine-tune")
    shot(page, "files")

    # a file for another purpose is kept without validation, and says so
    other = tmp_path / "notes.jsonl"
    other.write_text('{"anything": 1}\n')
    page.locator("#upload-file").set_input_files(str(other))
    page.get_by_label("Purpose").select_option("batch")
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r"uploaded=file-"))
    row = page.locator(f"tr[data-file-id='{page.url.split('uploaded=')[1]}']")
    expect(row.locator("td.validation .badge")).to_have_text("not checked")
    expect(row.locator("td").nth(2)).to_have_text("batch")


def test_bad_jsonl_shows_the_apis_error(page: Page, org: dict, tmp_path: Path) -> None:
    rows = [json.dumps(r) for r in duck_examples(4)]
    rows[2] = '{"messages": [{"role": "user", "content": "hi"}'  # line 3: cut short
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(openai.BadRequestError) as api:
        upload_sdk(org, path)
    message = api.value.body["message"]
    assert message.startswith("Invalid training file: line 3: invalid JSON")
    before = [f.id for f in org["sdk"].files.list().data]

    page.goto("/dashboard/files")
    page.locator("#upload-file").set_input_files(str(path))
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Upload").click()
    assert posted.value.status == 400
    expect(page.locator("#upload-error")).to_have_text(message)
    expect(page.locator("table.files")).not_to_contain_text("broken.jsonl")
    assert [f.id for f in org["sdk"].files.list().data] == before
    shot(page, "files-invalid")

    # a well-formed line the trainer cannot use is named too
    path.write_text(json.dumps(duck_examples(1)[0]) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    page.locator("#upload-file").set_input_files(str(path))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-error")).to_have_text(
        "Invalid training file: line 2: no assistant message to learn from (each example "
        "needs at least one).")


def test_delete_file_asks_first(page: Page, org: dict, tmp_path: Path) -> None:
    file_id = upload_sdk(org, write_jsonl(tmp_path / "old.jsonl", duck_examples(2)))
    page.goto("/dashboard/files")
    row = page.locator(f"tr[data-file-id='{file_id}']")
    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss() if len(asked) == 1 else dialog.accept()

    page.on("dialog", answer)
    try:
        row.get_by_role("button", name=f"Delete old.jsonl ({file_id})").click()
        expect(row).to_be_visible()  # dismissed: nothing happened
        assert org["sdk"].files.retrieve(file_id).id == file_id
        row.get_by_role("button", name=f"Delete old.jsonl ({file_id})").click()
        page.wait_for_url(re.compile(r"deleted="))
    finally:
        page.remove_listener("dialog", answer)
    assert asked[0].startswith(f"Delete old.jsonl ({file_id})?") and len(asked) == 2
    expect(page.locator(".notice")).to_have_text(f"Deleted {file_id}.")
    expect(page.locator(f"tr[data-file-id='{file_id}']")).to_have_count(0)
    with pytest.raises(openai.NotFoundError):
        org["sdk"].files.retrieve(file_id)


# --- fine-tuning jobs -------------------------------------------------------------------------

def test_jobs_page_lists_an_sdk_job_and_cancels_it(page: Page, org: dict,
                                                   tmp_path: Path) -> None:
    train = upload_sdk(org, write_jsonl(tmp_path / "t.jsonl", duck_examples(8)))
    job = org["sdk"].fine_tuning.jobs.create(model=MODEL, training_file=train, suffix="web")
    page.goto("/dashboard/fine-tuning")
    row = page.locator(f"tr[data-job-id='{job.id}']")
    expect(row.locator(".badge")).to_have_text("queued")
    expect(row).to_contain_text(MODEL)
    expect(row.locator("td").nth(4)).to_have_text("—")  # no tokens trained yet
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", row.locator("td").nth(3).inner_text())
    shot(page, "fine-tuning")

    row.get_by_role("link", name=job.id).click()
    expect(page.locator("#job-status")).to_have_text("queued")
    expect(page.locator("ol.events")).to_contain_text(f"Created fine-tuning job: {job.id}")
    expect(page.locator("ol.events")).to_contain_text("8 training examples")
    expect(page.locator("#loss-curve")).to_contain_text("No loss reported yet")
    expect(page.locator("#loss-curve svg")).to_have_count(0)
    expect(page.locator("#try-it")).to_have_count(0)
    shot(page, "fine-tuning-job-queued")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_url(re.compile(r"cancelled=1"))
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator(".notice")).to_have_text("The job was cancelled.")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    expect(page.locator("ol.events li").first).to_contain_text("Job cancelled")
    assert org["sdk"].fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_start_a_job_from_the_form(page: Page, org: dict, tmp_path: Path) -> None:
    train = upload_sdk(org, write_jsonl(tmp_path / "form.jsonl", duck_examples(6)))
    page.goto("/dashboard/fine-tuning")
    page.get_by_label("Base model").select_option(MODEL)  # SmolLM2 is listed first
    page.get_by_label("Training file").select_option(train)
    page.get_by_label("Method").select_option("full")
    page.get_by_label("Epochs").fill("2")
    page.get_by_label("Suffix").fill("from-form")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/dashboard/fine-tuning/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    try:
        job = org["sdk"].fine_tuning.jobs.retrieve(job_id)
        assert (job.status, job.model, job.training_file, job.user_provided_suffix) == (
            "queued", MODEL, train, "from-form")
        assert job.method.type == "full" and job.hyperparameters.n_epochs == 2
        expect(page.locator("#job-status")).to_have_text("queued")
        # the API's own rules, with its message: the browser's pattern check is bypassed here
        r = page.request.post("/dashboard/fine-tuning", form={
            "csrf_token": csrf_of(page), "model": MODEL, "training_file": train,
            "suffix": "no spaces allowed"})
        assert r.status == 400
        assert "Suffix: suffix may contain only letters, digits" in r.text()
        r = page.request.post("/dashboard/fine-tuning", form={
            "csrf_token": csrf_of(page), "model": MODEL, "training_file": "file-nope"})
        assert r.status == 400 and "training_file &#39;file-nope&#39; does not exist" in r.text()
    finally:
        cancel_quietly(org, job_id)


def metrics_of(step: int, total: int, train: float | None, valid: float | None) -> dict:
    data: dict = {"step": step, "total_steps": total}
    if train is not None:
        data["train_loss"] = train
    if valid is not None:
        data |= {"valid_loss": valid, "valid_mean_token_accuracy": 0.5 + step / 20}
    return data


TRAIN = [2.31, 1.62, 1.05, 0.71, 0.44, 0.29]
VALID = {0: 2.52, 3: 1.12, 6: 0.38}


def test_job_page_draws_the_loss_curve(page: Page, org: dict, srv: RunningServer, sessions,
                                       tmp_path: Path) -> None:
    from bastion.finetune import queue
    from bastion.finetune.jobs import model_name
    from bastion.finetune.worker import JobReporter
    from bastion.db.tables import FineTuningJob

    train = upload_sdk(org, write_jsonl(tmp_path / "t.jsonl", duck_examples(12)))
    valid = upload_sdk(org, write_jsonl(tmp_path / "v.jsonl", duck_examples(4, 3)))
    job = org["sdk"].fine_tuning.jobs.create(
        model=MODEL, training_file=train, validation_file=valid, suffix="curve", seed=1,
        method={"type": "full", "full": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    work = claim(sessions, job.id)
    reporter = JobReporter(sessions, work, threading.Event(), lease_s=60)
    try:
        reporter.metrics(metrics_of(0, 6, None, VALID[0]))
        for step, loss in enumerate(TRAIN, start=1):
            assert reporter.keep_going(step, 6, tokens=100 * step)
            reporter.metrics(metrics_of(step, 6, loss, VALID.get(step)))
    finally:
        reporter.close()
    # half way, the page shows a running job with its curve so far
    page.goto(f"/dashboard/fine-tuning/{job.id}")
    expect(page.locator("#job-status")).to_have_text("running")
    expect(page.get_by_role("button", name="Cancel job")).to_be_visible()

    # the worker's success: a whole-weights model file, here the bundled GGUF itself
    with sessions() as s:
        row = s.get(FineTuningJob, job.id)
        name = model_name(row)
    gguf = next((srv.data_dir / "models").glob("*.gguf")).resolve()
    assert queue.finish(sessions, work, "succeeded", f"New fine-tuned model created: {name}",
                        "The job has successfully completed", fine_tuned_model=name,
                        artifact=str(gguf), trained_tokens=600)

    page.goto(f"/dashboard/fine-tuning/{job.id}")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    expect(page.locator("[data-stat=trained-tokens]")).to_have_text("600")
    expect(page.locator("[data-stat=steps]")).to_have_text("6 / 6")
    svg = page.locator("#loss-curve svg.wide")
    expect(svg).to_have_attribute("aria-label", f"Loss per step of {job.id}")
    expect(svg).to_be_visible()
    expect(page.locator("#loss-curve svg.narrow")).to_be_hidden()  # the phone's drawing
    line = svg.locator("polyline.line-a")
    expect(line).to_have_count(1)
    points = [tuple(map(float, p.split(",")))
              for p in (line.get_attribute("points") or "").split()]
    assert len(points) == len(TRAIN)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)  # one point per step, left to right
    assert ys == sorted(ys)  # a falling loss is drawn lower and lower (SVG y grows downward)
    # every point's tooltip carries its exact value
    tips = svg.locator("circle.line-a title").all_text_contents()
    assert tips == [f"training loss, step {i}: {v:.4f}" for i, v in enumerate(TRAIN, 1)]
    assert svg.locator("circle.line-b title").all_text_contents() == [
        f"validation loss, step {k}: {v:.4f}" for k, v in VALID.items()]
    # the validation point at step 3 lies between the training points of steps 2 and 4 in x
    vx = [float(c.get_attribute("cx") or "nan") for c in svg.locator("circle.line-b").all()]
    assert xs[1] < vx[1] < xs[3] and vx[0] < xs[0] and vx[2] == xs[5]
    expect(page.locator(".legend")).to_contain_text("training loss")
    expect(page.locator(".legend")).to_contain_text("validation loss")
    page.get_by_text("The numbers (7 steps)").click()
    cells = page.locator(".metrics-table tbody tr").nth(3).locator("td").all_inner_texts()
    assert cells == ["3", "1.0500", "1.1200", "65.0%"]
    events = page.locator("ol.events")
    expect(events).to_contain_text("Step 3/6, training loss=1.0500, validation loss=1.1200")
    expect(events.locator("li").first).to_contain_text("The job has successfully completed")

    # the model it made, served once the catalog has picked it up
    expect(page.locator("#ft-model")).to_have_value(name)
    for _ in range(60):
        if "Served now" in page.locator("#result-heading + .copy-row + p").inner_text():
            break
        page.wait_for_timeout(500)
        page.reload()
    expect(page.locator("#result-heading + .copy-row + p")).to_contain_text("Served now")
    shot(page, "fine-tuning-job")
    page.get_by_role("link", name="Try it in the playground").click()
    page.wait_for_url(re.compile(r"/dashboard/playground\?model=ft"))
    expect(page.locator("#model")).to_have_value(name)
    expect(page.locator("#model-missing")).to_have_count(0)
    page.fill("#max_tokens", "4")
    page.fill("#temperature", "0")
    page.fill("#messages .msg:first-child .content", "Hello")
    page.click("#send-button")
    expect(page.locator("#status")).to_have_attribute("data-state", "done", timeout=60_000)
    expect(page.locator("#stat-completion")).to_have_text(re.compile(r"^[1-4]$"))
    # a fine-tuned model that is not (yet) served is named, not silently replaced
    page.goto("/dashboard/playground?model=ft:nothing:here")
    expect(page.locator("#model-missing")).to_contain_text("ft:nothing:here")


def test_failed_job_shows_its_error(page: Page, org: dict, sessions, tmp_path: Path) -> None:
    from bastion.finetune import queue

    train = upload_sdk(org, write_jsonl(tmp_path / "t.jsonl", duck_examples(4)))
    job = org["sdk"].fine_tuning.jobs.create(model=MODEL, training_file=train)
    work = claim(sessions, job.id)
    message = "Training failed: CUDA is not available and the CPU ran out of memory"
    assert queue.finish(sessions, work, "failed", message, level="error",
                        error={"code": "training_failed", "message": message, "param": None})
    page.goto("/dashboard/fine-tuning")
    expect(page.locator(f"tr[data-job-id='{job.id}'] .badge")).to_have_text("failed")
    page.goto(f"/dashboard/fine-tuning/{job.id}")
    expect(page.locator("#job-status")).to_have_text("failed")
    expect(page.locator("#job-error")).to_contain_text("The job failed")
    expect(page.locator("#job-error")).to_contain_text("training_failed")
    expect(page.locator("#job-error .error-message")).to_have_text(message)
    expect(page.locator("ol.events li.level-error")).to_contain_text(message)
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    expect(page.locator("#ft-model")).to_have_count(0)
    shot(page, "fine-tuning-job-failed")
    # cancelling a finished job is refused as on the API (409), not silently ignored
    r = page.request.post(f"/dashboard/fine-tuning/{job.id}/cancel",
                          form={"csrf_token": csrf_of(page)})
    assert r.status == 409 and "has already failed" in r.text()


# --- who may, and forged forms --------------------------------------------------------------

def test_inference_key_cannot_reach_files_or_fine_tuning(browser: object, srv: RunningServer,
                                                         org: dict, tmp_path: Path) -> None:
    train = upload_sdk(org, write_jsonl(tmp_path / "t.jsonl", duck_examples(4)))
    job = org["sdk"].fine_tuning.jobs.create(model=MODEL, training_file=train)
    p = sign_in(browser, srv, org["inference"])
    try:
        nav = p.locator("header nav")
        expect(nav.get_by_role("link", name="Playground")).to_be_visible()
        expect(nav.get_by_role("link", name="Fine-tuning")).to_have_count(0)
        expect(nav.get_by_role("link", name="Files")).to_have_count(0)
        for url in ("/dashboard/files", "/dashboard/fine-tuning",
                    f"/dashboard/fine-tuning/{job.id}"):
            response = p.goto(url)
            assert response is not None and response.status == 403, url
            expect(p.locator("h1")).to_have_text("Not allowed")
            expect(p.locator("main")).to_contain_text("'training' permission")
        shot(p, "fine-tuning-forbidden")
        # nor by posting the forms itself, with this session's valid CSRF token
        p.goto("/dashboard/")
        token = csrf_of(p)
        r = p.request.post(f"/dashboard/fine-tuning/{job.id}/cancel", form={"csrf_token": token})
        assert r.status == 403
        r = p.request.post(f"/dashboard/files/{train}/delete", form={"csrf_token": token})
        assert r.status == 403
        r = p.request.post("/dashboard/files", multipart={
            "csrf_token": token, "purpose": "fine-tune",
            "file": {"name": "x.jsonl", "mimeType": "application/jsonl",
                     "buffer": json.dumps(duck_examples(1)[0]).encode()}})
        assert r.status == 403
        assert org["sdk"].fine_tuning.jobs.retrieve(job.id).status == "queued"
        assert "x.jsonl" not in [f.filename for f in org["sdk"].files.list().data]
        assert org["sdk"].files.retrieve(train).id == train
    finally:
        p.context.close()
        cancel_quietly(org, job.id)


def test_another_organisations_jobs_and_files_are_not_found(browser: object, srv: RunningServer,
                                                           org: dict, tmp_path: Path) -> None:
    train = upload_sdk(org, write_jsonl(tmp_path / "t.jsonl", duck_examples(4)))
    job = org["sdk"].fine_tuning.jobs.create(model=MODEL, training_file=train)
    _, other = make_tenant(srv.api, permissions=("training",), name="Other Co")
    p = sign_in(browser, srv, other["key"])
    try:
        p.goto("/dashboard/fine-tuning")
        expect(p.locator("table.jobs")).to_contain_text("No fine-tuning jobs yet")
        p.goto("/dashboard/files")
        expect(p.locator("table.files")).to_contain_text("No files yet")
        response = p.goto(f"/dashboard/fine-tuning/{job.id}")
        assert response is not None and response.status == 404
        expect(p.locator("main")).to_contain_text(f"No fine-tuning job '{job.id}'")
        token = csrf_of(p)
        r = p.request.post(f"/dashboard/fine-tuning/{job.id}/cancel", form={"csrf_token": token})
        assert r.status == 404
        r = p.request.post(f"/dashboard/files/{train}/delete", form={"csrf_token": token})
        assert r.status == 404
        assert org["sdk"].fine_tuning.jobs.retrieve(job.id).status == "queued"
        assert org["sdk"].files.retrieve(train).id == train
    finally:
        p.context.close()
        cancel_quietly(org, job.id)


def test_csrf_less_posts_are_refused(page: Page, srv: RunningServer, org: dict,
                                     tmp_path: Path) -> None:
    train = upload_sdk(org, write_jsonl(tmp_path / "t.jsonl", duck_examples(4)))
    job = org["sdk"].fine_tuning.jobs.create(model=MODEL, training_file=train)
    try:
        page.goto("/dashboard/files")
        cookies = session_cookie(page)
        files_before = sorted(f.id for f in org["sdk"].files.list().data)
        jobs_before = [j.id for j in org["sdk"].fine_tuning.jobs.list().data]
        base = srv.base_url
        for token in (None, "", "not-the-token"):
            extra = {} if token is None else {"csrf_token": token}
            r = httpx.post(f"{base}/dashboard/fine-tuning/{job.id}/cancel", data=extra,
                           cookies=cookies)
            assert r.status_code == 403 and "security token" in r.text, r.text
            r = httpx.post(f"{base}/dashboard/files/{train}/delete", data=extra, cookies=cookies)
            assert r.status_code == 403 and "security token" in r.text
            r = httpx.post(f"{base}/dashboard/files", cookies=cookies,
                           data={"purpose": "fine-tune", **extra},
                           files={"file": ("forged.jsonl", json.dumps(duck_examples(1)[0]))})
            assert r.status_code == 403 and "security token" in r.text
            r = httpx.post(f"{base}/dashboard/fine-tuning", cookies=cookies,
                           data={"model": MODEL, "training_file": train, **extra})
            assert r.status_code == 403 and "security token" in r.text
        assert org["sdk"].fine_tuning.jobs.retrieve(job.id).status == "queued"
        assert sorted(f.id for f in org["sdk"].files.list().data) == files_before
        assert [j.id for j in org["sdk"].fine_tuning.jobs.list().data] == jobs_before
        # and the upload's files were not left behind in the blob store's scratch directory
        assert list((srv.data_dir / "files" / ".partial").glob("*")) == []
        # the page's own form still works: the session is untouched
        page.goto(f"/dashboard/fine-tuning/{job.id}")
        page.once("dialog", lambda d: d.accept())
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator("#job-status")).to_have_text("cancelled")
    finally:
        cancel_quietly(org, job.id)


def test_pages_fit_a_phone(browser: object, srv: RunningServer, org: dict) -> None:
    jobs = org["sdk"].fine_tuning.jobs.list().data
    curve = next(j for j in jobs if j.user_provided_suffix == "curve")
    p = sign_in(browser, srv, org["training"], viewport=(390, 844))
    try:
        for name, url in (("files", "/dashboard/files"), ("fine-tuning", "/dashboard/fine-tuning"),
                          ("fine-tuning-job", f"/dashboard/fine-tuning/{curve.id}")):
            p.goto(url)
            width = p.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], (name, width)  # no sideways scrolling of the page
            if name == "fine-tuning-job":  # the curve drawn for a narrow screen, whole
                narrow = p.locator("#loss-curve svg.narrow")
                expect(narrow).to_be_visible()
                expect(p.locator("#loss-curve svg.wide")).to_be_hidden()
                box = narrow.bounding_box()
                assert box is not None and box["width"] <= 390 and box["height"] > 200, box
                assert narrow.locator("polyline.line-a").count() == 1
            shot(p, f"phone-{name}")
    finally:
        p.context.close()
