-- Rollback of 0005_claim_plan: the planner chooses again for reactor.claim_jobs.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0005_claim_plan.sql

ALTER FUNCTION reactor.claim_jobs(text, integer, interval, timestamptz) RESET plan_cache_mode;
DELETE FROM reactor.schema_migrations WHERE version = 5;
