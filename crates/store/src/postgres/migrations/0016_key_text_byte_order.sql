-- (Idempotent, so a test that steps the schema back to an earlier version can re-run it.)
-- The text columns of the keys every write inserts into compare by bytes ("C" collation), as
-- `resources.id` and `patient_keys.patient_id` do since migration 7: the type of a resource (its
-- `(tenant, type, id)` key and `resources_by_type`), a search token's parameter, value and
-- system (`search_token_pkey`), and a reference's target type and id (`reference_index_pkey`,
-- `provenance_unresolved`). These are compared only for equality, which is the same under any
-- deterministic collation, so no result changes; but under a database whose default collation
-- is a language's (`en_US.UTF-8`, ICU), each of the ~200 key comparisons of a resource's index
-- inserts was a locale-aware comparison instead of a `memcmp`. Joins with columns of the
-- default collation take the non-default one. No row is rewritten; the indexes on these columns
-- are rebuilt (once, under the table's lock).
ALTER TABLE resources ALTER COLUMN resource_type TYPE text COLLATE "C";
ALTER TABLE search_token
    ALTER COLUMN param TYPE text COLLATE "C",
    ALTER COLUMN value TYPE text COLLATE "C",
    ALTER COLUMN system TYPE text COLLATE "C";
ALTER TABLE reference_index
    ALTER COLUMN target_type TYPE text COLLATE "C",
    ALTER COLUMN target_id TYPE text COLLATE "C";
