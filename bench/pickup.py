"""Pickup latency as the benchmarks measure it, for the reactor and for the floor alike.

Rows are inserted one at a time at a steady rate; each one's latency runs from the moment the
inserting client's ``execute`` returned (the commit) to the moment the orchestrator double
received its ``POST /render``. Nearest-rank percentiles.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def http_json(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def measure(
    dsn: str, orch_url: str, n: int, rate: float, *, insert_sql: str, warm_sql: str,
    job_key: Callable[[Any], str] = str,
) -> dict[str, float]:
    """Insert 20 warm-up rows (``warm_sql``), then ``n`` rows (``insert_sql``: takes the payload
    as its one parameter and returns the new id) at ``rate`` per second; return n, p50_ms, p99_ms
    and max_ms. ``job_key`` turns a returned id into the ``job_id`` the double records."""
    commit_at: dict[str, float] = {}
    interval = 1.0 / rate
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(20):
            conn.execute(warm_sql)
            time.sleep(interval)
        time.sleep(0.5)
        http_json(f"{orch_url}/reset", "POST", {})
        next_at = time.perf_counter()
        for i in range(n):
            cur = conn.execute(insert_sql, (json.dumps({"topic": f"t{i}"}),))
            t = time.time()
            row = cur.fetchone()
            assert row
            commit_at[job_key(row[0])] = t
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    deadline = time.monotonic() + 30
    while True:
        reqs = http_json(f"{orch_url}/requests")
        if len(reqs) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lat = [(float(r["received_at"]) - commit_at[r["job_id"]]) * 1000 for r in reqs if r["job_id"] in commit_at]
    if not lat:
        raise RuntimeError("the double received none of the renders of the rows inserted")
    return {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat)}
