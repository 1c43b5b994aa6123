"""`thinkscale serve`: a reflective model behind the OpenAI API (chat and text completions), with
`reasoning_effort` as best-of-k by the SPRM, packed into shared decode batches.

The pieces: `protocol` (the wire format, checks, error objects and the server's options), `text` (think
part, stop strings, stream deltas), `scheduler` (the request queue in front of the decode engine),
`metrics` (Prometheus), `app` (FastAPI routes). The names below load `app` (and so fastapi) only when
used, so `protocol` imports without the serve extra.
"""
__all__ = ["ServeOptions", "Served", "create_app"]


def __getattr__(name: str):
    if name == "ServeOptions":
        from .protocol import ServeOptions

        return ServeOptions
    if name in ("Served", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
