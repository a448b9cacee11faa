from __future__ import annotations

import pytest

from vllm_autoserve.pools import modal as modal_pools


@pytest.fixture(autouse=True)
def _fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll the stand-ins every few milliseconds instead of every half second."""
    monkeypatch.setattr(modal_pools, "POLL_SECONDS", 0.005)
    monkeypatch.setattr(modal_pools, "POLL_MAX_SECONDS", 0.01)
