"""Fine-tuned models are loaded like uploaded ones (issue 15, finding 5), through the real
server: listed at start without loading anything, loaded by their first request within
BASTION_CUSTOM_MODEL_MEMORY, the least recently used idle one unloaded to make room and one
serving a request never.

A fine-tuning job's result is made here the cheap way: the job's row as the worker leaves it
(succeeded, its artifact recorded) with a real artifact, a LoRA adapter for the bundled Gemma
written by the fine-tuning exporter (rank 1, zeros: it answers as the base does, which the test
checks) and a full fine-tune's whole GGUF (the base's own file). Training one for real takes
minutes (test_fine_tuning_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from conftest import (MODEL, RunningServer, bearer, make_tenant, models_cache, start_server,
                      stop_server)

GEMMA = "gemma-3-270m-q4_k_m.gguf"
ARGS = ("--parallel", "2", "--no-worker")


def lora_adapter(out: Path) -> Path:
    """A real GGUF LoRA adapter for Gemma 3 270M (640 wide, 4 query heads of 256, 18
    layers), written as a fine-tuning job writes one."""
    import numpy as np

    from bastion.finetune.export import write_lora_gguf

    out.mkdir(parents=True)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    return write_lora_gguf({f"{module}.lora_A.weight": np.zeros((1, 640), np.float32),
                            f"{module}.lora_B.weight": np.zeros((1024, 1), np.float32)},
                           arch="gemma3", n_layers=18, alpha=1.0, out=out / "adapter.gguf")


def add_job(srv: RunningServer, org: str, name: str, method: str, artifact: Path) -> None:
    """A succeeded job's row, as the worker records it."""
    from sqlalchemy import create_engine, insert

    from bastion.db.tables import FineTuningJob

    now = datetime.now(timezone.utc)
    engine = create_engine(srv.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(FineTuningJob).values(
                id=f"ftjob-{artifact.parent.name}", org_id=org, model=MODEL,
                base_path=str(srv.data_dir / "models" / GEMMA), training_file="file-none",
                method=method, hyperparameters={}, seed=1, status="succeeded",
                fine_tuned_model=name, trained_tokens=1, created_at=now, started_at=now,
                finished_at=now, attempts=1, artifact=str(artifact)))
    finally:
        engine.dispose()


def loads(srv: RunningServer, name: str) -> int:
    return srv.log().count(f"loading fine-tuned model {name} (about")


def listed(srv: RunningServer, key: str) -> dict[str, dict]:
    r = httpx.get(f"{srv.api}/models", headers=bearer(key), timeout=120)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def ask(srv: RunningServer, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{srv.api}/chat/completions", headers=bearer(key), timeout=120, json={
        "model": model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me about the moon."}]})


def profile(artifact: Path) -> dict:
    return json.loads(artifact.with_name(artifact.name + ".profile.json").read_text())


@pytest.mark.timeout(900)
def test_fine_tuned_models_load_lazily_within_the_memory_budget(tmp_path: Path) -> None:
    data = tmp_path / "data"
    jobs = data / "jobs"
    lora = lora_adapter(jobs / "lazy1")
    (jobs / "lazy2").mkdir()
    full = jobs / "lazy2" / "model.gguf"
    os.symlink(models_cache() / GEMMA, full)

    # a replica serving the base: the fine-tunes it finds are listed from their base's
    # profile, their memory read from the GGUF, and nothing is loaded until asked for
    first = start_server(tmp_path, *ARGS, data_dir=data)
    try:
        org, created = make_tenant(first.api, "scale", permissions=("inference",), name="ft")
        key = created["key"]
        ft1, ft2 = f"ft:{MODEL}:{org}:lazy:aaaa1111", f"ft:{MODEL}:{org}:full:bbbb2222"
        add_job(first, org, ft1, "supervised", lora)
        add_job(first, org, ft2, "full", full)
        models = listed(first, key)
        assert {ft1, ft2} <= set(models)
        for name in (ft1, ft2):
            assert models[name]["context_length"] == models[MODEL]["context_length"]
            assert "chat" in models[name]["capabilities"]
        assert loads(first, ft1) == 0 and loads(first, ft2) == 0
        derived = profile(lora)
        r = ask(first, key, ft1)
        assert r.status_code == 200, r.text
        assert loads(first, ft1) == 1
        # a zero adapter answers as its base does, and the profile the load learnt is the
        # one derived without loading
        assert r.json()["choices"][0]["message"] == ask(first, key, MODEL).json()["choices"][0]["message"]
        assert profile(lora) == derived
    finally:
        stop_server(first)
    cost1, cost2 = profile(lora)["cost"], profile(full)["cost"]
    assert cost1 > cost2 > 250 * 2 ** 20  # the adapter on top of the base's weights and KV

    # restarted without the base, with room for one of the two: listed, not loaded; loaded
    # on request, the idle one unloaded to make room, the busy one never
    srv = start_server(tmp_path, "--no-bundled", *ARGS, data_dir=data,
                       env={"BASTION_CUSTOM_MODEL_MEMORY": str(cost1 + cost2 - 1)})
    try:
        models = listed(srv, key)
        assert {ft1, ft2} <= set(models) and MODEL not in models
        assert loads(srv, ft1) == 0 and loads(srv, ft2) == 0
        r = ask(srv, key, ft1)
        assert r.status_code == 200, r.text
        assert loads(srv, ft1) == 1

        async def busy_then_other() -> tuple[int, dict, str]:
            async with httpx.AsyncClient(base_url=srv.api, headers=bearer(key),
                                         timeout=300) as client:
                body = {"model": ft2, "prompt": "Once upon a time", "max_tokens": 200,
                        "stream": True, "temperature": 1.0, "seed": 3}
                async with client.stream("POST", "/completions", json=body) as stream:
                    assert stream.status_code == 200
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: {"):
                            break
                    # ft2 is generating: ft1 cannot have its memory, and ft2 stays
                    other = await client.post("/chat/completions", json={
                        "model": ft1, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "Hi"}]})
                    rest = [line async for line in lines]
                return other.status_code, other.json(), "\n".join(rest)

        time.sleep(1.5)  # past the grace after a request: ft1 is idle
        status, body, rest = asyncio.run(busy_then_other())
        assert f"unloading fine-tuned model {ft1} to make room for {ft2}" in srv.log()
        assert status == 503, body
        assert body["error"]["code"] == "model_overloaded"
        assert rest.rstrip().endswith("data: [DONE]")
        assert f"unloading fine-tuned model {ft2}" not in srv.log()
        time.sleep(1.5)
        r = ask(srv, key, ft1)
        assert r.status_code == 200, r.text
        assert f"unloading fine-tuned model {ft2} to make room for {ft1}" in srv.log()
        assert loads(srv, ft1) == 2 and loads(srv, ft2) == 1

        # a fine-tune this replica cannot profile from its base (not served here) is loaded
        # once to learn it, then served lazily like the others
        lora3 = lora_adapter(jobs / "lazy3")
        ft3 = f"ft:{MODEL}:{org}:third:cccc3333"
        add_job(srv, org, ft3, "supervised", lora3)
        time.sleep(1.5)
        assert ft3 in listed(srv, key)
        assert loads(srv, ft3) == 1 and profile(lora3)["cost"] == cost1
        assert ask(srv, key, ft3).status_code == 200
        assert loads(srv, ft3) == 1
    finally:
        stop_server(srv)
