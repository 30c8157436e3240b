"""The browser page at ``/ui``: try any served model and watch its feedback metrics.

The page is plain static HTML/CSS/JS shipped inside this package (``static/``): no build
step, nothing loaded from the internet, so it works in an air-gapped cluster exactly as on a
laptop. It talks to the server only through the same REST API every client uses (V2
metadata, infer, feedback), plus two read-only helpers from :mod:`predictors.ui.api` that
the V2 protocol has no place for: the model's preprocessed input (the 28×28 image the model
really saw) and a card with the task, feature names and class names.

Why the shell is open while the API is not: ``/ui`` and ``/ui/...`` carry no data, so the
auth middleware lets them through and the page asks for the API key itself, keeping it in
the tab's ``sessionStorage`` only. The helper routes live under ``/v2/models/{name}/`` and so
need the key like every other model endpoint.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from predictors.ui.api import ModelLookup, build_ui_router

STATIC_DIR = Path(__file__).parent / "static"
UI_PATH = "/ui"

# The page loads only its own files and talks only to its own origin; inline script and
# style are refused, which also blunts any injection through model or label names.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


class _SecuredStatic:
    """Serve the static files with the security headers above (ETag revalidation keeps it cheap)."""

    def __init__(self, directory: Path) -> None:
        self.files = StaticFiles(directory=directory, html=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.files(scope, receive, send_with_headers)


def mount_ui(app: FastAPI, models: ModelLookup) -> None:
    """Add the page (``/ui/``), its static files and the helper routes to ``app``.

    ``models(name)`` returns the served model or ``None`` (the server passes its repository's
    ``get_model``, so the page sees exactly the models the API serves).
    """
    app.include_router(build_ui_router(models))

    async def to_slash() -> RedirectResponse:
        # Relative, so the redirect also works behind a proxy that serves the server under a prefix.
        return RedirectResponse("ui/", status_code=308)

    app.add_api_route(UI_PATH, to_slash, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(UI_PATH, _SecuredStatic(STATIC_DIR), name="ui")


__all__ = ["STATIC_DIR", "mount_ui"]
