-- Text keys that SQL sorts sort by bytes ("C" collation), as in the SQLite store, whatever the
-- database's default collation: the Patient ids of a Patient-level export and a Group's members
-- are binary-searched and merged with lists sorted in Rust (by bytes), and tenant names, client
-- ids, job ids and audit patients are listed in the same order on both stores. Changing a
-- column's collation keeps its rows; the indexes on it are rebuilt. (Text compared only for
-- equality is the same under any deterministic collation and stays as it is.)
ALTER TABLE tenants ALTER COLUMN name TYPE text COLLATE "C";
ALTER TABLE clients ALTER COLUMN client_id TYPE text COLLATE "C";
ALTER TABLE client_registrations ALTER COLUMN client_id TYPE text COLLATE "C";
ALTER TABLE assertion_jtis ALTER COLUMN client_id TYPE text COLLATE "C";
ALTER TABLE resources ALTER COLUMN id TYPE text COLLATE "C";
ALTER TABLE patient_keys ALTER COLUMN patient_id TYPE text COLLATE "C";
ALTER TABLE export_jobs ALTER COLUMN job_id TYPE text COLLATE "C";
ALTER TABLE export_job_parts ALTER COLUMN job_id TYPE text COLLATE "C";
ALTER TABLE audit_patient ALTER COLUMN patient_id TYPE text COLLATE "C";
