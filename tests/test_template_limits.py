"""A chat template (a tenant's GGUF brings its own) cannot spend the machine: huge values,
huge numbers, long silent loops and huge output all fail fast, at load and at request time.
Tested on the ChatTemplate class; test_gguf_models.py drives a bomb through the server."""

from __future__ import annotations

import time

import pytest

from bastion.engines.base import ModelFailure
from bastion.engines.llamacpp.templates import BUILTIN_TEMPLATES, ChatTemplate, TemplateRenderError

MESSAGES = [{"role": "user", "content": "Hi"}]

BOMBS = {
    "nested-loops": "{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}"
                    "{% endfor %}",
    "silent-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "string-repeat": "{{ 'x' * 10**9 }}",
    "list-repeat": "{{ ([1] * 10**8) | length }}",
    # Jinja's ** is left-associative: 10**10**10 is (10**10)**10, harmless; this is the tower
    "power-tower": "{{ 10 ** (10 ** 10) }}",
    "power": "{{ 7 ** 10000000 }}",
    "doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}"
                "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
    "squaring": "{% set ns = namespace(n=10) %}{% for i in range(64) %}"
                "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
    "center-filter": "{{ 'x' | center(10**9) }}",
    "ljust-method": "{{ 'x'.ljust(10**9) }}",
    "format-width": "{{ '%999999999d' % 1 }}",
    "output-flood": "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_bomb_fails_fast_at_load_and_at_request_time(name: str) -> None:
    started = time.monotonic()
    template = ChatTemplate(BOMBS[name], bos_token="<s>", eos_token="</s>", name="gguf")
    assert time.monotonic() - started < 4, "loading (compile and probe) must be bounded"
    assert template.broken is not None, "the load-time probe marks it broken"
    started = time.monotonic()
    with pytest.raises(ModelFailure) as caught:
        template.render(MESSAGES)
    assert caught.value.code == "unsafe_chat_template"
    assert time.monotonic() - started < 1, "a broken template fails at once at request time"


@pytest.mark.timeout(30)
def test_a_bomb_triggered_by_the_messages_is_bounded_per_request() -> None:
    """A template that only explodes on some input passes the load probe and is stopped on
    the request that triggers it."""
    source = ("{% for m in messages %}{% if m.content == 'boom' %}{{ 'x' * 10**9 }}"
              "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
              "{% endif %}{{ m.content }}{% endfor %}")
    template = ChatTemplate(source, bos_token="", eos_token="", name="gguf")
    assert template.broken is None
    assert template.render(MESSAGES) == "Hi"
    started = time.monotonic()
    with pytest.raises(ModelFailure, match="over 1000000 items"):
        template.render([{"role": "user", "content": "boom"}])
    assert time.monotonic() - started < 1
    silent = source.replace("{{ 'x' * 10**9 }}", "")
    template = ChatTemplate(silent, bos_token="", eos_token="", name="gguf")
    started = time.monotonic()
    with pytest.raises(ModelFailure, match="ran for over 2s"):
        template.render([{"role": "user", "content": "boom"}])
    assert time.monotonic() - started < 4
    assert template.render(MESSAGES) == "Hi", "the template keeps working after an interrupt"


def test_ordinary_templates_still_render() -> None:
    """Built-ins, arithmetic on small values and a long conversation stay well inside."""
    for name, source in BUILTIN_TEMPLATES.items():
        template = ChatTemplate(source, bos_token="<s>", eos_token="</s>", name=name)
        assert template.broken is None
        assert "Hi" in template.render(MESSAGES)
    arithmetic = ChatTemplate("{{ 2 ** 10 }} {{ 'ab' * 3 }} {{ 7 // 2 }} {{ '%05d' % 42 }} "
                              "{{ 1700000000 | string }} {{ 'x' | center(5) }}",
                              bos_token="", eos_token="", name="gguf")
    assert arithmetic.render(MESSAGES) == "1024 ababab 3 00042 1700000000   x  "
    long = [{"role": "user", "content": "z" * 2_000_000}]
    assert len(ChatTemplate(BUILTIN_TEMPLATES["chatml"], bos_token="", eos_token="",
                            name="chatml").render(long)) > 2_000_000


def test_a_template_error_is_still_the_clients() -> None:
    template = ChatTemplate("{{ raise_exception('no system role') }}", bos_token="",
                            eos_token="", name="gguf")
    assert template.broken is None
    with pytest.raises(TemplateRenderError):
        template.render(MESSAGES)
