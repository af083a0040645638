"""Serving: the OpenAI-compatible HTTP API, SSE streams, Prometheus metrics and the chat page, over one engine."""
