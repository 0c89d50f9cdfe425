"""Fine-tuning: job lifecycle, the worker that claims jobs, the trainer and the export to GGUF."""
