"""`moonlet serve`: an OpenAI-compatible HTTP server with continuous batching, and a web chat page.

    app.py      routes (FastAPI), streaming, the Server wrapper (uvicorn, graceful shutdown)
    loop.py     the one engine loop thread: the Scheduler, admission (429), aborts, metrics
    schemas.py  request/response bodies (pydantic)
    errors.py   OpenAI's error shape for every failure
    static/     the chat page served at /
"""

from __future__ import annotations

from .app import Server, create_app

__all__ = ["create_app", "Server"]
