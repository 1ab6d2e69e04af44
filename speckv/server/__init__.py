"""`speckv serve`: an OpenAI-compatible HTTP server with adaptive speculative decoding.

- `app`: the FastAPI endpoints (chat and text completions, streamed or not; models; metrics; health)
- `protocol`: OpenAI's request and response shapes, checks and error bodies
- `scheduler`: the one worker thread that runs every model call, round-robin over active requests
- `generation`: one request's decoding job, and the shared models that build its decoder
- `text`: incremental detokenization and stop strings
- `metrics`: Prometheus metrics with vLLM's names
"""

from speckv.server.app import create_app
from speckv.server.generation import ServedModel

__all__ = ["ServedModel", "create_app"]
