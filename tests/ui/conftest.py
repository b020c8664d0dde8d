"""Browser fixtures for the web UI's tests (shared by every page's tests).

- ``browser``: one headless chromium per test module (skips, saying why, where there is none);
- ``new_page(viewport=..., locale=...)``: a page in a fresh browser context (its own cookies:
  another person; ``locale="fa-IR"``: a browser asking for Persian), whose every request is
  checked at the end to have stayed on 127.0.0.1;
- ``ui_node(home)``: a real node process serving the UI (``tiktrue node --api-port 0``) with
  the tiny model in its store; returns the cluster (``.api_url``; the UI is at its root);
- ``repository``: the tiny model in a model repository served over HTTP (its URL);
- ``endless_llama``: a tiny model that never ends an answer by itself (a Stop always comes
  before its end, however fast the machine).
"""

from __future__ import annotations

import pytest

from tests.helpers.browser import (
    CHROMIUM_ARGS,
    DESKTOP,
    WAIT_MS,
    RequestLog,
    browser_problem,
    chromium_path,
)
from tests.helpers.network import import_model_from_store
from tiktrue.service.local_network import LocalCluster


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: while Playwright's sync API runs, this thread counts as inside an event
    loop, so a later module's ``asyncio.run`` would fail if the browser outlived its module."""
    problem = browser_problem()
    if problem:
        pytest.skip(f"browser tests need chromium: {problem}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser):
    """``new_page(viewport=DESKTOP)`` -> a page of a new browser context."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    contexts, logs = [], []

    def make(viewport: dict | None = None, locale: str | None = None):
        # locale: the browser's language, sent as Accept-Language (Playwright's default: en-US)
        context = browser.new_context(viewport=viewport or DESKTOP, locale=locale)
        log = RequestLog()
        context.on("request", log.record)
        contexts.append(context)
        logs.append(log)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        return page

    yield make
    for context in contexts:
        context.close()
    outside = [url for log in logs for url in log.outside()]
    assert not outside, f"the UI requested URLs beyond 127.0.0.1: {outside}"
    assert any(log.urls for log in logs)


def ui_base(cluster: LocalCluster) -> str:
    return cluster.api_url.removesuffix("/v1")


@pytest.fixture
def ui_node(tiny_llama):
    """``ui_node(home, model=True) -> LocalCluster``: a node serving the UI, the tiny model
    imported (a PC without a model: ``model=False``)."""
    started = []

    def start(home, *, model: bool = True, **options) -> LocalCluster:
        models = home / "models"
        if model and not (models / tiny_llama.model_id).exists():
            import_model_from_store(tiny_llama.root, models)
        options = {"kv_budget_mb": 16, "own_control_ports": False, **options}
        cluster = LocalCluster([home], **options)
        started.append(cluster.start())
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="module")
def repository(tiny_llama, tmp_path_factory) -> str:
    """A model repository (``tiktrue models serve``) holding the tiny model: its URL."""
    from tests.helpers.http_server import serve
    from tiktrue.control.model_repository import repository_app

    root = tmp_path_factory.mktemp("repository")
    import_model_from_store(tiny_llama.root, root)
    with serve(repository_app(root)) as url:
        yield url


@pytest.fixture(scope="session")
def endless_llama(tmp_path_factory):
    """A tiny Llama whose answers run to their ``max_tokens`` (``make_endless_model``)."""
    from tests.helpers.tiny_models import make_endless_model
    from tiktrue.model.importer import import_model

    source = make_endless_model(tmp_path_factory.mktemp("endless-src"))
    return import_model(source, "tiny-endless", tmp_path_factory.mktemp("endless-models"))
