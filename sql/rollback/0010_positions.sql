-- Rollback of the stand-in 0010_positions of the `schedules` branch (see that file): take the
-- `positions` branch's rollback in its place when merging.

DELETE FROM reactor.schema_migrations WHERE version = 10;
