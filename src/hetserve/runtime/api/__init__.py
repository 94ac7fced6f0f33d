"""The OpenAI-compatible HTTP API (``hetserve serve``): FastAPI routes over one engine thread.

``create_app(engine, model_name)`` builds the app; ``add_serve_parser``/``cmd_serve`` are the CLI verb.
FastAPI and uvicorn (the ``serve`` extra) are imported only when the server is built.
"""

from .cli import add_serve_parser, build_engine, cmd_serve

__all__ = ["add_serve_parser", "build_engine", "cmd_serve", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .server import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
