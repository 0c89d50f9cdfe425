"""HTTP plumbing shared by the transports that speak HTTP (api/ and web/): the admission
gate's binding, Idempotency-Key answers, SSE framing. Neither transport imports the other."""
