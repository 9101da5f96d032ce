-- Rollback of 0003_alerts: removes everything 0003 created, and nothing else.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0003_alerts.sql
-- Only the alerts' state is lost: an alert firing now fires again after the next migrate up.

DROP TABLE IF EXISTS reactor.alerts;
DELETE FROM reactor.schema_migrations WHERE version = 3;
