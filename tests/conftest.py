"""Shared fixtures: tiny block stores (session-scoped: made once per test run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_model
from tiktrue.model.importer import import_model
from tiktrue.model.store import BlockStore


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_store_factory(models_root, tmp_path_factory):
    """``factory(architecture, **kwargs) -> BlockStore``, cached per argument set."""
    made: dict[tuple, BlockStore] = {}

    def factory(architecture: str = "llama", **kwargs) -> BlockStore:
        key = (architecture, tuple(sorted(kwargs.items())))
        if key not in made:
            name = f"tiny-{architecture}-{len(made)}"
            source = make_tiny_model(tmp_path_factory.mktemp(name), architecture, **kwargs)
            made[key] = import_model(source, name, models_root)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_store_factory) -> BlockStore:
    return tiny_store_factory("llama")
