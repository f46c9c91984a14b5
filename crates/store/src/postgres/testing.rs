//! Test support: a fresh database per test on the cluster named by `BULKHEAD_TEST_DATABASE_URL`
//! (`scripts/with-postgres` starts one and sets it). Without the variable a PostgreSQL test is
//! skipped with a loud notice, unless `CI` is set: then it fails, so CI cannot pass by skipping.

use std::sync::atomic::{AtomicBool, Ordering};

use postgres::NoTls;

use super::{PgOptions, PgStore};

/// The variable naming the test cluster (a database URL any test may create databases with).
pub const URL_VARIABLE: &str = "BULKHEAD_TEST_DATABASE_URL";

/// A database of its own for one test, dropped (with its connections) when the test ends.
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
    name: String,
    admin_url: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (&self.admin_url, &self.name);
        super::off_runtime(|| {
            if let Ok(mut client) = postgres::Client::connect(admin_url, NoTls) {
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        });
    }
}

/// The admin URL, or `None` after the skip notice (a panic under `CI`).
pub fn cluster_url() -> Option<String> {
    static NOTICE: AtomicBool = AtomicBool::new(false);
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but {URL_VARIABLE} is not: run the tests under scripts/with-postgres")
        }
        _ => {
            if !NOTICE.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "\n*** SKIPPED: PostgreSQL tests need {URL_VARIABLE} (run: scripts/with-postgres cargo test ...) ***\n"
                );
            }
            None
        }
    }
}

/// A new, empty database on the test cluster (`None`: skipped, see [`cluster_url`]).
pub fn fresh_database() -> Option<TestDatabase> {
    fresh_database_with("")
}

/// [`fresh_database`] made with `options` appended to its `CREATE DATABASE` (e.g. a collation).
pub fn fresh_database_with(options: &str) -> Option<TestDatabase> {
    let admin_url = cluster_url()?;
    let name = format!("bulkhead_test_{}", uuid::Uuid::new_v4().simple());
    super::off_runtime(|| {
        let mut client = postgres::Client::connect(&admin_url, NoTls)
            .unwrap_or_else(|error| panic!("connecting to {URL_VARIABLE}: {error}"));
        client.batch_execute(&format!("CREATE DATABASE {name} {options}")).expect("create a test database");
    });
    Some(TestDatabase { url: with_database(&admin_url, &name), name, admin_url })
}

/// `url` with its database (the path) replaced by `name`, keeping any `?parameters`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |index| index + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |index| authority_start + index);
    format!("{}/{name}{query}", &base[..path_start])
}

/// A migrated store on its own database; the store closes before the database is dropped.
pub struct TestStore {
    store: PgStore,
    _database: TestDatabase,
}

impl std::ops::Deref for TestStore {
    type Target = PgStore;
    fn deref(&self) -> &PgStore {
        &self.store
    }
}

impl TestStore {
    /// The store and the guard that drops its database, to be kept as long as the store lives.
    pub fn into_parts(self) -> (PgStore, TestDatabase) {
        (self.store, self._database)
    }
}

/// Small pools: many tests run at once on one test cluster.
pub fn test_options() -> PgOptions {
    PgOptions { max_connections: 4, local_dir: std::env::temp_dir(), ..PgOptions::default() }
}

/// A fresh, migrated store (`None`: skipped, see [`cluster_url`]).
pub fn fresh_store() -> Option<TestStore> {
    let database = fresh_database()?;
    let store = PgStore::open(&database.url, test_options()).expect("open the test database");
    Some(TestStore { store, _database: database })
}

/// Whether the server was built with LZ4 compression (what migrations 11 and 14 check before
/// asking for it).
pub fn has_lz4(store: &PgStore) -> bool {
    store
        .with_read(|db| {
            let sql = "SELECT EXISTS (SELECT 1 FROM pg_settings
                                      WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals))";
            Ok(db.query_one(sql, &[])?.try_get(0)?)
        })
        .unwrap()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(super::with_database("postgres://u@127.0.0.1:5/postgres", "t"), "postgres://u@127.0.0.1:5/t");
        assert_eq!(super::with_database("postgres://u@h:5", "t"), "postgres://u@h:5/t");
        assert_eq!(super::with_database("postgres://u@h/x?sslmode=disable", "t"), "postgres://u@h/t?sslmode=disable");
    }
}
