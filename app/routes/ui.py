"""The dashboard at /ui: one static page whose script reads the JSON API with the user's own key, so it is
behind the same keys as everything else and the server renders nothing per user."""
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
# Only the page's own script and styles run; the API key never leaves this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=UI_DIR)


@router.get("/ui")
def ui_root():
    return RedirectResponse("/ui/")


@router.get("/ui/")
def ui_page():
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)
