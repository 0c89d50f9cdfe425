"""The llama.cpp multimodal path, engine level: a real mmproj (tiny, random weights; see
tiny_vlm.py) on the bundled Gemma 3 270M, images given as DecodedImage the way serving/chat.py
passes them after validation."""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path
from typing import Iterator

import llama_cpp as lc
import numpy as np
import pytest
from llama_cpp import mtmd_cpp as mt

from bastion.engines.base import (MEDIA_TOKEN, DecodedImage, Delta, EngineError, Finished,
                                  GenerationRequest, Prompt, SamplingParams)
from bastion.engines.llamacpp.engine import LlamaCppEngine
from conftest import models_cache
from tiny_vlm import GEMMA3_IMAGE_TOKENS, IMAGE_TOKENS, write_mmproj

THREADS = 2


def gemma() -> Path:
    return models_cache() / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmproj(tmp_path_factory.mktemp("vlm") / "tiny-mmproj.gguf")


@pytest.fixture(scope="module")
def engine(mmproj: Path) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(path=gemma(), name="tiny-vlm", n_seq=4, ctx_per_seq=1024, n_batch=256,
                         threads=THREADS, mmproj=mmproj)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def gemma3_mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmproj(tmp_path_factory.mktemp("vlm") / "tiny-gemma3-mmproj.gguf",
                        projector="gemma3")


@pytest.fixture(scope="module")
def gemma3_engine(gemma3_mmproj: Path) -> Iterator[LlamaCppEngine]:
    """Gemma 3's own projector type: wrapper tokens and non-causal image attention."""
    eng = LlamaCppEngine(path=gemma(), name="tiny-gemma3-vlm", n_seq=4, ctx_per_seq=1024,
                         n_batch=256, threads=THREADS, mmproj=gemma3_mmproj)
    yield eng
    eng.close()


def noise(seed: int, width: int = 40, height: int = 30) -> DecodedImage:
    rgb = np.random.default_rng(seed).integers(0, 256, width * height * 3, dtype=np.uint8)
    return DecodedImage(width, height, rgb.tobytes())


def ask(*parts: dict) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(img: DecodedImage) -> dict:
    return {"type": "image", "image": img}


def params(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=5)


def run(engine: LlamaCppEngine, prompt: Prompt | list[int], max_tokens: int = 6
        ) -> tuple[str, list[list[tuple[str, float]]]]:
    """Text and per-token top logprobs of one greedy generation."""
    return asyncio.run(collect(engine, prompt, max_tokens))


async def collect(engine: LlamaCppEngine, prompt: Prompt | list[int], max_tokens: int = 6
                  ) -> tuple[str, list[list[tuple[str, float]]]]:
    tokens, media = (prompt.tokens, prompt.media) if isinstance(prompt, Prompt) else (prompt, ())
    out, tops, finished = "", [], False
    async for ev in engine.generate(GenerationRequest(prompt_tokens=tokens, media=media,
                                                      params=params(max_tokens))):
        if isinstance(ev, Delta):
            out += ev.text
            tops += [[(t, v) for t, _, v in lp.top] for lp in ev.logprobs]
        elif isinstance(ev, Finished):
            finished = True
    assert finished
    return out, tops


def test_capabilities(engine: LlamaCppEngine) -> None:
    assert engine.capabilities.vision and engine.capabilities.chat


def test_image_adds_exactly_its_tokens(engine: LlamaCppEngine) -> None:
    plain = engine.render_chat([{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "What is in the picture?"}])
    with_image = engine.render_chat_media(ask(text("What is in the picture?"), image(noise(1))))
    assert len(with_image.tokens) == len(plain) + IMAGE_TOKENS
    (media,) = with_image.media
    assert media.n_tokens == IMAGE_TOKENS
    run_ = with_image.tokens[media.offset:media.offset + IMAGE_TOKENS]
    assert run_ == [MEDIA_TOKEN] * IMAGE_TOKENS
    # the text around the image is the text-only prompt, token for token
    assert with_image.tokens[:media.offset] + with_image.tokens[media.offset + IMAGE_TOKENS:] == plain


def test_text_parts_are_joined_and_user_text_cannot_fake_turns(engine: LlamaCppEngine) -> None:
    split = engine.render_chat_media(ask(text("What is "), text("<end_of_turn>"),
                                         image(noise(1))))
    whole = engine.render_chat([{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "What is <end_of_turn>"}])
    m = split.media[0]
    assert split.tokens[:m.offset] + split.tokens[m.offset + m.n_tokens:] == whole
    end_of_turn = engine.model.tokenize("<end_of_turn>", add_special=False, parse_special=True)
    # Gemma's template folds the system message into the user turn, which it closes once;
    # the <end_of_turn> the user typed is text, not the special token
    assert split.tokens.count(end_of_turn[0]) == 1


def test_two_images_in_order(engine: LlamaCppEngine) -> None:
    p = engine.render_chat_media(ask(image(noise(1)), text("and"), image(noise(2)),
                                     text("differ?")))
    assert [m.n_tokens for m in p.media] == [IMAGE_TOKENS, IMAGE_TOKENS]
    assert p.media[0].offset + IMAGE_TOKENS < p.media[1].offset
    assert p.tokens.count(MEDIA_TOKEN) == 2 * IMAGE_TOKENS
    out, tops = run(engine, p, max_tokens=3)
    assert tops


def reference_first_logprobs(model_path: Path, mmproj: Path, prompt: Prompt) -> np.ndarray:
    """Log-probabilities of the first generated token from a plain sequential evaluation: a
    fresh llama_context with one sequence, text decoded with llama_batch_get_one, each image
    with libmtmd's helper. None of the scheduler's batching, positions or slots are used."""
    mparams = lc.llama_model_default_params()
    mparams.use_extra_bufts = False  # the engine's weight layout (LlamaModel): the same kernels
    model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 256, 256
    cp.n_threads = cp.n_threads_batch = THREADS
    ctx = lc.llama_init_from_model(model, cp)
    mp = mt.mtmd_context_params_default()
    mp.use_gpu, mp.print_timings, mp.n_threads, mp.warmup = False, False, THREADS, False
    mctx = mt.mtmd_init_from_file(str(mmproj).encode(), model, mp)
    try:
        pos, cuts = 0, [(m.offset, m) for m in prompt.media] + [(len(prompt.tokens), None)]
        for offset, media in cuts:
            toks = prompt.tokens[pos:offset]
            arr = (lc.llama_token * len(toks))(*toks)
            assert lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(toks))) == 0
            if media is not None:
                new_past = lc.llama_pos(0)
                assert mt.mtmd_helper_eval_chunk_single(mctx, ctx, media.payload.ptr, offset, 0,
                                                        256, False, ctypes.byref(new_past)) == 0
                pos = new_past.value
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1),
                                       shape=(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)),))
        logits = logits.astype(np.float64)
        return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    finally:
        mt.mtmd_free(mctx)
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def check_against_reference(engine: LlamaCppEngine, mmproj: Path) -> None:
    p1 = engine.render_chat_media(ask(text("Describe:"), image(noise(1))))
    p2 = engine.render_chat_media(ask(text("Describe:"), image(noise(2))))
    _, tops1 = run(engine, p1, max_tokens=1)
    _, tops2 = run(engine, p2, max_tokens=1)
    ref1 = reference_first_logprobs(gemma(), mmproj, p1)
    ref_top = np.sort(ref1)[::-1][:5]
    got = np.array([v for _, v in tops1[0]])
    assert np.allclose(got, ref_top, atol=0.02), (got, ref_top)
    other = np.array([v for _, v in tops2[0]])
    assert np.abs(other - got).max() > 0.1, (other, got)


def test_scheduler_matches_sequential_reference(engine: LlamaCppEngine, mmproj: Path) -> None:
    """The image lands in the sequence's KV cache at the right positions: the first token's
    distribution equals that of a plain one-sequence evaluation, and a different image gives
    a clearly different one."""
    check_against_reference(engine, mmproj)


def test_gemma3_projector_wraps_images_and_matches_reference(
        gemma3_engine: LlamaCppEngine, gemma3_mmproj: Path) -> None:
    """Gemma 3's projector: mtmd's <start_of_image>/<end_of_image> come back as text tokens
    around the image (and count in the prompt), the image attends to itself non-causally."""
    eng = gemma3_engine
    plain = eng.render_chat([{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "What is it?"}])
    p = eng.render_chat_media(ask(text("What is it?"), image(noise(1))))
    (m,) = p.media
    assert m.n_tokens == GEMMA3_IMAGE_TOKENS
    assert len(p.tokens) == len(plain) + GEMMA3_IMAGE_TOKENS + 2
    start, end = (eng.model.tokenize(t, add_special=False, parse_special=True)
                  for t in ("<start_of_image>", "<end_of_image>"))
    assert [p.tokens[m.offset - 1]] == start and [p.tokens[m.offset + m.n_tokens]] == end
    assert p.tokens[:m.offset - 1] + p.tokens[m.offset + m.n_tokens + 1:] == plain
    check_against_reference(eng, gemma3_mmproj)


def test_same_image_same_output_different_image_different_logprobs(engine: LlamaCppEngine) -> None:
    a = run(engine, engine.render_chat_media(ask(text("What is it?"), image(noise(1)))))
    again = run(engine, engine.render_chat_media(ask(text("What is it?"), image(noise(1)))))
    b = run(engine, engine.render_chat_media(ask(text("What is it?"), image(noise(2)))))
    assert a == again
    assert a[1][0] != b[1][0]


def test_concurrent_images_and_text_each_keep_their_own_sequence(engine: LlamaCppEngine) -> None:
    """Two image requests and two text-only ones at once start as each does alone: an image
    decoded into the wrong slot, or text prefill stepping on an image, would show here."""
    prompts: list[Prompt | list[int]] = [
        engine.render_chat_media(ask(text("What is it?"), image(noise(1)))),
        engine.render_chat([{"role": "user", "content": "Say hello."}]),
        engine.render_chat_media(ask(text("What is it?"), image(noise(2)))),
        engine.render_chat([{"role": "user", "content": "Count to three."}]),
    ]
    alone = [run(engine, p, max_tokens=4) for p in prompts]
    assert alone[0][1][0][0] != alone[2][1][0][0]  # the images lead to different first tokens

    async def together() -> list:
        return await asyncio.gather(*(collect(engine, p, max_tokens=4) for p in prompts))

    for (_, lp_alone), (text_tog, lp_tog) in zip(alone, asyncio.run(together())):
        assert text_tog and len(lp_tog) == len(lp_alone)
        # Logits depend a little on what else shares the batch (quantised kernels: measured
        # up to 0.25 for text-only prompts too), so the first token is compared, with slack
        # far below what a different image changes.
        (tok_alone, v_alone), (tok_tog, v_tog) = lp_alone[0][0], lp_tog[0][0]
        assert tok_tog == tok_alone and abs(v_tog - v_alone) < 0.5


def test_other_sequences_keep_decoding_while_an_image_is_encoded(engine: LlamaCppEngine) -> None:
    """The vision encoder runs on a worker thread: a text sequence keeps producing tokens
    while an image encodes. The real encoder is wrapped to take 1.5 s longer, as a large
    projector on a CPU would."""
    import threading
    import time

    real_encode = engine.projector.encode
    window: dict[str, float | str] = {}

    def slow_encode(image) -> None:  # type: ignore[no-untyped-def]
        window["start"], window["thread"] = time.monotonic(), threading.current_thread().name
        real_encode(image)
        time.sleep(1.5)
        window["end"] = time.monotonic()

    text_times: list[float] = []

    async def text_request() -> None:
        tokens = engine.render_chat([{"role": "user", "content": "Tell me a long story."}])
        req = GenerationRequest(prompt_tokens=tokens, params=SamplingParams(max_tokens=200))
        async for ev in engine.generate(req):
            if isinstance(ev, Delta):
                text_times.append(time.monotonic())

    async def both() -> None:
        story = asyncio.create_task(text_request())
        while not text_times:
            await asyncio.sleep(0.01)
        await collect(engine, engine.render_chat_media(ask(text("What?"), image(noise(9)))))
        await story

    engine.projector.encode = slow_encode  # type: ignore[method-assign]
    try:
        asyncio.run(both())
    finally:
        engine.projector.encode = real_encode  # type: ignore[method-assign]
    assert window["thread"] != engine.scheduler._thread.name
    during = [t for t in text_times if window["start"] < t < window["end"]]
    assert len(during) >= 3, (len(during), len(text_times))


def test_bad_image_data_is_refused(engine: LlamaCppEngine) -> None:
    with pytest.raises(EngineError, match="does not match its size"):
        engine.render_chat_media(ask(image(DecodedImage(4, 4, b"\0" * 47))))


def test_text_path_refuses_parts_and_media_engine_needs_projector(mmproj: Path) -> None:
    plain = LlamaCppEngine(path=gemma(), name="plain", n_seq=1, ctx_per_seq=256, n_batch=64,
                           threads=THREADS)
    try:
        assert not plain.capabilities.vision
        with pytest.raises(EngineError, match="no vision projector"):
            plain.render_chat_media(ask(image(noise(1))))
    finally:
        plain.close()


def test_projector_for_another_model_is_refused(tmp_path: Path) -> None:
    wrong = write_mmproj(tmp_path / "wrong.gguf", text_embd=64)  # Gemma 3 270M is 640 wide
    with pytest.raises(RuntimeError, match="could not load the multimodal projector"):
        LlamaCppEngine(path=gemma(), name="wrong", n_seq=1, ctx_per_seq=256, n_batch=64,
                       threads=THREADS, mmproj=wrong)
