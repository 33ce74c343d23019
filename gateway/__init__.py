"""The HTTP gateway: OpenAI-compatible routes, SSE streaming, admission, metrics, and the `strata` command."""
