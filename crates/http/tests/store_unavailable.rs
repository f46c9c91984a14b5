//! A database that cannot be reached is the server's temporary condition: every request that
//! needs it answers 503 with an OperationOutcome and `Retry-After`, within the connect timeout,
//! never a hang and never a 500. (PostgreSQL on a port where nothing listens: no cluster needed.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_store::postgres::{PgOptions, PgStore};
use common::*;

fn unreachable_server() -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let options = PgOptions {
        connect_timeout: Duration::from_secs(1),
        checkout_timeout: Duration::from_secs(2),
        ..PgOptions::default()
    };
    let store = PgStore::connect(&format!("postgres://bulkhead@127.0.0.1:{port}/bulkhead"), options).unwrap();
    Server::over_store(Arc::new(store), test_config())
}

#[tokio::test]
async fn requests_get_503_with_retry_after_while_the_database_is_unreachable() {
    let server = unreachable_server();
    let client = Client { id: "bh_someone".into(), secret: "not-checked".into() };
    for call in [
        get("/r4/Patient/p1").by(&client),
        put("/r4/Patient/p1").by(&client).json(&serde_json::json!({"resourceType": "Patient", "id": "p1"})),
        get("/bulk-data/r4/Group/g1/$export").by(&client),
        get("/healthz/ready"),
    ] {
        let started = Instant::now();
        let reply = server.send(call).await;
        assert!(started.elapsed() < Duration::from_secs(10), "answered in {:?}", started.elapsed());
        assert_outcome(&reply, 503, "transient", None);
        assert_eq!(reply.headers.get("retry-after").map(|value| value.to_str().unwrap()), Some("5"));
    }
    // The server itself is alive.
    assert_status(&server.send(get("/healthz/live")).await, 200);
}
