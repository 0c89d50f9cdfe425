"""A real Bastion server on a free loopback port, driven like users drive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from polling import poll

ADMIN_KEY = "sk-bst-test-admin-key-0123456789"
MODEL = "gemma-3-270m"
# BASTION_TEST_DB=postgres runs the servers on PostgreSQL (`make test` does so in a second pass
# where PostgreSQL is installed); the default is SQLite in each data directory.
DB_BACKEND = os.environ.get("BASTION_TEST_DB", "sqlite")
_postgres: dict[str, object] = {}
# The PostgreSQL pass runs the modules whose outcome can depend on the database: keys,
# organisations, plans, the ledger and limits, files, jobs and their claiming, stored models,
# responses and idempotent answers, sessions, migrations. The rest (generation, sampling,
# protocol shapes) runs the same SQL either way and is not run twice.
POSTGRES_MODULES = frozenset({
    "test_auth", "test_tenancy", "test_usage", "test_ratelimit", "test_redis_limits",
    "test_files", "test_fine_tuning", "test_fine_tuning_worker", "test_fine_tuning_limits",
    "test_custom_models",
    "test_dashboard", "test_dashboard_finetune", "test_dashboard_models", "test_hardening",
    "test_responses", "test_startup", "test_models", "test_lifecycle", "test_metrics",
    "test_audit_log", "test_upload_quotas",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DB_BACKEND != "postgres":
        return
    kept = [i for i in items if i.module is not None and i.module.__name__ in POSTGRES_MODULES]
    config.hook.pytest_deselected(items=[i for i in items if i not in kept])
    items[:] = kept


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    log_path: Path
    database_url: str = ""

    @property
    def api(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models_cache() -> Path:
    """Assemble the bundled GGUF once per test run and share it between servers."""
    from bastion.models.bundled import bundled_gguf

    cache = Path(os.environ.get("BASTION_TEST_MODELS", Path.home() / ".cache" / "bastion-test"))
    bundled_gguf(cache)
    return cache


def start_server(tmp: Path, *args: str, env: dict[str, str | None] | None = None,
                 data_dir: Path | None = None, embeddings: bool = False,
                 start_timeout: float = 120) -> RunningServer:
    """A server on a free port; replicas of one deployment pass the same data_dir. Only the
    servers that test embeddings load the embedding model (PyTorch adds seconds to a start).
    An `env` value of None unsets that variable (BASTION_ADMIN_KEY=None: a generated key)."""
    port = free_port()
    data_dir = data_dir or tmp / f"data-{port}"
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    cached = models_cache() / "gemma-3-270m-q4_k_m.gguf"
    if not (data_dir / "models" / cached.name).exists():
        os.symlink(cached, data_dir / "models" / cached.name)
    log_path = tmp / f"server-{port}.log"
    database_url = (postgres_database(data_dir) if DB_BACKEND == "postgres"
                    else f"sqlite:///{data_dir / 'bastion.db'}")
    merged = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY,
              "BASTION_DATABASE_URL": database_url, **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}  # None: leave it unset
    cmd = [sys.executable, "-m", "bastion.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir), *args,
           *([] if embeddings else ["--no-bundled-embeddings"])]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", data_dir, log_path, database_url)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            return httpx.get(server.base_url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if poll(healthy, timeout=start_timeout, interval=0.2):
        return server
    stop_server(server)
    raise RuntimeError(f"server did not start:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    """Stop the server, then fail the test if it ever logged a traceback: nothing a client
    sends may crash a request, and no test expects one."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-4000:]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(tmp_path_factory.mktemp("server"), "--parallel", "16", embeddings=True)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def bounded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The server that schema fuzzing (test_fuzz.py) and the hostile-input corpus
    (test_hostile_inputs.py) throw arbitrary requests at, started once for both: whatever slips
    through to generation makes at most 4 tokens, and no worker runs jobs the fuzzer creates."""
    srv = start_server(tmp_path_factory.mktemp("bounded"), "--parallel", "4", "--no-worker",
                       env={"BASTION_DEFAULT_MAX_TOKENS": "4"}, embeddings=True,
                       start_timeout=300)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=ADMIN_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def vocab():
    """An independent tokenizer: llama-cpp-python's high-level Llama, vocabulary only."""
    import llama_cpp

    return llama_cpp.Llama(str(models_cache() / "gemma-3-270m-q4_k_m.gguf"), vocab_only=True,
                           verbose=False)


def bearer(key: str) -> dict[str, str]:
    """The Authorization header of one API key."""
    return {"Authorization": f"Bearer {key}"}


def make_tenant(api: str, plan: str = "seed", *, limits: dict | None = None,
                permissions: tuple[str, ...] = ("inference",), rate_limit: int | None = None,
                name: str = "tenant") -> tuple[str, dict]:
    """A new organisation (made by the server admin) and one key in it: (org id, key object)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    org = httpx.post(f"{api}/organizations", headers=admin,
                     json={"name": name, "plan": plan}).json()["id"]
    if limits:
        r = httpx.patch(f"{api}/organizations/{org}", headers=admin, json={"limits": limits})
        assert r.status_code == 200, r.text
    key = httpx.post(f"{api}/organizations/{org}/api-keys", headers=admin,
                     json={"name": name, "permissions": list(permissions),
                           "rate_limit": rate_limit}).json()
    return org, key


def postgres_database(data_dir: Path) -> str:
    """A database of its own for each data directory (replicas share one), on one PostgreSQL
    server that this test run starts and stops itself."""
    import atexit
    import glob
    import hashlib
    import shutil
    import tempfile

    import psycopg

    if "url" not in _postgres:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        pg_bin = bins[-1] if bins else str(Path(shutil.which("initdb") or "initdb").parent)
        root = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
        port = free_port()
        as_postgres = ["su", "postgres", "-s", "/bin/sh", "-c"] if os.geteuid() == 0 else ["sh", "-c"]
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        subprocess.run([*as_postgres, f"{pg_bin}/initdb -D {root}/data -A trust -U postgres"],
                       check=True, capture_output=True)
        subprocess.run([*as_postgres, f"{pg_bin}/pg_ctl -D {root}/data -l {root}/log -w start "
                        f"-o '-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off'"],
                       check=True, capture_output=True)
        atexit.register(subprocess.run, [*as_postgres, f"{pg_bin}/pg_ctl -D {root}/data -m fast "
                                         f"stop"], capture_output=True)
        _postgres["url"] = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    name = "bastion_" + hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    url = str(_postgres["url"])
    with psycopg.connect(url.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{url}/{name}"


def database_rows(server: RunningServer, table: str) -> list[dict]:
    """Every row of one table of the server's database, whichever database it is."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table}"))]
    finally:
        engine.dispose()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 16),
                color: tuple[int, int, int] = (200, 30, 30), frames: int = 1) -> bytes:
    """A real image made with Pillow (animated when frames > 1, for GIF and WebP)."""
    import io

    from PIL import Image

    images = [Image.new("RGB", size, tuple((c + 60 * k) % 256 for c in color))
              for k in range(frames)]
    out = io.BytesIO()
    extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    images[0].save(out, format=fmt, **extra)
    return out.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> str:
    """A data: URI of a random-pixel image (not square, not 32 px: llama.cpp resizes it), the
    same pixels for the same seed; JPEG is written at quality 90."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    extra = {"quality": 90} if fmt == "JPEG" else {}
    Image.fromarray(pixels, "RGB").save(out, format=fmt, **extra)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


def png_data_uri(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30),
                 fmt: str = "PNG", mime: str = "image/png", frames: int = 1) -> str:
    import base64

    data = image_bytes(fmt, size, color, frames)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
