"""Mounts the dashboard on the app: its pages, the playground's endpoint, its static files."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse, Response

from bastion.web import (audit, auth, files, fine_tuning, keys, models, orgs, overview,
                         playground, usage)
from bastion.web.render import HERE, PageRoute, make_templates

home = APIRouter(route_class=PageRoute)


@home.get("/dashboard", include_in_schema=False)
def dashboard_root() -> Response:
    return RedirectResponse("/dashboard/", status_code=308)


def install(app: FastAPI) -> None:
    app.state.web_templates = make_templates()
    for module in (auth, overview, keys, audit, usage, models, playground, orgs, fine_tuning,
                   files):
        app.include_router(module.router)
    app.include_router(playground.api)
    app.include_router(home)
    app.mount("/dashboard/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")
