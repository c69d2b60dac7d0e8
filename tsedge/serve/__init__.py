"""``tsedge serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on one compiled library.

``create_app(engine, model_id)`` builds the application; requests are served one at a time, in
arrival order, on the one engine, each reusing the KV cache's longest common prefix with it.
"""

from tsedge.serve.app import create_app

__all__ = ["create_app"]
