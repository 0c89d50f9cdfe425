"""Prefix caching on the llama.cpp engine: a prompt that shares a prefix with an earlier one
reuses its KV (usage.prompt_tokens_details.cached_tokens says how many tokens), answers as
without the cache, and never across organisations.

"As without": greedy answers are compared over 16 tokens, token by token. The reused KV was
computed in other batches, and llama.cpp's kernels round differently by batch shape (on an
AVX-512/AMX CPU a Gemma logprob moves by up to 0.2 nats between 64- and 512-token prefill steps
with no cache at all, and by up to 2.7 nats inside a rambling answer). So the two answers must
pick the same token at every step until the first where the uncached run's two best tokens lay
within TIE of each other and the two picked different ones; from there the answers part. A
wrong reuse (wrong positions, another prompt's KV) changes tokens the model is sure of."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import openai
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, database_rows, make_tenant,
                      start_server, stop_server)
from polling import poll

SYSTEM = "You answer questions about the Harbor Street library. " + " ".join(
    f"Rule {i}: shelf {i} holds books on topic number {i * 7 % 31}, and is open until "
    f"{8 + i % 5} pm on weekdays." for i in range(1, 31))
QUESTIONS = ["Which shelf holds topic 14?", "When does shelf 3 close?",
             "Name two shelves that are open until 10 pm."]
ARGS = dict(max_tokens=16, temperature=0, seed=1, logprobs=True, top_logprobs=2)
TEXT_ARGS = dict(max_tokens=16, temperature=0, seed=1, logprobs=2)  # /v1/completions' form
ENV = {"BASTION_PARALLEL": "2", "BASTION_CONTEXT_PER_SEQUENCE": "2048"}
TIE = 3.0  # nats between the two best tokens below which rounding may pick the other one
Step = tuple[str, list[tuple[str, float]]]  # the token picked, the two best with logprobs


def chat_steps(content) -> list[Step]:
    return [(t.token, [(a.token, a.logprob) for a in t.top_logprobs]) for t in content]


def text_steps(lp) -> list[Step]:
    return [(tok, list(top.items())) for tok, top in zip(lp.tokens, lp.top_logprobs)]


def same_answer(cached_steps: list[Step], plain_steps: list[Step]) -> bool:
    """Asserts the two greedy answers agree as described above; True if they never part."""
    assert cached_steps and plain_steps
    for (tok, _), (ptok, ptop) in zip(cached_steps, plain_steps):
        if tok != ptok:
            best = sorted((v for _, v in ptop), reverse=True)
            assert best[0] - best[1] < TIE and tok in {t for t, _ in ptop}, (tok, ptok, ptop)
            return False
    assert [s[0] for s in cached_steps] == [s[0] for s in plain_steps]
    return True


def same_chat_answer(a, b) -> bool:
    return same_answer(chat_steps(a.choices[0].logprobs.content),
                       chat_steps(b.choices[0].logprobs.content))


def ask(client: openai.OpenAI, question: str, system: str = SYSTEM, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system},
                               {"role": "user", "content": question}], **{**ARGS, **kw})


def cached(resp) -> int:
    return resp.usage.prompt_tokens_details.cached_tokens


def sdk(server: RunningServer, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningServer, RunningServer]]:
    tmp: Path = tmp_path_factory.mktemp("prefix")
    on = start_server(tmp, env=ENV)
    try:
        off = start_server(tmp, env={**ENV, "BASTION_PREFIX_CACHE": "false"})
    except BaseException:
        stop_server(on)
        raise
    yield on, off
    stop_server(on)
    stop_server(off)


def test_a_shared_prefix_is_reused_and_the_answer_is_exact(servers) -> None:
    on, off = servers
    first = ask(sdk(on), QUESTIONS[0])
    assert cached(first) == 0  # nothing was cached yet on this server
    second = ask(sdk(on), QUESTIONS[1])
    # the system prompt's tokens were not prefilled again
    assert 400 < cached(second) < second.usage.prompt_tokens
    plain = ask(sdk(off), QUESTIONS[1])
    assert cached(plain) == 0
    assert second.usage.prompt_tokens == plain.usage.prompt_tokens
    if same_chat_answer(second, plain):
        assert second.choices[0].message.content == plain.choices[0].message.content
        assert second.usage.completion_tokens == plain.usage.completion_tokens
    # the very same prompt again: all but its last token come from the cache
    again = ask(sdk(on), QUESTIONS[1])
    assert cached(again) == again.usage.prompt_tokens - 1
    same_chat_answer(again, plain)
    # the ledger records the reused tokens with the request's usage
    rows = poll(lambda: database_rows(on, "usage_records"), lambda rs: len(rs) >= 3, timeout=10)
    assert sorted(r["cached_tokens"] for r in rows)[-3:] == sorted(
        [0, cached(second), cached(again)])


def test_multi_turn_chat_reuses_the_earlier_turns(servers) -> None:
    on, off = servers
    client = sdk(on)
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
    sizes = []
    for turn, follow_up in enumerate(["Why was he lonely?", "What happened next?"]):
        r = client.chat.completions.create(model=MODEL, messages=messages, **ARGS)
        if turn:
            assert cached(r) >= sizes[-1]  # the whole previous prompt, at least
        sizes.append(r.usage.prompt_tokens)
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": follow_up}]
    streamed = list(client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True},
        **ARGS))
    usage = streamed[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= sizes[-1]
    plain = sdk(off).chat.completions.create(model=MODEL, messages=messages, **ARGS)
    steps = chat_steps([t for c in streamed if c.choices and c.choices[0].logprobs
                        for t in c.choices[0].logprobs.content])
    if same_answer(steps, chat_steps(plain.choices[0].logprobs.content)):
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) \
            == plain.choices[0].message.content


def test_requests_arriving_together_prefill_their_shared_prompt_once(servers) -> None:
    """The second request waits for the first one's prefill of the system prompt and starts
    from a copy of its slot; without that, both would prefill all of it."""
    on, off = servers
    system = "Requests arriving together. " + SYSTEM  # no slot holds this prompt yet
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda q: ask(sdk(on), q, system=system), QUESTIONS[:2]))
    first, second = sorted(both, key=cached)
    assert cached(first) < 16  # at most the template's opening tokens, from another slot
    assert 400 < cached(second) < second.usage.prompt_tokens
    plain = ask(sdk(off), QUESTIONS[both.index(second)], system=system)
    if same_chat_answer(second, plain):
        assert second.choices[0].message.content == plain.choices[0].message.content


def test_another_organisation_never_reuses_the_cache(servers) -> None:
    on, _ = servers
    system = SYSTEM.replace("Harbor Street", "Mill Lane")
    ask(sdk(on), QUESTIONS[2], system=system)  # the admin's organisation caches it
    _, key = make_tenant(on.api, name="other")
    theirs = sdk(on, key["key"])
    first = ask(theirs, QUESTIONS[2], system=system)
    assert cached(first) == 0
    second = ask(theirs, QUESTIONS[2], system=system)  # its own request, though, is reused
    assert cached(second) == second.usage.prompt_tokens - 1


def test_completions_report_cached_tokens_streamed_too(servers) -> None:
    on, off = servers
    prompt = SYSTEM + "\nQuestion: which shelf is the largest?\nAnswer:"
    client = sdk(on)
    client.completions.create(model=MODEL, prompt=prompt, **TEXT_ARGS)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **TEXT_ARGS))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    plain = sdk(off).completions.create(model=MODEL, prompt=prompt, **TEXT_ARGS)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    steps = [s for lp in streamed for s in text_steps(lp)]
    if same_answer(steps, text_steps(plain.choices[0].logprobs)):
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def test_the_setting_off_caches_nothing(servers) -> None:
    _, off = servers
    client = sdk(off)
    for _ in range(2):
        r = ask(client, QUESTIONS[0])
        assert cached(r) == 0
    c = client.completions.create(model=MODEL, prompt=SYSTEM, **TEXT_ARGS)
    assert c.usage.prompt_tokens_details.cached_tokens == 0
