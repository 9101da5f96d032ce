"""deploy/grafana: the board loads, and every metric its queries use is one the reactor exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from reactor.testing.orchestrator import OrchestratorDouble
from tests.integration.test_feed import bearer, feed_reactor, http_base, recv, token, url
from tests.support.reactors import wait_for

pytestmark = pytest.mark.anyio

BOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "reactor-dashboard.json"


def board_metrics(board: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names |= set(re.findall(r"\b(reactor_[a-z0-9_]+)", target["expr"]))
    return names


def test_the_board_is_importable_json() -> None:
    board = json.loads(BOARD.read_text())
    assert board["title"] and board["uid"] and board["panels"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("priority", "throughput", "wait", "run time", "failures", "retries", "lease", "circuit",
                  "feed clients", "alerts"):
        assert topic in titles, topic
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


async def test_every_metric_on_the_board_is_exported(dsn: str, db: psycopg.Connection[Any]) -> None:
    wanted = board_metrics(json.loads(BOARD.read_text()))
    assert len(wanted) >= 12
    # a job stuck in processing for the sweep to recover, one to complete, one to fail, one to retry
    db.execute("INSERT INTO jobs (job_type, payload, status, started_at) VALUES "
               "('topic_short', '{\"topic\": \"stuck\"}', 'processing', now() - interval '1 hour')")
    db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"fine\"}'), "
               "('topic_short', '{\"topic\": \"[[status=400]] bad\"}'), "
               "('topic_short', '{\"topic\": \"[[fail_first=1:status=500]] flaky\"}')")
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as service:
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')",
                       expect=lambda n: n == 4, timeout=60)
        async with connect(url(service), additional_headers=bearer(token())) as ws:
            assert (await recv(ws))["type"] == "snapshot"
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"{http_base(service)}/metrics")).text
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    missing = sorted(name for name in wanted if name not in exported)
    assert not missing, f"the board queries metrics the reactor does not export: {missing}"
