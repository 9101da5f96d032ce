-- Rollback of 0006_payload_guard: payloads are no longer checked at INSERT (the reactor still fails
-- a job whose payload it cannot use, alone).
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0006_payload_guard.sql

DROP TRIGGER jobs_payload_guard_update ON reactor.jobs;
DROP TRIGGER jobs_payload_guard_insert ON reactor.jobs;
DROP FUNCTION reactor.jobs_payload_guard();
DROP FUNCTION reactor.payload_problem(jsonb, text);
DELETE FROM reactor.schema_migrations WHERE version = 6;
