"""Legacy completions: every prompt shape, echo, logprobs, suffix, streaming."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import MODEL

PROMPT = "Once upon a time"


def test_string_prompt_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 20


def test_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_prompt_shapes_agree(client: openai.OpenAI, vocab) -> None:
    tokens = vocab.tokenize(PROMPT.encode(), add_bos=True, special=False)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    by_tokens = client.completions.create(model=MODEL, prompt=tokens, max_tokens=8, temperature=0)
    assert by_text.usage.prompt_tokens == len(tokens)
    assert by_tokens.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL, prompt=[PROMPT, "The capital of France is"],
                                     max_tokens=8, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    # Greedy rows of one batch agree; across different batch sizes llama.cpp's CPU kernels may
    # round differently, so near-ties can flip (as in any batching server): compare within one.
    assert many.choices[0].text == many.choices[1].text
    assert many.choices[2].text == many.choices[3].text
    assert many.choices[0].text.startswith(", there was")
    # each prompt's rows hold its own continuation (what a 270M model says of France differs
    # between CPUs: "Paris" on one, "the capital of the French Republic" on another)
    assert many.choices[2].text != many.choices[0].text
    second = client.completions.create(model=MODEL, prompt="The capital of France is",
                                       max_tokens=1)
    assert many.usage.prompt_tokens == by_text.usage.prompt_tokens + second.usage.prompt_tokens
    assert many.usage.completion_tokens == 4 * 8
    arrays = client.completions.create(model=MODEL, prompt=[tokens, tokens], max_tokens=8,
                                       temperature=0)
    assert arrays.choices[0].text == arrays.choices[1].text
    assert [c.index for c in arrays.choices] == [0, 1]


def test_echo_and_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                  echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    lp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                   logprobs=2)
    info = lp.choices[0].logprobs
    assert len(info.tokens) == len(info.token_logprobs) == len(info.top_logprobs) == 5
    assert "".join(info.tokens) == lp.choices[0].text
    assert all(len(t) == 2 for t in info.top_logprobs)
    assert info.text_offset == [sum(len(t) for t in info.tokens[:k]) for k in range(5)]
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                       logprobs=1, echo=True)
    e = echoed.choices[0].logprobs
    n_prompt = echoed.usage.prompt_tokens
    assert len(e.tokens) == n_prompt + 5
    assert e.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in e.token_logprobs[1:])
    assert e.token_logprobs[n_prompt:] == pytest.approx(info.token_logprobs, abs=1e-4)
    assert echoed.choices[0].text == PROMPT + lp.choices[0].text


def test_suffix_rejected_for_model_without_fim(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "def f(", "suffix": "\n"})
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "The model 'gemma-3-270m' cannot use suffix: it has no fill-in-the-middle tokens.",
        "type": "invalid_request_error", "code": "unsupported_parameter", "param": "suffix"}}


def test_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].choices == []


def test_streamed_logprob_offsets_match(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True)
    full = client.completions.create(**args).choices[0].logprobs
    chunks = list(client.completions.create(stream=True, **args))
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == full.tokens
    assert offsets == full.text_offset
    text = PROMPT + client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                              temperature=0).choices[0].text
    assert [text[o:o + len(t)] for o, t in zip(full.text_offset, full.tokens)] == full.tokens
