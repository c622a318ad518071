"""Assemble the sandbox: a Starlette app that answers like BlockRun's image API."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawrouter.sandbox import chain, control, polls, routes
from clawrouter.sandbox.config import SandboxConfig
from clawrouter.sandbox.middleware import SandboxMiddleware
from clawrouter.sandbox.state import Sandbox


def create_sandbox_app(config: SandboxConfig | None = None) -> Starlette:
    config = config or SandboxConfig()
    app = Starlette(
        routes=[
            Route("/api/v1/images/generations", routes.generations, methods=["POST"]),
            Route("/api/v1/images/image2image", routes.image2image, methods=["POST"]),
            Route("/api/v1/images/generations/{job_id}", polls.poll, methods=["GET"]),
            Route("/api/v1/models", routes.models, methods=["GET"]),
            Route("/api/media/{name}", routes.media, methods=["GET"]),
            Route("/health", control.health, methods=["GET"]),
            Route("/_sandbox/stats", control.stats, methods=["GET"]),
            Route("/_sandbox/reset", control.reset, methods=["POST"]),
            Route("/_sandbox/faults", control.faults, methods=["GET", "POST"]),
            Route("/_sandbox/config", control.config, methods=["GET", "POST"]),
            Route("/_sandbox/rpc", chain.rpc, methods=["POST"]),
            Route("/_sandbox/redirect", control.redirect, methods=["GET"]),
        ],
        middleware=[Middleware(SandboxMiddleware, config=config)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.sandbox = Sandbox(config)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    """404/405 as JSON, like every other answer."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)
