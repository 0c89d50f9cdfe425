"""`bastion jobs follow`: a progress bar with the loss per step, read from the job's events
over the HTTP API (so it works against any server, local or remote)."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bastion.finetune.states import FINISHED_JOB_STATES as FINISHED


def _events_since(client: httpx.Client, job_id: str, seen: set[str]) -> list[dict[str, Any]]:
    r = client.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 200})
    r.raise_for_status()
    new = [e for e in r.json()["data"] if e["id"] not in seen]
    seen.update(e["id"] for e in new)
    return new[::-1]


def _say(bar: Progress, text: str) -> None:
    """Plain text: model ids hold colons that rich would otherwise read as emoji codes."""
    bar.console.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)


def follow(base_url: str, api_key: str, job_id: str, poll: float = 1.0) -> str:
    """Print events and advance the bar until the job finishes; returns its final status."""
    seen: set[str] = set()
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=30,
                      headers={"Authorization": f"Bearer {api_key}"}) as client, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[steps]}"),
            TextColumn("{task.fields[loss]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task(job_id, total=None, loss="", steps="")
        while True:
            r = client.get(f"/fine_tuning/jobs/{job_id}")
            if r.status_code != 200:
                raise SystemExit(r.json()["error"]["message"])
            job = r.json()
            for e in _events_since(client, job_id, seen):
                data = e.get("data") or {}
                if e["type"] == "metrics" and "total_steps" in data:
                    loss = ", ".join(f"{k.replace('_', ' ')} {data[k]:.4f}"
                                     for k in ("train_loss", "valid_loss") if k in data)
                    bar.update(task, total=data["total_steps"], completed=data["step"], loss=loss,
                               steps=f"step {data['step']}/{data['total_steps']}")
                else:
                    stamp = time.strftime('%H:%M:%S', time.localtime(e['created_at']))
                    _say(bar, f"{stamp} {e['message']}")
            if job["status"] in FINISHED:
                _say(bar, f"{job_id}: {job['status']}"
                     + (f" -> {job['fine_tuned_model']}" if job["fine_tuned_model"] else ""))
                return str(job["status"])
            time.sleep(poll)
