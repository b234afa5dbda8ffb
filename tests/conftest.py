"""Shared fixtures: small models, shared real data, quiet random-weight warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pfmseg_engine.backbones import RandomWeightsWarning

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    """Tests build random-weight backbones on purpose; the warning is tested where it matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small test models run several times faster on one thread than contending for two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """The demo slide and plugin sessions go to a per-run cache, never the user's ~/.cache."""
    monkeypatch.setenv("PFMSEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pfmseg-cache"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"Shared test data not found at {SHARED_DATA}; the repo must sit beside shared/.")
    return SHARED_DATA
