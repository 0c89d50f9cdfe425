"""Embeddings on a passthrough engine (an upstream server): Bastion checks and admits the
request as for a local model, asks the upstream for float vectors (every OpenAI-compatible
server has those; base64 is encoded here when the client asked) and bills the upstream's usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.models.catalog import Deployment
from bastion.engines.base import PassthroughEngine
from bastion.errors import BadGatewayError, InvalidRequestError
from bastion.ids import new_id
from bastion.protocol.embeddings import EmbeddingList, EmbeddingRequest
from bastion.admission.limiter import Limiter, Ticket
from bastion.services.common import metered
from bastion.tenancy.keys import Principal

INPUT_TOKENS = 2  # CLS/SEP or BOS/EOS around each input, beyond one token per byte


@dataclass
class UpstreamEmbeddings:
    body: EmbeddingRequest
    deployment: Deployment
    payload: dict[str, Any]
    prompt_tokens: int  # an upper bound until the upstream reports its count
    id: str

    @property
    def engine(self) -> PassthroughEngine:
        return self.deployment.engine  # type: ignore[return-value]


def prepare(body: EmbeddingRequest, deployment: Deployment, principal: Principal,
            limiter: Limiter) -> UpstreamEmbeddings:
    engine: PassthroughEngine = deployment.engine  # type: ignore[assignment]
    estimate = sum(len(x) if isinstance(x, list) else len(x.encode()) + INPUT_TOKENS
                   for x in body.inputs())
    cap = principal.limits.tokens_per_request
    if limiter.enabled and cap is not None and estimate > cap:
        raise InvalidRequestError(
            f"This request may have up to {estimate} input tokens, more than the {cap} tokens "
            f"per request your plan allows. Send fewer or shorter inputs per request.",
            param="input", code="tokens_per_request_exceeded")
    payload: dict[str, Any] = {"model": engine.upstream_model, "input": body.input,
                               "encoding_format": "float"}
    if body.dimensions is not None:
        payload["dimensions"] = body.dimensions
    return UpstreamEmbeddings(body, deployment, payload, estimate, new_id("emb"))


async def create(prep: UpstreamEmbeddings, ticket: Ticket) -> EmbeddingList:
    async with metered(ticket, 0):
        ticket.prompt_tokens = prep.prompt_tokens
        data = await prep.engine.post("embeddings", prep.payload)
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            ticket.prompt_tokens = usage["prompt_tokens"]
    try:
        items = sorted(data["data"], key=lambda d: d["index"])
        vectors = [np.asarray(d["embedding"], dtype=np.float32) for d in items]
    except (KeyError, TypeError, ValueError):
        raise BadGatewayError(f"The upstream server of '{prep.deployment.id}' sent embeddings "
                              f"Bastion cannot read.") from None
    if len(vectors) != len(prep.body.inputs()):
        raise BadGatewayError(f"The upstream server of '{prep.deployment.id}' sent "
                              f"{len(vectors)} vectors for {len(prep.body.inputs())} inputs.")
    return EmbeddingList.of(vectors, encoding_format=prep.body.encoding_format,
                            model=prep.deployment.id, prompt_tokens=ticket.prompt_tokens)
