"""`thinkscale serve`: a reflective model behind the OpenAI API (chat and text completions), with
`reasoning_effort` as best-of-k by the SPRM, packed into shared decode batches.

The pieces: `protocol` (the wire format, checks and error objects), `text` (think part, stop strings,
stream deltas), `scheduler` (the request queue in front of the decode engine), `app` (FastAPI routes).
"""
from .app import ServeOptions, Served, create_app

__all__ = ["ServeOptions", "Served", "create_app"]
