-- 0010_positions: a stand-in on the `schedules` branch for the migration of the `positions` branch
-- (queue positions at any depth), which is not merged yet and keeps this number. Migrations are
-- numbered without gaps, so 0011_schedules needs a 0010 to follow. When merging, take the
-- `positions` branch's 0010_positions.sql (and its rollback) in place of this file.

INSERT INTO reactor.schema_migrations (version, name) VALUES (10, 'positions');
