-- Rollback of 0016_one_write_cycle: the reactor's cycle goes back to finish_settle_and_claim() (sql/queries.sql
-- of the release before), which 0016 left in place.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0016_one_write_cycle.sql

DROP FUNCTION reactor.run_cycle(jsonb, text, integer, interval, timestamptz, jsonb);
DROP FUNCTION reactor.journal_newest();

DELETE FROM reactor.schema_migrations WHERE version = 16;
