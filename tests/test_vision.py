"""Images through the real server and the openai SDK, on a real (tiny) multimodal GGUF pair:
Gemma 3 270M with a random-weight CLIP/LLaVA-mlp projector (tiny_vlm.py) as `tiny-vlm`, next
to the bundled Gemma 3 270M without one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import openai
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, models_cache, noise_image,
                      start_server, stop_server)
from tiny_vlm import IMAGE_TOKENS, write_mmproj

VLM = "tiny-vlm"


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("vision")
    mmproj = write_mmproj(tmp / "tiny-mmproj.gguf")
    srv = start_server(tmp, "--parallel", "4", "--threads", "2",
                       "--model", str(models_cache() / "gemma-3-270m-q4_k_m.gguf"),
                       "--mmproj", str(mmproj), "--alias", VLM)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def sdk(vlm_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=vlm_server.api, api_key=ADMIN_KEY, max_retries=0, timeout=120)


def messages(question: str, *images: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": question}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": parts}]


def chat(sdk: openai.OpenAI, msgs: list[dict[str, Any]], **kw: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = dict(model=VLM, messages=msgs, max_tokens=4, temperature=0)
    return sdk.chat.completions.create(**(args | kw))


def test_model_card_says_vision(sdk: openai.OpenAI) -> None:
    cards = {m.id: m.model_extra for m in sdk.models.list().data}
    assert "vision" in cards[VLM]["capabilities"] and "chat" in cards[VLM]["capabilities"]
    assert "vision" not in cards[MODEL]["capabilities"]


def test_image_costs_exactly_its_tokens(sdk: openai.OpenAI) -> None:
    with_image = chat(sdk, messages("What is in the picture?", noise_image(1)))
    text_only = chat(sdk, messages("What is in the picture?"))
    assert with_image.choices[0].finish_reason in ("stop", "length")
    assert with_image.usage.completion_tokens > 0
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS
    two = chat(sdk, messages("What is in the picture?", noise_image(1), noise_image(2)))
    assert two.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 * IMAGE_TOKENS


def test_the_model_sees_which_image(sdk: openai.OpenAI) -> None:
    """Same image, same greedy answer and logprobs; another image, another distribution."""
    def first_top(url: str) -> tuple[str, list[tuple[str, float]]]:
        r = chat(sdk, messages("What is it?", url), logprobs=True, top_logprobs=5)
        first = r.choices[0].logprobs.content[0]
        return r.choices[0].message.content, [(t.token, t.logprob) for t in first.top_logprobs]

    a, again, b = first_top(noise_image(1)), first_top(noise_image(1)), first_top(noise_image(2))
    assert a == again
    assert a[1] != b[1]


def test_stream_equals_non_stream_with_usage(sdk: openai.OpenAI) -> None:
    msgs = messages("Describe it.", noise_image(3))
    whole = chat(sdk, msgs, max_tokens=6)
    chunks = list(chat(sdk, msgs, max_tokens=6, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_copies_the_image_prompt(sdk: openai.OpenAI) -> None:
    """n > 1 copies the leader's KV cache, image included, into the other slots."""
    one = chat(sdk, messages("What is it?", noise_image(4)))
    three = chat(sdk, messages("What is it?", noise_image(4)), n=3)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content] * 3


def test_text_on_the_bundled_model_keeps_working_beside_images(
        sdk: openai.OpenAI, vlm_server: RunningServer) -> None:
    def text_job(i: int):  # type: ignore[no-untyped-def]
        return sdk.chat.completions.create(
            model=MODEL, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": f"Give me word number {i}."}])

    def image_job(i: int):  # type: ignore[no-untyped-def]
        return chat(sdk, messages("What is it?", noise_image(10 + i)), max_tokens=6)

    with ThreadPoolExecutor(max_workers=10) as pool:
        texts = [pool.submit(text_job, i) for i in range(6)]
        images = [pool.submit(image_job, i) for i in range(4)]
        text_results = [f.result() for f in texts]
        image_results = [f.result() for f in images]
    for r in text_results:
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    plain = chat(sdk, messages("What is it?")).usage.prompt_tokens
    for r in image_results:
        assert r.usage.prompt_tokens == plain + IMAGE_TOKENS
        assert r.choices[0].finish_reason in ("stop", "length")
    health = httpx.get(vlm_server.base_url + "/health",
                       headers=bearer(ADMIN_KEY)).json()["models"]
    assert all(m["running_sequences"] == 0 and m["waiting_requests"] == 0
               for m in health.values())


def test_bundled_model_still_refuses_images(vlm_server: RunningServer) -> None:
    r = httpx.post(vlm_server.api + "/chat/completions",
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"model": MODEL, "messages": messages("What?", noise_image(1))})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "model_not_supported"
    assert r.json()["error"]["param"] == "messages[1].content[1]"


def test_projector_of_another_model_stops_the_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A projector whose output width is not the model's must fail loudly at start, not
    serve a model that turns images into garbage or crashes on the first one."""
    wrong = write_mmproj(tmp_path / "wrong-mmproj.gguf", text_embd=64)
    with pytest.raises(RuntimeError) as exc:
        start_server(tmp_path, "--no-bundled", "--model",
                     str(models_cache() / "gemma-3-270m-q4_k_m.gguf"),
                     "--mmproj", str(wrong), "--alias", "broken")
    assert "could not load the multimodal projector" in str(exc.value)


def test_mmproj_without_its_model_is_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bastion.cli", "serve", "--data-dir", str(tmp_path),
                        "--mmproj", str(tmp_path / "p.gguf")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    said = " ".join(r.stderr.replace("│", " ").split())  # typer may draw a box and wrap
    assert "each --mmproj belongs to the --model at the same position" in said


def test_images_over_the_websocket(sdk: openai.OpenAI, vlm_server: RunningServer) -> None:
    """/v1/ws shares the chat path: the same image gives the same text and usage there."""
    import json

    from websockets.sync.client import connect

    msgs = messages("What is it?", noise_image(5))
    want = chat(sdk, msgs, max_tokens=5)
    with connect(vlm_server.base_url.replace("http://", "ws://") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert json.loads(ws.recv(timeout=30))["type"] == "authenticated"
        ws.send(json.dumps({"type": "inference", "model": VLM, "messages": msgs,
                            "max_tokens": 5, "temperature": 0}))
        text = ""
        while (m := json.loads(ws.recv(timeout=60)))["type"] == "token":
            text += m["content"]
    assert m["type"] == "done", m
    assert text == want.choices[0].message.content
    assert m["usage"]["prompt_tokens"] == want.usage.prompt_tokens
