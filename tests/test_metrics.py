"""GET /metrics and GET /ready against a real server: after real chat, completion, embedding and
fine-tuning requests and a rate-limit refusal, the Prometheus text parses and its counters equal
what the responses reported; only the server admin's key or the metrics token may read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, free_port, make_tenant,
                      start_server, stop_server)
from ftdata import duck_examples, write_jsonl
from polling import poll

EMBED = "all-minilm-l6-v2"
TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("metrics"), "--parallel", "4", "--no-worker",
                     embeddings=True, env={"BASTION_METRICS_TOKEN": TOKEN})
    yield s
    stop_server(s)


def scrape(srv: RunningServer, key: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}, parsed by prometheus_client."""
    r = httpx.get(srv.base_url + "/metrics", headers=bearer(key), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def traffic(srv: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real requests of every kind; what their responses reported, per model."""
    sdk = openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    prompt = {MODEL: 0, EMBED: 0}
    completion = cached = 0
    chat = sdk.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello."}])
    prompt[MODEL] += chat.usage.prompt_tokens
    completion += chat.usage.completion_tokens
    cached += chat.usage.prompt_tokens_details.cached_tokens
    stream = sdk.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "Count to 3."}])
    usage = [c.usage for c in stream if c.usage is not None][-1]
    prompt[MODEL] += usage.prompt_tokens
    completion += usage.completion_tokens
    cached += usage.prompt_tokens_details.cached_tokens
    legacy = sdk.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, n=2,
                                    temperature=0.7, seed=1)
    prompt[MODEL] += legacy.usage.prompt_tokens
    completion += legacy.usage.completion_tokens
    cached += legacy.usage.prompt_tokens_details.cached_tokens
    emb = sdk.embeddings.create(model=EMBED, input=["one", "two words", "three more words"])
    prompt[EMBED] += emb.usage.prompt_tokens

    # a tenant whose key may make one request a minute: its second is refused
    _, key = make_tenant(srv.api, rate_limit=1, name="metered")
    tenant = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=120)
    first = tenant.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    prompt[MODEL] += first.usage.prompt_tokens
    completion += first.usage.completion_tokens
    cached += first.usage.prompt_tokens_details.cached_tokens
    with pytest.raises(openai.RateLimitError) as refused:
        tenant.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi again"}])
    assert refused.value.code == "requests_per_minute_exceeded"

    # a fine-tuning job (no worker runs: it stays queued)
    _, trainer = make_tenant(srv.api, permissions=("training",), name="ducks")
    ft = openai.OpenAI(base_url=srv.api, api_key=trainer["key"], max_retries=0)
    path = write_jsonl(tmp_path_factory.mktemp("ft") / "t.jsonl", duck_examples(12))
    f = ft.files.create(file=open(path, "rb"), purpose="fine-tune")
    job = ft.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    assert cached > 0  # chat turns share the template's opening tokens: the prefix cache
    return {"prompt": prompt, "completion": completion, "cached": cached,
            "job_status": job.status,
            "generations": 4, "inputs": 3}


def test_ready_on_a_healthy_server(srv: RunningServer) -> None:
    r = httpx.get(srv.base_url + "/ready")  # no key: probes cannot send one
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["accepting"] == {"ok": True}
    assert {MODEL, EMBED} <= set(body["checks"]["models"]["loaded"])
    assert "redis" not in body["checks"]  # not configured
    assert httpx.get(srv.base_url + "/health").json()["status"] == "ok"  # liveness unchanged


def test_ready_says_which_check_failed(tmp_path: Path) -> None:
    """Redis configured but not answering (nothing listens on its port): 503 naming it."""
    s = start_server(tmp_path, "--parallel", "1", "--no-worker",
                     env={"BASTION_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    try:
        r = httpx.get(s.base_url + "/ready", timeout=30)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "not_ready" and body["failed"] == ["redis"]
        assert body["checks"]["redis"]["ok"] is False and body["checks"]["redis"]["error"]
        assert body["checks"]["database"] == {"ok": True}
    finally:
        stop_server(s)


def test_metrics_needs_the_server_admin_or_the_metrics_token(srv: RunningServer) -> None:
    url = srv.base_url + "/metrics"
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(url, headers=bearer("not-the-token-0123456789")).status_code == 401
    _, org_admin = make_tenant(srv.api, permissions=("admin",), name="org-admin")
    r = httpx.get(url, headers=bearer(org_admin["key"]))  # an organisation's admin: a tenant
    assert r.status_code == 403 and r.json()["error"]["type"] == "authorization_error"
    assert httpx.get(url, headers=bearer(TOKEN)).status_code == 200
    assert httpx.get(url, headers=bearer(ADMIN_KEY)).status_code == 200


def test_counters_match_the_responses(srv: RunningServer, traffic: dict) -> None:
    by_token, by_admin = scrape(srv, TOKEN), scrape(srv, ADMIN_KEY)
    for m in (by_token, by_admin):
        assert value(m, "vllm:prompt_tokens_total", model_name=MODEL) == traffic["prompt"][MODEL]
        assert value(m, "vllm:prompt_tokens_total", model_name=EMBED) == traffic["prompt"][EMBED]
        assert value(m, "vllm:generation_tokens_total", model_name=MODEL) == traffic["completion"]
        assert value(m, "vllm:prefix_cache_queries_total",
                     model_name=MODEL) == traffic["prompt"][MODEL]
        assert value(m, "vllm:prefix_cache_hits_total", model_name=MODEL) == traffic["cached"]
    m = by_admin
    assert value(m, "bastion_model_requests_total", model_name=MODEL,
                 endpoint="/v1/chat/completions", status="ok") == 3
    assert value(m, "bastion_model_requests_total", model_name=MODEL,
                 endpoint="/v1/completions", status="ok") == 1
    assert value(m, "bastion_admission_refusals_total", reason="requests_per_minute_exceeded") == 1
    post = {"method": "POST", "route": "/v1/chat/completions"}
    assert value(m, "bastion_http_requests_total", status="200", **post) == 3
    assert value(m, "bastion_http_requests_total", status="429", **post) == 1
    assert value(m, "bastion_http_request_duration_seconds_count", status="200", **post) == 3
    assert value(m, "bastion_http_requests_total", method="POST", route="/v1/embeddings",
                 status="200") == 1


def test_latency_histograms_per_model(srv: RunningServer, traffic: dict) -> None:
    m = scrape(srv, ADMIN_KEY)
    n = traffic["generations"]
    for name in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds"):
        assert value(m, name + "_count", model_name=MODEL) == n, name
        assert value(m, name + "_sum", model_name=MODEL) > 0, name
        assert value(m, name + "_bucket", model_name=MODEL, le="+Inf") == n, name
    assert value(m, "vllm:e2e_request_latency_seconds_count", model_name=MODEL) == n
    assert value(m, "vllm:e2e_request_latency_seconds_count", model_name=EMBED) == 1
    # an embedding has no first token
    assert ("vllm:time_to_first_token_seconds_count", (("model_name", EMBED),)) not in m
    # the time to the first token is part of the whole request's
    assert value(m, "vllm:time_to_first_token_seconds_sum", model_name=MODEL) < \
        value(m, "vllm:e2e_request_latency_seconds_sum", model_name=MODEL)


def test_server_state_read_at_scrape_time(srv: RunningServer, traffic: dict) -> None:
    m = scrape(srv, ADMIN_KEY)
    assert value(m, "vllm:num_requests_running", model_name=MODEL) == 0  # all finished
    assert value(m, "vllm:num_requests_waiting", model_name=MODEL) == 0
    assert value(m, "bastion_engine_sequence_slots", model_name=MODEL) == 4  # --parallel 4
    assert value(m, "vllm:num_requests_waiting", model_name=EMBED) == 0
    # the three inputs went through the embedding model's forward passes, however batched
    assert value(m, "bastion_embedding_batch_size_sum", model_name=EMBED) == traffic["inputs"]
    assert value(m, "bastion_embedding_inputs_total", model_name=EMBED) == traffic["inputs"]
    passes = value(m, "bastion_embedding_forward_passes_total", model_name=EMBED)
    assert value(m, "bastion_embedding_batch_size_count", model_name=EMBED) == passes >= 1
    assert value(m, "bastion_usage_ledger_queue_depth") >= 0
    assert value(m, "bastion_fine_tuning_jobs", status=traffic["job_status"]) == 1
    assert value(m, "bastion_fine_tuning_jobs", status="succeeded") == 0


def test_the_grafana_dashboard_reads_metrics_the_server_exports(srv: RunningServer,
                                                                traffic: dict) -> None:
    """Every metric deploy/grafana/bastion.json queries is one /metrics declares."""
    import json
    import re

    r = httpx.get(srv.base_url + "/metrics", headers=bearer(ADMIN_KEY))
    declared = {f.name for f in text_string_to_metric_families(r.text)}
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" /
                            "bastion.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {re.sub(r"_(bucket|sum|count|total)$", "", name)
               for e in exprs for name in re.findall(r"\b(?:vllm:|bastion_)[a-z0-9_:]+", e)}
    assert len(queried) >= 12
    assert queried <= declared, queried - declared


def test_requests_slots_and_sockets_in_flight(srv: RunningServer) -> None:
    """What the soak (bench/soak.py) checks once its clients have left: the gauges of requests
    in flight, concurrency slots held and open WebSockets count a running generation and its
    socket, and are back to 0 after the socket closes mid-generation. SmolLM2 and the
    WebSocket, so that the other tests' counters (Gemma, HTTP) stay as they were."""
    smol = "smollm2-135m-instruct"
    _, key = make_tenant(srv.api, name="gauges")  # seed: concurrency is limited, so counted
    names = ("bastion_requests_in_flight", "bastion_concurrency_slots_held",
             "bastion_websocket_connections")

    def gauges() -> dict[str, float]:
        m = scrape(srv, ADMIN_KEY)
        return {**{n: value(m, n) for n in names},
                "running": value(m, "vllm:num_requests_running", model_name=smol)}

    assert gauges() == dict.fromkeys([*names, "running"], 0)
    with connect(srv.base_url.replace("http://", "ws://") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "auth", "api_key": key["key"]}))
        assert json.loads(ws.recv(timeout=60))["type"] == "authenticated"
        authenticated = gauges()
        ws.send(json.dumps({"type": "inference", "id": "long", "model": smol, "max_tokens": 400,
                            "temperature": 0, "messages": [{"role": "user", "content":
                                "Count from 1 to 500, separated by commas."}]}))
        first = json.loads(ws.recv(timeout=120))
        assert first["type"] == "token", first
        running = gauges()
    assert authenticated == {**dict.fromkeys(names, 0), "running": 0,
                             "bastion_websocket_connections": 1}
    assert running == {**dict.fromkeys(names, 1), "running": 1}
    # closed mid-generation: the generation is cancelled, and what it held is given back
    idle = poll(gauges, lambda g: not any(g.values()), timeout=60)
    assert idle == dict.fromkeys([*names, "running"], 0)
