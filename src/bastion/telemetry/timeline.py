"""One admitted request's moments, on the monotonic clock, from which both its latency
histograms and its trace spans are derived after it ends (the engines report no timings)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Timeline:
    model: str
    endpoint: str
    arrived: float  # the request was authenticated (its context created)
    admission_started: float  # the gate began taking a slot and reserving tokens
    admitted: float = 0.0  # ... and had them
    submitted: float = 0.0  # handed to the engine (the service layer's metered block began)
    first_token: float | None = None  # the first generated token reached the service layer
    last_token: float | None = None
    sequences: int = 1  # choices generated together (n, times the prompts of a completion)
    parent: Any = None  # the OpenTelemetry context of the request's span, when tracing

    def submit(self) -> None:
        self.submitted = time.monotonic()

    def token(self) -> None:
        """A Delta with generated tokens arrived: the first marks the end of prefill."""
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
