"""Settings read from BASTION_* environment variables; built inside create_app, never at import."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ModelSpec(BaseModel):
    """One GGUF model to serve besides (or instead of) the bundled one."""

    path: Path
    id: str | None = None
    aliases: list[str] = Field(default_factory=list)
    chat_template: str | None = None  # name of a built-in template; default: the GGUF's own
    mmproj: Path | None = None  # multimodal projector GGUF: the model then takes images
    owned_by: str = "bastion"


class EmbeddingModelSpec(BaseModel):
    """A sentence-transformers model directory to serve for /v1/embeddings."""

    path: Path
    id: str | None = None
    aliases: list[str] = Field(default_factory=list)
    owned_by: str = "bastion"
    truncatable_dimensions: bool = False  # trained Matryoshka-style: `dimensions` may shorten


UpstreamCapability = Literal["chat", "completion", "embeddings", "vision"]


class UpstreamSpec(BaseModel):
    """A model served by other OpenAI-compatible servers (vLLM, TGI, llama.cpp server, Ollama,
    another Bastion): Bastion keeps auth, limits and the ledger; the replicas generate."""

    id: str = Field(min_length=1, max_length=256)  # the name Bastion's clients use
    urls: list[str] = Field(min_length=1, description="replica base URLs, e.g. http://gpu1:8000/v1")
    api_key: SecretStr | None = None  # sent upstream as a bearer token; never logged
    model: str | None = None  # the upstream's own name for it (default: id)
    aliases: list[str] = Field(default_factory=list)
    capabilities: list[UpstreamCapability] = Field(default_factory=lambda: ["chat", "completion"])
    context_length: int | None = Field(None, ge=16, description="default: the upstream's "
                                       "max_model_len from /models (vLLM), else 4096")
    tokenize: Literal["auto", "vllm", "none"] = Field("auto", description="how prompts are "
                                                      "counted at admission: the upstream's "
                                                      "vLLM-style /tokenize, or an upper bound")
    image_tokens: int = Field(2048, ge=1, description="admission's estimate for one image")
    owned_by: str = "upstream"
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(600.0, gt=0, description="longest wait for the next byte")
    health_interval: float = Field(10.0, gt=0, description="seconds between health checks")
    max_connections: int = Field(256, ge=1, description="per replica")
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest answer "
                                    "read from an upstream: a whole non-streamed body, or one "
                                    "event of a stream (a larger one fails the request)")

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"an upstream URL must start with http:// or https:// ({url!r})")
        return [u.rstrip("/") for u in urls]


class SettingsGroup(BaseModel):
    """One group of settings: a component is handed only the group it needs, not all of them."""

    @classmethod
    def of(cls, settings: BaseModel) -> Self:
        """This group's own model, taken from the flat `Settings` (or any model holding its
        fields), so a component can be handed just its group."""
        return cls.model_validate({name: getattr(settings, name) for name in cls.model_fields})


class ServerSettings(SettingsGroup):
    """Where the server listens, where its data lives, how it starts and stops."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".bastion")
    database_url: str | None = None
    admin_key: str | None = Field(None, min_length=24, description="the server "
                                  "administrator's key; a new value revokes the previous one "
                                  "at start. Stored as its hash only (no clear prefix)")
    drain_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = Field(True, description="one log line per request: method, path, "
                             "status, seconds, with its x-request-id")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object "
                                                "per log line, and a line per request")
    metrics_token: SecretStr | None = Field(None, min_length=16, description="a bearer token "
                                            "that may read /metrics (and nothing else), for "
                                            "Prometheus; the server admin's key may too")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bastion.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def uploads_dir(self) -> Path:
        """Models uploaded through POST /v1/models, one directory each."""
        return self.data_dir / "uploaded_models"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        """Checkpoints and exported models of fine-tuning jobs."""
        return self.data_dir / "fine_tuning"


DEFAULT_ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma-3-270m",
                   "all-minilm": "all-minilm-l6-v2"}


def parse_aliases(value: object) -> object:
    """`name=model,name=model` or a JSON object, as the environment or the CLI gives them;
    `name=` (or a JSON null) drops that name's default alias."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            out: dict[str, str] = {}
            for item in filter(None, (part.strip() for part in text.split(","))):
                name, sep, target = item.partition("=")
                if not sep or not name.strip():
                    raise ValueError(f"an alias is written name=model (got {item!r})")
                out[name.strip()] = target.strip()
            return out
    if isinstance(value, dict):
        return {k: "" if v is None else v for k, v in value.items()}
    return value


class CatalogSettings(SettingsGroup):
    """Which chat and completion models are served, and under which names."""

    serve_bundled_model: bool = True
    models: list[ModelSpec] = Field(default_factory=list)
    # added to DEFAULT_ALIASES (an empty target drops one): BASTION_ALIASES='a=m,b=m' or JSON
    aliases: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    upstreams: list[UpstreamSpec] = Field(default_factory=list)  # BASTION_UPSTREAMS as JSON
    model_lookup_interval: float = Field(2.0, ge=0, description="a request for a model this "
                                         "replica does not serve looks in the database for it "
                                         "at most this often per organisation and name")

    @field_validator("aliases", mode="before")
    @classmethod
    def _parse_aliases(cls, v: object) -> object:
        return parse_aliases(v)

    @property
    def all_aliases(self) -> dict[str, str]:
        """The defaults with the configured aliases added over them, dropped ones left out."""
        merged = {**DEFAULT_ALIASES, **self.aliases}
        return {name: target for name, target in merged.items() if target}


class EngineSettings(SettingsGroup):
    """The llama.cpp engine's continuous batching, the same for every GGUF model it loads."""

    parallel: int = Field(16, ge=1, le=256, description="sequences decoded together per model")
    context_per_sequence: int = Field(4096, ge=256, description="context window of one sequence")
    batch_tokens: int = Field(512, ge=32, description="tokens in one llama_decode batch; at least `parallel`")
    prefill_chunk: int = Field(64, ge=1, description="prompt tokens prefilled per decoding step, "
                               "over all requests: a burst of prompts is prefilled one after "
                               "another (first tokens sooner) and running streams keep going")
    threads: int | None = None
    prefix_cache: bool = Field(True, description="reuse the KV cache of a prompt's shared "
                               "prefix (same organisation only); false prefills every prompt")


class EmbeddingSettings(SettingsGroup):
    """The sentence-transformers embedding models and how their requests are batched."""

    serve_bundled_embeddings: bool = True
    embedding_models: list[EmbeddingModelSpec] = Field(default_factory=list)
    embedding_window_ms: float = Field(2.0, ge=0, le=1000, description="how long an idle "
                                       "embedding worker waits for more requests to batch")
    embedding_max_batch: int = Field(64, ge=1, le=4096, description="inputs per forward pass")


class RequestSettings(SettingsGroup):
    """Bounds on one request, over HTTP or the WebSocket."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 8
    default_max_tokens: int = 2048
    ws_auth_timeout: float = Field(10.0, gt=0, description="an unauthenticated socket is closed after this")
    ws_max_requests: int = Field(16, ge=1, description="generations one socket may run at once")


class LimitSettings(SettingsGroup):
    """Rate limits (admission) and where their counters live."""

    rate_limits: bool = True
    redis_url: str | None = None  # shared limits for several replicas, e.g. redis://host:6379/0
    slot_lease_seconds: float = Field(30.0, gt=0, description="a dead replica's slots free after this")
    token_window_seconds: int = Field(3600, ge=1, description="the tokens-per-hour window")


class ImageSettings(SettingsGroup):
    """Image parts of chat messages."""

    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(16_777_216, ge=1, description="larger images are refused "
                                  "from their header, before decompression")
    fetch_remote_images: bool = False  # https:// image URLs (public addresses only)
    remote_image_timeout: float = Field(10.0, gt=0)


class FileSettings(SettingsGroup):
    """Uploaded files and uploaded models."""

    max_file_bytes: int = Field(512 * 1024 * 1024, ge=1, description="largest uploaded file")
    max_model_bytes: int = Field(20 * 1024 ** 3, ge=1,
                                 description="largest model upload (all its parts together)")


class CustomModelSettings(SettingsGroup):
    """Organisations' uploaded models: how many and how much each organisation may keep (a
    plan may allow less, tenancy/plans.py), how much memory the loaded ones may take together,
    and how long a tenant's GGUF may take to be parsed at upload (in a process of its own)."""

    custom_models_per_org: int = Field(20, ge=0, description="uploaded models one "
                                       "organisation may keep")
    custom_model_bytes_per_org: int = Field(50 * 1024 ** 3, ge=0, description="bytes of "
                                            "uploaded models one organisation may keep")
    custom_model_memory: int = Field(8 * 1024 ** 3, ge=1, description="estimated memory all "
                                     "loaded uploaded and fine-tuned models may take "
                                     "together; loading one more unloads the least recently "
                                     "used idle ones")
    custom_model_idle_seconds: float = Field(1800.0, gt=0, description="an uploaded or "
                                             "fine-tuned model unused this long is unloaded "
                                             "(loaded again on its next request)")
    gguf_probe_seconds: float = Field(120.0, gt=0, description="longest parse of an uploaded "
                                      "GGUF (metadata, vocabulary, tensor index)")
    gguf_probe_memory: int = Field(2 * 1024 ** 3, ge=64 * 1024 ** 2, description="memory the "
                                   "parse may take beyond mapping the file")


def default_max_base_bytes() -> int:
    """A quarter of the physical memory (a worker on another machine: set it to a quarter of
    that machine's). 8 GiB where the memory cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 8 * 1024 ** 3


class FineTuneSettings(SettingsGroup):
    """Fine-tuning jobs and the worker that runs them."""

    fine_tune_max_tokens: int = Field(2048, ge=64, description="longest training example, in "
                                      "tokens (also capped by the base model's context)")
    worker: bool = Field(True, description="`bastion serve` also runs a fine-tuning worker")
    worker_lease_seconds: float = Field(60.0, gt=0, description="a job whose worker has not "
                                        "sent a heartbeat for this long is given to another")
    worker_poll_seconds: float = Field(2.0, gt=0, description="how often an idle worker looks "
                                       "for queued jobs")
    training_threads: int | None = Field(None, ge=1, description="torch threads for training "
                                         "(default: half the cores)")
    fine_tune_max_base_bytes: int = Field(
        default_factory=lambda: default_max_base_bytes(), ge=1,
        description="the largest base model a job may start from, as float32 weights (the "
        "trainer dequantises the GGUF to float32); default: a quarter of this machine's memory, "
        "as full fine-tuning holds the weights, their gradients and two Adam moments")


class DashboardSettings(SettingsGroup):
    """Dashboard sessions: signed with this secret (default: one generated into the data dir)."""

    session_secret: str | None = Field(None, min_length=32)
    session_hours: float = Field(8.0, gt=0, description="a dashboard sign-in lasts this long")
    secure_cookies: bool = Field(False, description="always mark the dashboard's cookies "
                                 "Secure (with the __Host- prefix), as behind a TLS proxy that "
                                 "talks plain HTTP to Bastion; otherwise only on https requests")


# Later bases come first in `model_fields`: listed bottom-up so the fields keep their old order.
class Settings(DashboardSettings, FineTuneSettings, CustomModelSettings, FileSettings,
               LimitSettings, ImageSettings, RequestSettings, EngineSettings,
               EmbeddingSettings, CatalogSettings, ServerSettings, BaseSettings):
    """Every group, read flat from BASTION_* environment variables (`settings.parallel`, not
    `settings.engine.parallel`): the variable names stay what they always were."""

    model_config = SettingsConfigDict(env_prefix="BASTION_", env_nested_delimiter="__")
