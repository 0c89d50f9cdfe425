"""The inference use cases as every transport runs them (HTTP, WebSocket, playground): the model
resolved for the caller's organisation, the request checked and counted, then admitted through
the gate. What runs after admission (complete_*, open_*_stream, create_embeddings) is the
endpoint's own module; the transport chooses it by how it answers."""

from __future__ import annotations

from typing import Any

from bastion.admission.gate import RequestContext
from bastion.admission.limiter import Ticket
from bastion.protocol.chat import ChatCompletionRequest
from bastion.protocol.completions import CompletionRequest
from bastion.protocol.embeddings import EmbeddingRequest
from bastion.services.chat import prepare_chat
from bastion.services.completions import prepare_completion
from bastion.services.context import Services
from bastion.services.embeddings import prepare_embeddings
from bastion.services.models import resolve


async def _admitted(services: Services, ctx: RequestContext, prep: Any,
                    estimate: int, sequences: int = 1) -> tuple[Any, Ticket]:
    """Admitted with a concurrency slot per sequence decoded at once (n x prompts)."""
    ticket = await services.gate.open(ctx, estimate, model=prep.deployment.id,
                                      request_id=prep.id, sequences=sequences)
    return prep, ticket


async def start_chat(services: Services, ctx: RequestContext,
                     body: ChatCompletionRequest) -> tuple[Any, Ticket]:
    deployment = await resolve(services, body.model, ctx.principal)
    prep = await prepare_chat(body, deployment, services.settings, ctx.principal,
                              services.limiter)
    return await _admitted(services, ctx, prep, prep.estimate, prep.request.n)


async def start_completion(services: Services, ctx: RequestContext,
                           body: CompletionRequest) -> tuple[Any, Ticket]:
    deployment = await resolve(services, body.model, ctx.principal)
    prep = await prepare_completion(body, deployment, services.settings, ctx.principal,
                                    services.limiter)
    return await _admitted(services, ctx, prep, prep.estimate,
                           sum(r.n for r in prep.requests))


async def start_embeddings(services: Services, ctx: RequestContext,
                           body: EmbeddingRequest) -> tuple[Any, Ticket]:
    deployment = await resolve(services, body.model, ctx.principal)
    prep = await prepare_embeddings(body, deployment, ctx.principal, services.limiter)
    return await _admitted(services, ctx, prep, prep.prompt_tokens)
