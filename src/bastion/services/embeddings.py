"""Embeddings: inputs -> counted by the model's engine (token ids checked, or an upstream's
upper bound) -> vectors -> OpenAI's list. One path for every engine."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.admission.limiter import Limiter, Ticket
from bastion.engines.base import EmbeddingPrompt, Engine, PreparedPrompt
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.models.catalog import Deployment
from bastion.protocol.embeddings import EmbeddingList, EmbeddingRequest
from bastion.services.common import metered
from bastion.tenancy.keys import Principal


@dataclass
class PreparedEmbeddings:
    body: EmbeddingRequest
    deployment: Deployment
    engine: Engine
    prompt: PreparedPrompt
    id: str

    @property
    def prompt_tokens(self) -> int:
        """Exact for a local model; an upstream's upper bound until it reports its count."""
        return self.prompt.n_tokens


def embedding_engine(deployment: Deployment) -> Engine:
    engine = deployment.engine
    if not engine.capabilities.embeddings:
        raise InvalidRequestError(
            f"The model '{deployment.id}' is not an embedding model; use it with "
            f"/v1/chat/completions or /v1/completions, and an embedding model here.",
            param="model", code="model_not_supported")
    return engine


async def prepare_embeddings(body: EmbeddingRequest, deployment: Deployment,
                             principal: Principal, limiter: Limiter) -> PreparedEmbeddings:
    """Checked and counted by the model's engine, then against the plan."""
    engine = embedding_engine(deployment)
    dims = engine.info.dimensions  # None where unknown (an upstream checks for itself)
    if body.dimensions is not None and dims is not None and body.dimensions != dims and not (
            deployment.truncatable_dimensions and body.dimensions < dims):
        allowed = (f"at most {dims}" if deployment.truncatable_dimensions
                   else f"only {dims}; it was not trained to be shortened")
        raise InvalidRequestError(
            f"The model '{deployment.id}' makes {dims}-dimensional vectors; "
            f"dimensions may be {allowed} (got {body.dimensions}).",
            param="dimensions", code="invalid_value")
    inputs = body.inputs()
    single = len(inputs) == 1 and not isinstance(body.input, list)
    params = ["input" if single or isinstance(body.input[0], int) else f"input[{i}]"
              for i in range(len(inputs))]
    prompt = await engine.count_prompt(EmbeddingPrompt(inputs, params, truncate=body.truncate))
    prep = PreparedEmbeddings(body, deployment, engine, prompt, new_id("emb"))
    cap = principal.limits.tokens_per_request
    if limiter.enabled and cap is not None and prep.prompt_tokens > cap:
        has = "has" if prompt.exact else "may have up to"
        raise InvalidRequestError(
            f"This request {has} {prep.prompt_tokens} input tokens, more than the {cap} tokens "
            f"per request your plan allows. Send fewer or shorter inputs per request.",
            param="input", code="tokens_per_request_exceeded")
    return prep


async def create_embeddings(prep: PreparedEmbeddings, ticket: Ticket) -> EmbeddingList:
    async with metered(ticket, prep.prompt_tokens):
        result = await prep.engine.embed(prep.prompt, dimensions=prep.body.dimensions)
        ticket.prompt_tokens += result.prompt_tokens - prep.prompt_tokens  # the engine's count
    return EmbeddingList.of(result.vectors, encoding_format=prep.body.encoding_format,
                            model=prep.deployment.id, prompt_tokens=result.prompt_tokens)
