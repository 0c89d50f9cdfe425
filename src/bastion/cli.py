"""bastion serve | migrate | keys | models (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from bastion.config import ModelSpec, Settings

app = typer.Typer(help="Bastion: your own OpenAI-compatible AI platform.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _template_name(templates: list[str], i: int) -> str | None:
    name = templates[i] if i < len(templates) else "auto"
    return None if name == "auto" else name


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where the database and models live.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option(help="Extra GGUF file to serve (repeatable).")] = None,
    alias: Annotated[Optional[list[str]], typer.Option(help="Model id for the --model at the same position.")] = None,
    chat_template: Annotated[Optional[list[str]], typer.Option(help="Chat template for the --model at the same position: auto (the GGUF's own), gemma, chatml or llama3.")] = None,
    no_bundled: Annotated[bool, typer.Option("--no-bundled", help="Do not serve the bundled Gemma model.")] = False,
    parallel: Annotated[Optional[int], typer.Option(help="Sequences decoded together per model.")] = None,
    context: Annotated[Optional[int], typer.Option(help="Context window of each sequence.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for llama.cpp.")] = None,
) -> None:
    """Start the API server (the bundled model is assembled into the data directory once)."""
    from bastion.app import create_app
    from bastion.server import serve as run

    settings = _settings(host=host, port=port, data_dir=data_dir, parallel=parallel,
                         context_per_sequence=context, threads=threads)
    if no_bundled:
        settings.serve_bundled_model = False
    aliases = list(alias or [])
    templates = list(chat_template or [])
    for i, path in enumerate(model or []):
        settings.models.append(ModelSpec(path=path, id=aliases[i] if i < len(aliases) else None,
                                         chat_template=_template_name(templates, i)))
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"Bastion on http://{settings.host}:{settings.port}/v1", flush=True)
    run(create_app(settings), settings.host, settings.port, settings.drain_timeout,
        settings.log_level)


@app.command()
def migrate(data_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Create or upgrade the database schema."""
    from bastion.db.session import make_engine, migrate as upgrade

    settings = _settings(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(make_engine(settings.resolved_database_url))
    typer.echo("database is up to date")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option()] = "CLI key",
                data_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Create an API key in the default organisation with every permission; shown once."""
    from bastion.db.session import make_engine, migrate as upgrade, session_factory
    from bastion.tenancy.keys import ALL_PERMISSIONS, create_key, default_org

    settings = _settings(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    with session_factory(engine).begin() as session:
        _, raw = create_key(session, default_org(session).id, name,
                            permissions=list(ALL_PERMISSIONS))
    typer.echo(raw)


if __name__ == "__main__":
    app()
