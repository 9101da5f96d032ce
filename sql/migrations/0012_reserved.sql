-- 0012: a stand-in on the `fleet` branch for the migration another branch is writing under this
-- number. Migrations are numbered without gaps, so 0013_fleet needs a 0012 to follow. When merging,
-- take that branch's 0012 (and its rollback) in place of this file.

INSERT INTO reactor.schema_migrations (version, name) VALUES (12, 'reserved');
