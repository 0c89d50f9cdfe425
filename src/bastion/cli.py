"""bastion serve | worker | migrate | keys | orgs | jobs (typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bastion.config import EmbeddingModelSpec, ModelSpec, Settings, UpstreamSpec, parse_aliases
from bastion.http.request_id import configure_logging

app = typer.Typer(help="Bastion: your own OpenAI-compatible AI platform.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
orgs_app = typer.Typer(help="Manage organisations.", no_args_is_help=True)
app.add_typer(orgs_app, name="orgs")
jobs_app = typer.Typer(help="Follow fine-tuning jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _template_name(templates: list[str], i: int) -> str | None:
    name = templates[i] if i < len(templates) else "auto"
    return None if name == "auto" else name


def _mmproj_path(paths: list[str], i: int) -> Path | None:
    name = paths[i] if i < len(paths) else "none"
    return None if name in ("", "none") else Path(name)


def _upstream(text: str) -> UpstreamSpec:
    """ID=URL[,URL...] (replicas of one model), or a JSON object with every field of
    UpstreamSpec (as in BASTION_UPSTREAMS). Prefer the environment for an api_key: a command
    line is visible to every user of the machine."""
    import json

    from pydantic import ValidationError

    try:
        if text.lstrip().startswith("{"):
            return UpstreamSpec.model_validate(json.loads(text))
        model_id, sep, urls = text.partition("=")
        if not sep:
            raise typer.BadParameter(f"--upstream takes ID=URL[,URL...] or a JSON object "
                                     f"(got {text!r})")
        return UpstreamSpec(id=model_id.strip(), urls=[u.strip() for u in urls.split(",")
                                                       if u.strip()])
    except (ValueError, ValidationError) as exc:
        raise typer.BadParameter(f"--upstream: {exc}") from None


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where the database and models live.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option(help="Extra GGUF file to serve (repeatable).")] = None,
    alias: Annotated[Optional[list[str]], typer.Option(help="NAME=MODEL: one more name for a served model, added to the default aliases (NAME= drops a default one); a bare NAME: the id of the --model at the same position (repeatable).")] = None,
    chat_template: Annotated[Optional[list[str]], typer.Option(help="Chat template for the --model at the same position: auto (the GGUF's own), gemma, chatml or llama3.")] = None,
    mmproj: Annotated[Optional[list[str]], typer.Option(help="Multimodal projector GGUF for the --model at the same position (its image input), or none.")] = None,
    no_bundled: Annotated[bool, typer.Option("--no-bundled", help="Do not serve the bundled chat models (SmolLM2 and Gemma).")] = False,
    embedding_model: Annotated[Optional[list[Path]], typer.Option(help="Extra sentence-transformers directory to serve for /v1/embeddings (repeatable; its id is the directory name).")] = None,
    no_bundled_embeddings: Annotated[bool, typer.Option("--no-bundled-embeddings", help="Do not serve the bundled all-MiniLM-L6-v2 embedding model.")] = False,
    upstream: Annotated[Optional[list[str]], typer.Option(help="A model that OpenAI-compatible servers serve (vLLM, llama.cpp server, another Bastion...): ID=URL[,URL...] for its replicas, or a JSON object of its settings (repeatable).")] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Do not start a fine-tuning worker beside the server (run `bastion worker` elsewhere).")] = False,
    parallel: Annotated[Optional[int], typer.Option(help="Sequences decoded together per model.")] = None,
    context: Annotated[Optional[int], typer.Option(help="Context window of each sequence.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for llama.cpp.")] = None,
) -> None:
    """Start the API server (the bundled Gemma GGUF is assembled into the data directory once)."""
    import faulthandler
    import signal

    from bastion.app import create_app
    from bastion.server import serve as run

    # `kill -USR1 <pid>` writes every thread's Python stack to the log: how an operator (or a
    # test run) finds out where a stuck server is, without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    settings = _settings(host=host, port=port, data_dir=data_dir, parallel=parallel,
                         context_per_sequence=context, threads=threads)
    if no_worker:
        settings.worker = False
    if no_bundled:
        settings.serve_bundled_model = False
    if no_bundled_embeddings:
        settings.serve_bundled_embeddings = False
    for path in embedding_model or []:
        settings.embedding_models.append(EmbeddingModelSpec(path=path))
    settings.upstreams.extend(_upstream(text) for text in upstream or [])
    # NAME=MODEL adds a server alias (NAME= drops a default one); a bare NAME is the id of
    # the --model at the same position
    aliases = [a for a in alias or [] if "=" not in a]
    try:
        settings.aliases.update(parse_aliases(",".join(a for a in alias or [] if "=" in a)))
    except ValueError as exc:
        raise typer.BadParameter(f"--alias: {exc}") from None
    templates = list(chat_template or [])
    projectors = list(mmproj or [])
    if len(projectors) > len(model or []):
        raise typer.BadParameter("each --mmproj belongs to the --model at the same position; "
                                 f"got {len(projectors)} --mmproj for {len(model or [])} --model")
    for i, path in enumerate(model or []):
        settings.models.append(ModelSpec(path=path, id=aliases[i] if i < len(aliases) else None,
                                         chat_template=_template_name(templates, i),
                                         mmproj=_mmproj_path(projectors, i)))
    configure_logging(settings.log_level, settings.log_format)
    print(f"Bastion on http://{settings.host}:{settings.port}/v1", flush=True)
    run(create_app(settings), settings.host, settings.port, settings.drain_timeout,
        settings.log_level)


@app.command()
def worker(data_dir: Annotated[Optional[Path], typer.Option(help="Where the database, files and models live.")] = None,
           threads: Annotated[Optional[int], typer.Option(help="CPU threads for training.")] = None) -> None:
    """Run a fine-tuning worker: claims queued jobs from the database and trains them."""
    import signal

    from bastion.finetune.worker import Worker

    settings = _settings(data_dir=data_dir, training_threads=threads)
    configure_logging(settings.log_level, settings.log_format)
    w = Worker(settings, _sessions(data_dir))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: w.stop.set())
    w.run_forever()


@app.command()
def migrate(data_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Create or upgrade the database schema."""
    _sessions(data_dir)
    typer.echo("database is up to date")


def _sessions(data_dir: Path | None):  # type: ignore[no-untyped-def]
    """The database of this data directory, migrated to the newest schema."""
    from bastion.db.session import make_engine, migrate as upgrade, session_factory

    settings = _settings(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    return session_factory(engine)


def _cli_principal(org_id: str):  # type: ignore[no-untyped-def]
    """The command line acts as the server administrator (it holds the database); the audit
    log names it `cli`, with the operating-system user and host it ran as."""
    from bastion.tenancy.audit import CLI
    from bastion.tenancy.keys import Principal

    return Principal(key_id=CLI, org_id=org_id, is_server_admin=True)


def _audit_origin() -> None:
    """From where, for the audit log: who ran the command, on which machine."""
    import getpass
    import socket

    from bastion.tenancy.audit import Origin, origin

    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container's numeric user)
        user = "unknown"
    origin.set(Origin(via="cli", user_agent=f"bastion-cli ({user}@{socket.gethostname()})"))


DataDir = Annotated[Optional[Path], typer.Option(help="Data directory (default ~/.bastion).")]


@orgs_app.command("create")
def orgs_create(name: Annotated[str, typer.Option()],
                plan: Annotated[str, typer.Option(help="spark, seed, scale or dedicated")] = "spark",
                data_dir: DataDir = None) -> None:
    """Create an organisation; prints its id."""
    from bastion.services.organizations import found
    from bastion.tenancy.plans import PLANS

    if plan not in PLANS:
        raise typer.BadParameter(f"unknown plan {plan!r}; plans: {', '.join(PLANS)}")
    _audit_origin()
    with _sessions(data_dir).begin() as session:
        org = found(session, _cli_principal(""), name, plan)
    typer.echo(org.id)


@orgs_app.command("list")
def orgs_list(data_dir: DataDir = None) -> None:
    """All organisations with their plans."""
    from sqlalchemy import select

    from bastion.db.tables import Organization

    with _sessions(data_dir).begin() as session:
        for org in session.scalars(select(Organization).order_by(Organization.created_at)):
            state = " (deleted)" if org.deleted_at else ""
            typer.echo(f"{org.id}\t{org.plan}\t{org.name}{state}")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option()] = "CLI key",
                org: Annotated[Optional[str], typer.Option(help="Organisation id (default: the first).")] = None,
                permissions: Annotated[str, typer.Option(help="Comma-separated: inference,training,models,admin")] = "inference,training,models,admin",
                rate_limit: Annotated[Optional[int], typer.Option(help="Requests per minute for this key.")] = None,
                data_dir: DataDir = None) -> None:
    """Create an API key; the key is printed once and never stored."""
    from pydantic import ValidationError

    from bastion.db.tables import Organization
    from bastion.protocol.keys import ApiKeyCreate
    from bastion.services.keys import issue
    from bastion.tenancy.keys import ALL_PERMISSIONS, default_org

    perms = [p.strip() for p in permissions.split(",") if p.strip()]
    unknown = [p for p in perms if p not in ALL_PERMISSIONS]
    if unknown or not perms:
        raise typer.BadParameter(f"unknown permissions {unknown}; choose from {', '.join(ALL_PERMISSIONS)}")
    if rate_limit is not None and not 1 <= rate_limit <= 1_000_000:
        raise typer.BadParameter("rate limit must be between 1 and 1000000 requests per minute")
    try:
        body = ApiKeyCreate(name=name, permissions=perms, rate_limit=rate_limit)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise typer.BadParameter(str(exc.errors()[0].get("msg", exc))) from None
    _audit_origin()
    with _sessions(data_dir).begin() as session:
        target = session.get(Organization, org) if org else default_org(session)
        if target is None or target.deleted_at is not None:
            raise typer.BadParameter(f"no organization {org!r}")
        _, raw = issue(session, _cli_principal(target.id), target.id, body)
    typer.echo(raw)


@keys_app.command("list")
def keys_list(org: Annotated[Optional[str], typer.Option()] = None, data_dir: DataDir = None) -> None:
    """Keys by prefix only (the full key is never stored)."""
    from sqlalchemy import select

    from bastion.db.tables import ApiKey

    with _sessions(data_dir).begin() as session:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if org:
            query = query.where(ApiKey.org_id == org)
        for k in session.scalars(query):
            state = "revoked" if k.revoked_at else "active"
            typer.echo(f"{k.id}\t{k.org_id}\t{k.prefix}…\t{','.join(k.permissions)}\t"
                       f"{k.rate_limit or '-'}\t{state}\t{k.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke a key; every replica refuses it from its next request on."""
    from bastion.db.tables import ApiKey
    from bastion.services.keys import withdraw

    _audit_origin()
    with _sessions(data_dir).begin() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise typer.BadParameter(f"no API key {key_id!r}")
        withdraw(session, _cli_principal(row.org_id), row.org_id, key_id)
    typer.echo(f"revoked {key_id}")


@keys_app.command("rotate-admin")
def keys_rotate_admin(data_dir: DataDir = None) -> None:
    """A new server-admin key, printed once; every previous one (the key printed at first
    start, an old BASTION_ADMIN_KEY) is revoked on every replica from its next request on.
    Unset BASTION_ADMIN_KEY afterwards, or set it to the new key."""
    import os

    from bastion.tenancy.keys import rotate_server_admin

    with _sessions(data_dir).begin() as session:
        row, raw = rotate_server_admin(session)
        key_id = row.id
    if os.environ.get("BASTION_ADMIN_KEY"):
        typer.echo("note: BASTION_ADMIN_KEY is set here; its old value is now revoked, so "
                   "set it to the key below (or unset it) before the next start", err=True)
    typer.echo(f"new server-admin key {key_id}:", err=True)
    typer.echo(raw)


@keys_app.command("revoke-admin")
def keys_revoke_admin(data_dir: DataDir = None) -> None:
    """Revoke every server-admin key now (e.g. a leaked one) without making a new one: the
    next start makes and prints a fresh key, or adopts BASTION_ADMIN_KEY if it is set to a
    value never used before."""
    from bastion.tenancy.keys import revoke_server_admins

    with _sessions(data_dir).begin() as session:
        ids = [row.id for row in revoke_server_admins(session)]
    typer.echo(f"revoked {len(ids)} server-admin key(s): {', '.join(ids) or '-'}")


@jobs_app.command("follow")
def jobs_follow(job_id: str,
                base_url: Annotated[str, typer.Option(envvar="BASTION_BASE_URL", help="The server's API root.")] = "http://127.0.0.1:8000/v1",
                api_key: Annotated[str, typer.Option(envvar="BASTION_API_KEY", help="A key with the 'training' permission.")] = "") -> None:
    """Show a fine-tuning job's progress (loss per step) until it finishes."""
    from bastion.finetune.follow import follow

    if not api_key:
        raise typer.BadParameter("give --api-key or set BASTION_API_KEY")
    status = follow(base_url, api_key, job_id)
    raise typer.Exit(0 if status == "succeeded" else 1)


if __name__ == "__main__":
    app()
