"""A model repository: block stores served over plain HTTP (with Range) on the LAN.

Any static HTTP server holding ``<base>/<model_id>/manifest.json``, ``<base>/<model_id>/<file>``
and ``<base>/<model_id>/blocks/<block>.safetensors`` is a model repository;
:func:`repository_app` is the one ``tiktrue models serve DIR`` runs. ``DIR`` is a models
directory (``<data>/models``: every complete store under it is served) or one block store (served
under its manifest's model id). ``GET /`` lists the model ids as JSON.

Only complete stores are served (a directory with ``manifest.json``); hidden paths and
``*.partial`` files (an import or a download in progress) never are. File responses honour
``Range`` (206 Partial Content), which the downloader uses to resume and to re-fetch one chunk.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tiktrue.model.errors import StoreError
from tiktrue.model.store import MANIFEST, BlockStore

PARTIAL_SUFFIX = ".partial"


def _single_store_id(root: Path) -> str | None:
    """The model id when ``root`` is itself one block store, else None."""
    if not (root / MANIFEST).is_file():
        return None
    try:
        return BlockStore(root).model_id
    except StoreError:
        return root.name


def list_repository_models(root: Path) -> list[str]:
    """The model ids a repository rooted at ``root`` serves."""
    root = Path(root)
    single = _single_store_id(root)
    if single is not None:
        return [single]
    if not root.is_dir():
        return []
    return sorted(
        child.name
        for child in root.iterdir()
        if not child.name.startswith(".") and child.is_dir() and (child / MANIFEST).is_file()
    )


def _store_dir(root: Path, model_id: str) -> Path | None:
    single = _single_store_id(root)
    if single is not None:
        return root if model_id == single else None
    if model_id.startswith(".") or "/" in model_id or "\\" in model_id:
        return None
    store = root / model_id
    return store if (store / MANIFEST).is_file() else None


def _resolve(store: Path, relative: str) -> Path | None:
    """The file ``relative`` inside ``store``, or None if it must not be served."""
    parts = relative.split("/")
    if not relative or any(
        not part or part.startswith(".") or part.endswith(PARTIAL_SUFFIX) or "\\" in part
        for part in parts
    ):
        return None
    base = store.resolve()
    path = (base / Path(*parts)).resolve()
    if not path.is_relative_to(base):  # a symlink pointing out of the store
        return None
    return path


def repository_app(root: Path) -> Starlette:
    """An ASGI app serving the block stores under ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root} is not a directory")

    async def index(request: Request) -> Response:
        return JSONResponse({"models": list_repository_models(root)})

    async def store_file(request: Request) -> Response:
        store = _store_dir(root, request.path_params["model_id"])
        path = None if store is None else _resolve(store, request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        try:
            info = os.stat(path)
        except OSError:
            return PlainTextResponse("not found", status_code=404)
        if not stat.S_ISREG(info.st_mode):
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(
            path,
            stat_result=info,
            media_type="application/json" if path.suffix == ".json" else None,
        )

    return Starlette(
        routes=[
            Route("/", index, methods=["GET", "HEAD"]),
            Route("/{model_id}/{path:path}", store_file, methods=["GET", "HEAD"]),
        ]
    )


def serve_repository(
    root: Path, host: str = "127.0.0.1", port: int = 8765, *, log_level: str = "warning"
) -> None:
    """Serve :func:`repository_app` with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(repository_app(root), host=host, port=port, log_level=log_level)
