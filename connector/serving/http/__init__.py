"""The decode daemon's OpenAI-compatible HTTP API (a client of its own gRPC Generate)."""
