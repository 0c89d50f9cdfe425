"""What operators see of a running server: Prometheus metrics and OpenTelemetry traces. The
lowest layer: every layer above may record into it, it imports nothing of Bastion's."""
