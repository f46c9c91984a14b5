//! Per-tenant request quotas and failed-login limits across two `bulkhead serve` processes on
//! one PostgreSQL database (docs/deploy.md, "Per-tenant quotas and failed-login limits hold
//! across instances"): the limits are rows of the database, so a client cannot double its
//! allowance by spreading its requests over the instances behind a load balancer.
//!
//! In-process limiters (each instance counting alone) fail both tests: the busy tenant would
//! get a full bucket and its refill from each instance (about twice the bound checked), and
//! the second instance would have counted one failure only, so it would check the credentials
//! instead of refusing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `tenant_requests_per_second` of both instances.
const RATE: u32 = 20;
/// How long the busy tenant hammers both instances.
const WINDOW: Duration = Duration::from_secs(3);
/// Concurrent request loops of the busy tenant per instance.
const LOOPS_PER_INSTANCE: usize = 6;
/// `failed_logins_per_client` of both instances.
const CLIENT_FAILURES: u32 = 5;

/// A server on `url` with a data directory of its own (nothing shared but the database).
async fn instance(url: &str, toml: &str) -> Server {
    Server::start_with(Options {
        database_url: Some(url.to_owned()),
        config_toml: Some(toml.to_owned()),
        ..Options::default()
    })
    .await
}

/// What the busy tenant's loops saw.
#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    /// One refusal's body, to check its shape.
    refusal: Option<Value>,
}

/// Sends `GET target` as fast as answers come until `until`; counts accepted (any status but
/// 429) and refused answers, checking every refusal's `Retry-After`.
async fn hammer(api: Api, target: String, until: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < until {
        let reply = api.get(&target).await;
        match reply.status {
            429 => {
                let retry_after = reply.header("retry-after").expect("a 429 carries Retry-After");
                let seconds: u64 = retry_after.parse().unwrap_or_else(|_| panic!("Retry-After {retry_after:?}"));
                assert!((1..=60).contains(&seconds), "Retry-After {seconds}");
                if tally.refusal.is_none() {
                    tally.refusal = Some(reply.expect_outcome(429));
                }
                tally.refused += 1;
            }
            200 => tally.accepted += 1,
            other => panic!("GET {target}: {other} {}", reply.text()),
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_tenants_request_rate_holds_across_two_instances_and_spares_other_tenants() {
    let Some(database) = bulkhead_store::postgres::testing::fresh_database() else { return };
    let toml = format!("tenant_requests_per_second = {RATE}\n");
    let one = instance(&database.url, &toml).await;
    let two = instance(&database.url, &toml).await;
    one.create_tenant("busy");
    one.create_tenant("quiet");
    let busy_one = one.create_client("busy");
    let busy_two = Api { base: two.base.clone(), ..busy_one.clone() };
    let quiet_one = one.create_client("quiet");
    let quiet_two = Api { base: two.base.clone(), ..quiet_one.clone() };
    busy_one.upsert(&patient(Some("b1"), "Busy")).await;
    quiet_one.upsert(&patient(Some("q1"), "Quiet")).await;
    // Whatever the setup drew is back in the bucket (a full second of it) before the window.
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let started = Instant::now();
    let until = started + WINDOW;
    let mut loops = Vec::new();
    for _ in 0..LOOPS_PER_INSTANCE {
        for api in [&busy_one, &busy_two] {
            loops.push(tokio::spawn(hammer(api.clone(), "/r4/Patient/b1".to_owned(), until)));
        }
    }
    // Meanwhile the quiet tenant reads at a quarter of its own rate, alternating instances,
    // and is served every time.
    let mut quiet_reads = 0;
    while Instant::now() < until {
        let api = if quiet_reads % 2 == 0 { &quiet_one } else { &quiet_two };
        let reply = api.get("/r4/Patient/q1").await;
        assert_eq!(reply.status, 200, "the quiet tenant is served while the busy one is throttled: {}", reply.text());
        quiet_reads += 1;
        tokio::time::sleep(Duration::from_secs(1) / (RATE / 4)).await;
    }
    let mut total = Tally::default();
    for tally in loops {
        let tally = tally.await.expect("a request loop");
        total.accepted += tally.accepted;
        total.refused += tally.refused;
        total.refusal = total.refusal.or(tally.refusal);
    }
    let elapsed = started.elapsed().as_secs_f64();

    // The bucket holds one second (RATE) and refills at RATE per second; beyond it, each
    // instance may serve what it drew and had not spent: at most a batch, a tenth of the bucket.
    let batch = (f64::from(RATE) / 10.0).max(1.0);
    let bound = f64::from(RATE) * (1.0 + elapsed) + 2.0 * batch;
    let sent = total.accepted + total.refused;
    eprintln!(
        "shared_quotas: {sent} requests in {elapsed:.2} s, {} accepted (bound {bound:.0}), {} refused; {quiet_reads} quiet reads",
        total.accepted, total.refused
    );
    assert!(
        sent as f64 >= 2.0 * bound,
        "only {sent} requests were sent in {elapsed:.2} s: too few to tell a shared limit from two separate ones"
    );
    assert!(
        total.accepted as f64 <= bound,
        "{} requests accepted across both instances in {elapsed:.2} s at {RATE}/s: more than the shared bucket gives ({bound:.0})",
        total.accepted
    );
    assert!(
        total.accepted as f64 >= f64::from(RATE) * WINDOW.as_secs_f64() / 2.0,
        "only {} requests accepted: the limit throttles below its rate",
        total.accepted
    );
    let outcome = total.refusal.expect("requests beyond the rate are refused");
    assert_eq!(outcome["issue"][0]["code"], "throttled", "{outcome}");
    assert!(quiet_reads >= 2, "the quiet tenant was tested on both instances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_failed_logins_counted_on_one_instance_lock_the_client_out_on_the_other() {
    let Some(database) = bulkhead_store::postgres::testing::fresh_database() else { return };
    // Only the per-client limit is low: the per-peer one (every request here comes from
    // 127.0.0.1) stays out of the way.
    let toml = format!(
        "failed_logins_per_client = {CLIENT_FAILURES}\nfailed_logins_per_peer = 1000\nfailed_login_window_seconds = 60\n"
    );
    let one = instance(&database.url, &toml).await;
    let two = instance(&database.url, &toml).await;
    one.create_tenant("acme");
    let good_one = one.create_client("acme");
    let good_two = Api { base: two.base.clone(), ..good_one.clone() };
    let other_two = Api { base: two.base.clone(), ..one.create_client("acme") };
    let wrong_one = good_one.with_secret(&good_one.client_id, "not-the-secret");
    let wrong_two = Api { base: two.base.clone(), ..wrong_one.clone() };
    assert_eq!(good_two.get("/r4/Patient").await.status, 200, "the client works on instance 2");

    // All failures but the last on instance 1, the last on instance 2.
    for _ in 1..CLIENT_FAILURES {
        assert_eq!(wrong_one.get("/r4/Patient").await.status, 401);
    }
    assert_eq!(wrong_two.get("/r4/Patient").await.status, 401, "the limit's last failure is still checked");

    // Instance 2 counted one failure itself, and the store's count says the limit is reached.
    for api in [&wrong_two, &good_two] {
        let reply = api.get("/r4/Patient").await;
        reply.expect_outcome(429);
        let retry_after: u64 = reply.header("retry-after").expect("Retry-After").parse().expect("seconds");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}: the rest of the window");
    }
    // Other clients (from the same peer) are not affected.
    assert_eq!(other_two.get("/r4/Patient").await.status, 200);
}
