-- 0005_claim_plan: reactor.claim_jobs keeps one plan per connection.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0005_claim_plan.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 4` (sql/rollback/0005_claim_plan.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- With the planner free to choose, the claim was planned again on every call once the queue was
-- deep: for the parameters of the moment its custom plans looked cheaper than the generic one, and
-- planning the claim's statement cost more than running it. Measured (claims 10 ms apart, durable
-- server, the two interleaved): 1.71 ms a claim with 10,000 queued jobs, 1.17 with the plan kept;
-- with an empty queue 1.29 and 1.20. The plan is the same either way: the two queue indexes read
-- in order under a LIMIT.

ALTER FUNCTION reactor.claim_jobs(text, integer, interval, timestamptz) SET plan_cache_mode = force_generic_plan;

INSERT INTO reactor.schema_migrations (version, name) VALUES (5, 'claim_plan');
