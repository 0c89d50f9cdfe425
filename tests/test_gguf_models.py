"""Any GGUF file served by path: its own chat template (sandboxed), a named built-in one, and
fill-in-the-middle when the vocabulary has FIM tokens."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, models_cache, start_server, stop_server

TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
HOSTILE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
BOMB = "{{ 10 ** (10 ** 10) }}{% for i in range(10**5) %}{% for j in range(10**5) %}x{% endfor %}{% endfor %}"


def make_gguf(tmp: Path, name: str, *extra: str) -> Path:
    src = models_cache() / "gemma-3-270m-q4_k_m.gguf"
    out = tmp / name
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(out),
                    "--force", *extra], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    own = make_gguf(tmp, "own-template.gguf", "--chat-template", TEMPLATE,
                    "--special-token-by-id", "fim_pre", "67",
                    "--special-token-by-id", "fim_suf", "68",
                    "--special-token-by-id", "fim_mid", "69")
    hostile = make_gguf(tmp, "hostile.gguf", "--chat-template", HOSTILE)
    bomb = make_gguf(tmp, "bomb.gguf", "--chat-template", BOMB)
    srv = start_server(tmp, "--no-bundled", "--parallel", "2",
                       "--model", str(own), "--alias", "own-template", "--chat-template", "auto",
                       "--model", str(own), "--alias", "named-chatml", "--chat-template", "chatml",
                       "--model", str(hostile), "--alias", "hostile",
                       "--model", str(bomb), "--alias", "bomb")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def sdk(custom) -> openai.OpenAI:
    return openai.OpenAI(base_url=custom.api, api_key=ADMIN_KEY, max_retries=0)


def count(vocab, text: str) -> int:
    return len(vocab.tokenize(text.encode(), add_bos=True, special=True))


def test_models_by_path_are_listed(sdk: openai.OpenAI) -> None:
    assert sorted(m.id for m in sdk.models.list().data) == ["bomb", "hostile", "named-chatml",
                                                           "own-template"]


def test_gguf_template_is_used(sdk: openai.OpenAI, vocab) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = sdk.chat.completions.create(model="own-template", messages=msgs, max_tokens=2)
    rendered = ("<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi"
                "<end_of_turn>\n<start_of_turn>model\n")
    assert r.usage.prompt_tokens == count(vocab, rendered)


def test_named_template_overrides_gguf(sdk: openai.OpenAI, vocab) -> None:
    r = sdk.chat.completions.create(model="named-chatml", max_tokens=2,
                                    messages=[{"role": "user", "content": "Hi"}])
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert r.usage.prompt_tokens == count(vocab, rendered)


def test_hostile_gguf_template_is_sandboxed(custom) -> None:
    r = httpx.post(custom.api + "/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"model": "hostile", "messages": [{"role": "user", "content": "Hi"}]})
    # The operator's template is at fault, not the client: a model_error, and nothing ran.
    assert r.status_code == 500
    assert r.json() == {"error": {
        "message": "The model's chat template attempted an unsafe operation and was stopped by "
                   "the sandbox: access to attribute '__class__' of 'str' object is unsafe.",
        "type": "model_error", "code": "unsafe_chat_template", "param": None}}
    assert "Traceback" not in custom.log()


def test_template_bomb_fails_fast(custom) -> None:
    """A template that computes 10**(10**10) (which Jinja would once fold while compiling, so
    the server never started) and loops 10**10 times: the server is up, and each request is
    refused at once with the model's fault named."""
    for _ in range(2):
        started = time.monotonic()
        r = httpx.post(custom.api + "/chat/completions", timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"model": "bomb", "messages": [{"role": "user", "content": "Hi"}]})
        assert time.monotonic() - started < 3
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "model_error" and err["code"] == "unsafe_chat_template"
        assert "4096 bits" in err["message"]
    assert "Traceback" not in custom.log()


def test_suffix_uses_fim_tokens(sdk: openai.OpenAI, vocab) -> None:
    r = sdk.completions.create(model="own-template", prompt="def add(a, b):", suffix="\n    return c",
                               max_tokens=3, temperature=0)
    prefix = vocab.tokenize(b"def add(a, b):", add_bos=False, special=False)
    suffix = vocab.tokenize(b"\n    return c", add_bos=False, special=False)
    assert r.usage.prompt_tokens == 1 + 1 + len(prefix) + 1 + len(suffix) + 1
    assert r.usage.completion_tokens <= 3
