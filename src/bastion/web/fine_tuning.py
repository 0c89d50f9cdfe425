"""Fine-tuning: the organisation's jobs, a form to start one, and each job's page with its loss
curve (SVG drawn here from the job's metrics events), events, error, cancel button and model.
Through services.fine_tuning, as /v1/fine_tuning/jobs reads and writes them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.responses import RedirectResponse, Response

from bastion.errors import InvalidRequestError, RateLimitError
from bastion.finetune.states import ACTIVE_JOB_STATES
from bastion.protocol.fine_tuning import JobCreate, JobEvent
from bastion.services import files, fine_tuning, models
from bastion.services.context import Services
from bastion.web.charts import Line, line_chart
from bastion.web.deps import CheckedForm, ServicesDep, TrainingViewer, Viewer
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 50
MAX_EVENTS = 10_000  # the most events.listing gives at once: a curve of 10,000 points


def jobs_page(request: Request, services: Services, viewer: Viewer, *, status: int = 200,
              error: str = "", form: FormData | None = None) -> Response:
    after = request.query_params.get("after") or None
    listed = fine_tuning.listing(services, viewer.principal, after=after, limit=PAGE_SIZE)
    bases = fine_tuning.base_models(services, viewer.principal)
    training, _ = files.listing(services, viewer.principal, purpose="fine-tune", limit=200)
    return render(request, "fine_tuning.html", status=status, page="fine-tuning",
                  jobs=listed.data, more=listed.has_more, after=after, bases=bases,
                  files=training, error=error, form=form)


@router.get("/dashboard/fine-tuning", include_in_schema=False)
def list_page(request: Request, viewer: TrainingViewer, services: ServicesDep) -> Response:
    return jobs_page(request, services, viewer)


def parse(form: FormData) -> JobCreate:
    """The form through the API's own request model: the same rules and messages."""
    def text(name: str) -> str | None:
        return str(form.get(name) or "").strip() or None

    epochs = text("n_epochs")
    hyper = {"n_epochs": int(epochs) if epochs and epochs.isdigit() else (epochs or "auto")}
    method = text("method") or "lora"
    return JobCreate(model=text("model") or "", training_file=text("training_file") or "",
                     validation_file=text("validation_file"), suffix=text("suffix"),
                     method={"type": method, method: {"hyperparameters": hyper}})  # type: ignore[arg-type]


def explain(exc: ValidationError) -> str:
    """The first problem, named by the form's label rather than the request body's path."""
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
    names = {"model": "Base model", "training_file": "Training file", "suffix": "Suffix",
             "validation_file": "Validation file", "n_epochs": "Epochs", "method": "Method",
             "type": "Method"}
    field = where[-1] if where else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{names.get(field, field or 'Form')}: {message}."


@router.post("/dashboard/fine-tuning", include_in_schema=False)
def create(request: Request, viewer: TrainingViewer, form: CheckedForm,
           services: ServicesDep) -> Response:
    try:
        body = parse(form)
    except ValidationError as exc:
        return jobs_page(request, services, viewer, status=400, error=explain(exc), form=form)
    try:
        job = fine_tuning.create(services, viewer.principal, body)
    except (InvalidRequestError, RateLimitError) as exc:  # why not: the file, the model, the cap
        return jobs_page(request, services, viewer, status=exc.status, error=exc.message,
                         form=form)
    return RedirectResponse(f"/dashboard/fine-tuning/{job.id}", status_code=303)


def curve(timeline: list[JobEvent]) -> tuple[Line, Line, list[dict[str, Any]]]:
    """Training and validation loss per step from the metrics events, oldest first. A step
    reported twice (a job resumed from a checkpoint) keeps its latest value."""
    by_step: dict[int, dict[str, Any]] = {}
    for e in timeline:
        data = e.data or {}
        if e.type == "metrics" and isinstance(data.get("step"), int):
            by_step.setdefault(data["step"], {}).update(data)
    steps = [by_step[k] for k in sorted(by_step)]
    train = [(m["step"], float(m["train_loss"])) for m in steps if "train_loss" in m]
    valid = [(m["step"], float(m["valid_loss"])) for m in steps if "valid_loss" in m]
    return (Line("training loss", "line-a", train),
            Line("validation loss", "line-b", valid, markers=True), steps)


@router.get("/dashboard/fine-tuning/{job_id}", include_in_schema=False)
def job_page(request: Request, job_id: str, viewer: TrainingViewer,
             services: ServicesDep) -> Response:
    job = fine_tuning.retrieve(services, viewer.principal, job_id)
    timeline = fine_tuning.list_events(services, viewer.principal, job_id, limit=MAX_EVENTS)
    newest_first, truncated = timeline.data, timeline.has_more
    train, valid, steps = curve(newest_first[::-1])
    total = max((m.get("total_steps") or 0 for m in steps), default=0)
    drawn = [line for line in (train, valid) if line.points]
    title = f"Loss per step of {job.id}"
    chart = [line_chart(drawn, title=title, x_name="step", y_name="loss", x_max=total or None),
             line_chart(drawn, title=title, x_name="step", y_name="loss", x_max=total or None,
                        width=600, height=420, font=24, x_ticks=5, css="narrow")
             ] if steps else None  # the stylesheet shows one: wide, or narrow on a phone
    ft = job.fine_tuned_model
    served = bool(ft) and models.served(services, viewer.principal, str(ft))
    return render(request, "fine_tuning_job.html", page="fine-tuning", job=job,
                  events=newest_first, truncated=truncated, chart=chart, train=train,
                  valid=valid, steps=steps, total_steps=total, served=served,
                  cancellable=job.status in ACTIVE_JOB_STATES,
                  cancelled=request.query_params.get("cancelled") == "1")


@router.post("/dashboard/fine-tuning/{job_id}/cancel", include_in_schema=False)
def cancel(request: Request, job_id: str, viewer: TrainingViewer, form: CheckedForm,
           services: ServicesDep) -> Response:
    """As POST /v1/fine_tuning/jobs/{id}/cancel: a job that has finished is a 409 page."""
    fine_tuning.cancel(services, viewer.principal, job_id)
    return RedirectResponse(f"/dashboard/fine-tuning/{job_id}?cancelled=1", status_code=303)
