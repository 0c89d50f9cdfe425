"""Embeddings: inputs -> token ids (checked, counted) -> batched vectors -> OpenAI's list."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from bastion.models.catalog import Deployment
from bastion.engines.base import is_passthrough
from bastion.engines.embeddings import SentenceTransformerEngine
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.protocol.embeddings import EmbeddingList, EmbeddingRequest
from bastion.admission.limiter import Limiter, Ticket
from bastion.services import passthrough_embeddings
from bastion.services.common import check_token_ids, metered
from bastion.services.passthrough_embeddings import UpstreamEmbeddings
from bastion.tenancy.keys import Principal

INLINE_TOKENIZE_CHARS = 4096


@dataclass
class PreparedEmbeddings:
    body: EmbeddingRequest
    deployment: Deployment
    engine: SentenceTransformerEngine
    sequences: list[list[int]]
    id: str

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def embedding_engine(deployment: Deployment) -> SentenceTransformerEngine:
    engine = deployment.engine
    if not engine.capabilities.embeddings or not isinstance(engine, SentenceTransformerEngine):
        raise InvalidRequestError(
            f"The model '{deployment.id}' is not an embedding model; use it with "
            f"/v1/chat/completions or /v1/completions, and an embedding model here.",
            param="model", code="model_not_supported")
    return engine


async def prepare_embeddings(body: EmbeddingRequest, deployment: Deployment,
                             principal: Principal, limiter: Limiter
                             ) -> PreparedEmbeddings | UpstreamEmbeddings:
    """Checked and counted; an upstream model's request is prepared and run by
    serving/passthrough_embeddings.py (create_embeddings dispatches)."""
    if is_passthrough(deployment.engine) and deployment.engine.capabilities.embeddings:
        return passthrough_embeddings.prepare(body, deployment, principal, limiter)
    engine = embedding_engine(deployment)
    if body.dimensions is not None and body.dimensions != engine.dimensions and not (
            deployment.truncatable_dimensions and body.dimensions < engine.dimensions):
        allowed = (f"at most {engine.dimensions}" if deployment.truncatable_dimensions
                   else f"only {engine.dimensions}; it was not trained to be shortened")
        raise InvalidRequestError(
            f"The model '{deployment.id}' makes {engine.dimensions}-dimensional vectors; "
            f"dimensions may be {allowed} (got {body.dimensions}).",
            param="dimensions", code="invalid_value")
    inputs = body.inputs()
    texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
    sequences: list[list[int]] = [x if isinstance(x, list) else [] for x in inputs]
    if texts:
        strings = [t for _, t in texts]
        # a few sentences tokenise in tens of microseconds: less than the hop to a worker
        # thread, which only pays off for long inputs that would hold the event loop
        ids = (engine.tokenize_many(strings) if sum(map(len, strings)) <= INLINE_TOKENIZE_CHARS
               else await run_in_threadpool(engine.tokenize_many, strings))
        for (i, _), tokens in zip(texts, ids):
            sequences[i] = tokens
    single = len(inputs) == 1 and not isinstance(body.input, list)
    limit = engine.max_input_tokens
    for i, seq in enumerate(sequences):
        param = "input" if single or isinstance(body.input[0], int) else f"input[{i}]"
        if isinstance(inputs[i], list):
            check_token_ids(seq, engine.info.vocab_size, param)
        if not seq:
            raise InvalidRequestError(f"'{param}' has no tokens for this model.", param=param,
                                      code="empty_input")
        if len(seq) > limit:
            if not body.truncate:
                raise InvalidRequestError(
                    f"'{param}' is {len(seq)} tokens, but the model '{deployment.id}' takes at "
                    f"most {limit} tokens per input. Shorten it, or send \"truncate\": true to "
                    f"embed only its first {limit} tokens.",
                    param=param, code="context_length_exceeded")
            sequences[i] = seq[:limit]
    prep = PreparedEmbeddings(body, deployment, engine, sequences, new_id("emb"))
    cap = principal.limits.tokens_per_request
    if limiter.enabled and cap is not None and prep.prompt_tokens > cap:
        raise InvalidRequestError(
            f"This request has {prep.prompt_tokens} input tokens, more than the {cap} tokens "
            f"per request your plan allows. Send fewer or shorter inputs per request.",
            param="input", code="tokens_per_request_exceeded")
    return prep


def _shorten(vectors: np.ndarray, dimensions: int | None, normalized: bool) -> np.ndarray:
    """Matryoshka-style shortening: keep the leading dimensions, renormalise if the model does."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    short = vectors[:, :dimensions]
    if normalized:
        norms = np.linalg.norm(short, axis=1, keepdims=True)
        short = short / np.maximum(norms, 1e-12)
    return short.astype(np.float32)


async def create_embeddings(prep: PreparedEmbeddings | UpstreamEmbeddings,
                            ticket: Ticket) -> EmbeddingList:
    if isinstance(prep, UpstreamEmbeddings):
        return await passthrough_embeddings.create(prep, ticket)
    engine = prep.engine
    async with metered(ticket, prep.prompt_tokens):
        vectors = await engine.embed(prep.sequences)
    vectors = _shorten(vectors, prep.body.dimensions, engine.normalizes)
    return EmbeddingList.of(vectors, encoding_format=prep.body.encoding_format,
                            model=prep.deployment.id, prompt_tokens=prep.prompt_tokens)
