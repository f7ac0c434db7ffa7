"""The web page of `ragrt serve` at `/`: one HTML file with its script and style inline, so it needs
no build step and no network (docs/web.md). It holds no data, so it is served without the API key;
the page asks for the key and sends it with every API call."""
from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = files("ragrt.serve").joinpath("page.html").read_text(encoding="utf-8")
PATH = "/"
# The browser itself refuses anything from elsewhere, so the page cannot come to depend on a CDN.
HEADERS = {"Cache-Control": "no-cache",
           "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"}

web = APIRouter()


@web.get(PATH, response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(PAGE, headers=HEADERS)
