"""`GET /`: the playground, one static HTML page (no build step, no CDN). `POST /` is TGI's route."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi.responses import HTMLResponse

from app.api.routing import api_router

router = api_router(tags=["playground"])
PAGE = Path(__file__).resolve().parents[2] / "static" / "playground.html"


@cache
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """Try generation (streamed) and classification in a browser."""
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})
