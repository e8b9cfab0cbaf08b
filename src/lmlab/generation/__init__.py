"""Decoding parts shared by `lmlab.generate` and the server: structured output (grammar-constrained
decoding) and tool calls."""
