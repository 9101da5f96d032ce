-- Rollback of the stand-in 0012 of the `fleet` branch (see that file): take the other branch's
-- rollback in its place when merging.

DELETE FROM reactor.schema_migrations WHERE version = 12;
