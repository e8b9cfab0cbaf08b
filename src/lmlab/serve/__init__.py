"""`lmlab serve`: OpenAI's API over a continuous-batching engine (lmlab.serve.engine, lmlab.serve.app)."""
