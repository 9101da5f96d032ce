-- 0003_alerts: the state of the reactor's own alerts, shared by the fleet.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0003_alerts.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 2` (sql/rollback/0003_alerts.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- Every reactor evaluates the alerts (reactor/alerts.py); one evaluation at a time, fleet-wide, under
-- a transaction-level advisory lock. A change of state is an UPDATE of the alert's row that only
-- matches while the row still holds the old state, so of any number of reactors exactly one flips
-- it, and only that one logs it, sends NOTIFY reactor_alerts and posts the webhook.

CREATE TABLE reactor.alerts (
    name       text PRIMARY KEY,
    firing     boolean NOT NULL DEFAULT false,
    -- when it last fired or resolved (NULL: never fired)
    since      timestamptz,
    -- the figure and the threshold of the last change (kept current while firing)
    value      double precision,
    threshold  double precision,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- the reactor whose evaluation made the last change
    changed_by text
);
COMMENT ON TABLE reactor.alerts IS
    'One row per alert of the reactor (queue_depth, failed_per_hour, avg_wait, oldest_queued, '
    'render_farm_unreachable): firing or not, since when, with the figure and the threshold. Written '
    'by the reactors (reactor/alerts.py); read it to see what is firing.';

INSERT INTO reactor.alerts (name) VALUES
    ('queue_depth'), ('failed_per_hour'), ('avg_wait'), ('oldest_queued'), ('render_farm_unreachable');

INSERT INTO reactor.schema_migrations (version, name) VALUES (3, 'alerts');
