"""`mixbuild serve`: an OpenAI-compatible HTTP API (completions, chat, SSE streaming, metrics)
in front of the runtime's continuous-batching scheduler.

    from mixbuild.serve import create_app
    app = create_app(mixbuild.runtime.load("artifacts/tiny-serving"), model_name="tiny")

`app` is a Starlette ASGI app, so a service can run it with any ASGI server or mount it in its
own app. Importing this package is light: starlette loads only when `create_app` is used
(`pip install 'mixbuild[serve]'`).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name != "create_app":
        raise AttributeError(f"module 'mixbuild.serve' has no attribute '{name}'")
    from mixbuild.errors import require

    require("starlette", "serve", "mixbuild.serve.create_app")
    from mixbuild.serve.app import create_app

    return create_app
