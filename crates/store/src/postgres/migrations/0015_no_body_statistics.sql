-- (Idempotent, so a test that steps the schema back to an earlier version can re-run it.)
-- No planner statistics on resource bodies: no statement filters, joins or sorts on `body`, yet
-- `ANALYZE` (run at the end of every bulk load, and by autovacuum) sorted a sample of 30,000
-- bodies of ~1 KB each to build their histogram: half of the time it spent on `resources`
-- (0.32 s of 0.66 s for all tables after a 150,000-resource import). Statistics target 0 skips
-- the column; every other column keeps its statistics, and no row is touched.
ALTER TABLE resources ALTER COLUMN body SET STATISTICS 0;
ALTER TABLE resource_history ALTER COLUMN body SET STATISTICS 0;
