"""/metrics shows the renders the render cache saved (fleet-wide, from the scrape's database row)."""

from __future__ import annotations

from reactor.web.metrics import Metrics


def test_renders_saved_is_exposed() -> None:
    m = Metrics(actor="reactor:r1")
    m.update_database({"renders_saved_last_hour": 19})
    assert b"reactor_renders_saved_last_hour 19.0" in m.exposition()
