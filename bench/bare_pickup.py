"""The floor for pickup latency: a bare INSERT, trigger NOTIFY, claim and one HTTP POST.

    python3 bench/bare_pickup.py --dsn DSN --orchestrator-url URL [--jobs 1500] [--rate 50]

What the issue calls "a few lines of code": a table with a NOTIFY trigger, one process that
LISTENs, claims the oldest queued row with ``FOR UPDATE SKIP LOCKED`` (autocommit, durable) and
POSTs it to the orchestrator double, and an inserter at ``--rate`` rows/s. No limits, no events,
no leases, no retries. ``reactor_bench.py`` runs it beside the reactor on the same server and
double, so the reactor's pickup latency can be read against what this machine gives at all.
The table ``bare_jobs`` is created in the database (and dropped at the end).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import urllib.parse

import pickup
import psycopg

SETUP = """
CREATE TABLE bare_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status text NOT NULL DEFAULT 'queued',
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bare_jobs_queued ON bare_jobs (created_at, id) WHERE status = 'queued';
CREATE FUNCTION bare_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bare_jobs', NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bare_jobs_notify AFTER INSERT ON bare_jobs FOR EACH ROW EXECUTE FUNCTION bare_notify();
"""

CLAIM = """
UPDATE bare_jobs SET status = 'processing'
 WHERE id = (SELECT id FROM bare_jobs WHERE status = 'queued' ORDER BY created_at, id
             LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""


def worker(dsn: str, url: str) -> None:
    """LISTEN, claim, POST; until the parent closes stdin."""
    u = urllib.parse.urlsplit(url)
    orch = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80)
    with psycopg.connect(dsn, autocommit=True) as listen, psycopg.connect(dsn, autocommit=True) as claim:
        listen.execute("LISTEN bare_jobs")
        print("ready", flush=True)
        while True:
            for _ in listen.notifies(timeout=1.0):
                while row := claim.execute(CLAIM).fetchone():
                    body = json.dumps({"job_id": f"bare-{row[0]}", "job_type": "topic_short",
                                       "input": row[1].get("topic"), "style": "default",
                                       "length": "short", "voice": "default"})
                    orch.request("POST", "/render", body, {"content-type": "application/json"})
                    orch.getresponse().read()
                    claim.execute("UPDATE bare_jobs SET status = 'completed' WHERE id = %s", (row[0],))


def measure(dsn: str, url: str, n: int = 1500, rate: float = 50.0) -> dict[str, float]:
    """Run the bare worker as its own process and return pickup p50/p99/max in ms."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bare_jobs; DROP FUNCTION IF EXISTS bare_notify()")
        conn.execute(SETUP)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--dsn", dsn, "--orchestrator-url", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the bare worker did not start")
        return pickup.measure(
            dsn, url, n, rate,
            insert_sql="INSERT INTO bare_jobs (payload) VALUES (%s) RETURNING id",
            warm_sql="INSERT INTO bare_jobs (payload) VALUES ('{\"topic\": \"warm\"}')",
            job_key=lambda job_no: f"bare-{job_no}",
        )
    finally:
        proc.kill()
        proc.wait()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bare_jobs; DROP FUNCTION IF EXISTS bare_notify()")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--orchestrator-url", required=True)
    ap.add_argument("--jobs", type=int, default=1500)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.dsn, args.orchestrator_url)
        return 0
    r = measure(args.dsn, args.orchestrator_url, args.jobs, args.rate)
    print(f"bare pickup at {args.rate:g} jobs/s ({r['n']:.0f} jobs): p50 {r['p50_ms']:.2f} ms, "
          f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
