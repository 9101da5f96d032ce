"""What ``get_queue_stats()`` costs as the last hour's finished jobs grow, and how often the feed reads it.

    python3 bench/stats_bench.py [--finished 36000,360000] [--calls 7] [--share 0.05]

Starts a private durable PostgreSQL and, for each count, a fresh migrated database with that many
jobs completed over the last 58 minutes (as a queue at count/3600 jobs/s sustained would hold:
360,000 is 100 jobs/s), vacuumed and analysed. Prints the median wall time of ``SELECT * FROM
get_queue_stats()`` over ``--calls`` calls, its buffers (EXPLAIN ANALYZE), and the interval at which
the feed reads it for its admins' ``stats`` messages: max(``stats_interval_s``, read time /
``stats_share``), README "Live feed"; with the share at 1.0 the interval alone (once a second).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reactor.db.embedded import EmbeddedPostgres  # noqa: E402
from reactor.db.migrations import migrate_up  # noqa: E402
from reactor.web.settings import FeedSettings  # noqa: E402

LOAD = """
INSERT INTO reactor.jobs (job_type, priority, payload, status, renderer, created_at, started_at, completed_at,
                          updated_at, result, attempt)
SELECT 'topic_short', 'medium', jsonb_build_object('topic', 't' || g), 'completed', 'revideo',
       now() - make_interval(secs => 3480.0 * g / %(n)s) - interval '5 seconds',
       now() - make_interval(secs => 3480.0 * g / %(n)s) - interval '3 seconds',
       now() - make_interval(secs => 3480.0 * g / %(n)s),
       now() - make_interval(secs => 3480.0 * g / %(n)s),
       '{"video_url": "https://v/x.mp4"}', 1
  FROM generate_series(1, %(n)s) g
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finished", default="36000,360000", help="jobs finished in the last hour, comma-separated")
    ap.add_argument("--calls", type=int, default=7)
    defaults = {f.name: f.default for f in fields(FeedSettings)}
    ap.add_argument("--share", type=float, default=defaults["stats_share"])
    args = ap.parse_args()
    interval = float(defaults["stats_interval_s"])  # type: ignore[arg-type]
    with EmbeddedPostgres(settings={"max_connections": "50"}) as server:
        print(f"PostgreSQL: durable defaults; stats_interval_s {interval}, stats_share {args.share}", flush=True)
        print(f"{'finished, last hour':>20} | {'get_queue_stats() p50':>21} | {'buffers':>8} | "
              f"{'feed reads every':>16} | {'without the share':>17}")
        for n in (int(x) for x in args.finished.split(",")):
            name = f"stats_{n}"
            with psycopg.connect(server.dsn_for("postgres"), autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            dsn = server.dsn_for(name)
            migrate_up(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(LOAD, {"n": n})
                conn.execute("VACUUM ANALYZE reactor.jobs")
                conn.execute("SELECT * FROM public.get_queue_stats()").fetchall()  # warm
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    conn.execute("SELECT * FROM public.get_queue_stats()").fetchall()
                    times.append(time.perf_counter() - t0)
                plan = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM public.get_queue_stats()")]
            buffers = next((line.split("Buffers:")[1].strip() for line in plan if "Buffers:" in line), "?")
            hits = sum(int(part.split("=")[1]) for part in buffers.split() if "=" in part)
            spent = statistics.median(times)
            print(f"{n:>20,} | {spent * 1000:>18.1f} ms | {hits:>8,} | {max(interval, spent / args.share):>14.1f} s | "
                  f"{max(interval, spent):>15.1f} s", flush=True)
            with psycopg.connect(server.dsn_for("postgres"), autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
