//! This instance's export worker: claims due export jobs from the store under a lease (any
//! instance's jobs: the store is shared), runs each on a blocking thread, and finishes it under
//! the lease's fencing token.
//!
//! A job's lease lasts `export_lease`; the holder renews it every third of a lease from a
//! heartbeat thread of its own, so one long step (a large cohort's plan on a loaded database)
//! does not cost the lease, for as long as the job reports progress (a plan step or a
//! materialised file) at least every [`STALL_LEASES`] leases. A holder that stops making progress
//! (its process died, froze or lost the database, or its work is stuck) lets the lease lapse,
//! and the next claim of any instance takes the job over with a new token: it resumes from the
//! checkpointed plan and skips the files already recorded. The old holder, should it wake up,
//! finds its token refused at its next write (heartbeat, part, checkpoint or finish) and stops
//! without writing anything. A job claimed more than [`MAX_CLAIMS`] times without a hand-back
//! before the claim (it keeps killing its holders) is failed instead of run again. A job whose work meets an unavailable database (an
//! outage, a restart) is not failed: its holder gives it back to be resumed once the database
//! answers again. Nor is a job whose instance shuts down (SIGTERM: a deploy, a scale-in): the
//! worker stops claiming, and each running job hands its lease back at its next step, so another
//! instance resumes it at once instead of a whole lease later ([`drain`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bulkhead_export::{ExportError, PlanStep};
use bulkhead_fhir::{now_micros, operation_outcome, Issue, IssueType, Micros};
use bulkhead_store::{ClaimedJob, ExportJobState, JobLease, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::export_status::{failure, Planner, Progress};
use crate::export_work::{ExportWork, WorkStop};
use crate::state::AppState;

/// Jobs one instance runs at once (each on a blocking thread).
pub const WORKER_SLOTS: usize = 4;

/// Interrupted claims of one job ([`ClaimedJob::interrupted_claims`]: not those that follow a
/// graceful hand-back) after which it is failed rather than run again.
pub const MAX_CLAIMS: i64 = 5;

/// How many leases a job may go without reporting progress before its heartbeat stops renewing
/// the lease (so a stuck worker's job is taken over, while a long step is not).
pub const STALL_LEASES: u32 = 10;

fn micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

/// Wakes this instance's worker (starting it on first use) to claim due jobs now.
pub fn wake(state: &AppState) {
    start(state);
    state.planners.wake.notify_one();
}

/// Starts this instance's worker loop, once (on the current runtime): `serve` starts it, so an
/// instance takes over jobs of dead ones without a kick-off of its own; a kick-off or a poll
/// starts it otherwise.
pub fn start(state: &AppState) {
    if state.planners.started.swap(true, Ordering::AcqRel) {
        return;
    }
    tracing::info!(instance = %state.planners.instance, lease_seconds = state.config.export_lease.as_secs_f64(), "export worker started");
    tokio::spawn(claim_loop(state.clone()));
}

/// Claims due jobs while a slot is free, then waits for a wake-up or the next look.
async fn claim_loop(state: AppState) {
    let slots = Arc::new(Semaphore::new(state.planners.slots));
    let lease = state.config.export_lease;
    // A lapsed lease is noticed within a quarter of a lease (between 0.1 s and 1 s).
    let idle = (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    while !state.planners.draining.load(Ordering::Acquire) {
        // A job is claimed only with a worker slot and a place in the server-wide planning pool
        // (`max_concurrent_plans`, shared with synchronous kick-offs); without one it waits.
        while let Some((slot, planning)) = slots
            .clone()
            .try_acquire_owned()
            .ok()
            .and_then(|slot| Some((slot, state.planning_slots.clone().try_acquire_owned().ok()?)))
        {
            let owner = state.planners.instance.clone();
            let claimed =
                state.blocking(move |store| Ok(store.claim_export_job(&owner, now_micros(), micros(lease))?)).await;
            match claimed {
                Ok(Some(job)) => run_claimed(&state, job, (slot, planning)),
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(status = %error.status, "claiming export jobs failed; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            _ = state.planners.wake.notified() => {}
            _ = tokio::time::sleep(idle) => {}
        }
    }
}

/// How often [`drain`] looks whether the running jobs have handed their leases back.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Shuts this instance's worker down (the server is stopping): it claims no more jobs, and each
/// job it runs stops at its next step (a plan step or a written file) and hands its lease back,
/// due at once, so any other instance's next claim resumes it from its checkpoint and recorded
/// files. Returns once no job runs here, or when `within` has passed (a job in one long step;
/// its lease then lapses as if the process had died). Whatever a job had not recorded is redone
/// by its next holder.
pub async fn drain(state: &AppState, within: Duration) {
    state.planners.draining.store(true, Ordering::Release);
    state.planners.wake.notify_one();
    let running = state.planners.running();
    if running == 0 {
        return;
    }
    tracing::info!(running, "shutting down: export jobs hand their leases back");
    let deadline = Instant::now() + within;
    while state.planners.running() > 0 {
        if Instant::now() >= deadline {
            let running = state.planners.running();
            tracing::warn!(running, "export jobs did not stop in time: their leases lapse instead");
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Runs a claimed job on a blocking thread, holding `slot`. Whatever happens to it (done,
/// failed, lease lost, panicked), the job is registered here until its row is finished.
fn run_claimed(state: &AppState, claimed: ClaimedJob, slot: (OwnedSemaphorePermit, OwnedSemaphorePermit)) {
    let lease = claimed.lease.clone();
    let planner = state.planners.register(lease.tenant, &lease.job_id);
    tracing::info!(job = %lease.job_id, tenant = lease.tenant.0, fence = lease.fence, parts_done = claimed.parts.len(), "export job claimed");
    let state = state.clone();
    tokio::spawn(async move {
        let (work_state, work_planner) = (state.clone(), planner.clone());
        let ran = tokio::task::spawn_blocking(move || work(&work_state, claimed, &work_planner)).await;
        if let Err(join_error) = ran {
            tracing::error!(job = %lease.job_id, error = %join_error, "export job panicked");
            let (failed, body) = failure(ApiError::internal());
            let finish_lease = lease.clone();
            let _ =
                state.blocking(move |store| Ok(store.finish_leased_export_job(&finish_lease, failed, &body)?)).await;
        }
        state.planners.unregister(lease.tenant, &lease.job_id, &planner);
        let tenant = lease.tenant;
        if let Ok(unfinished) =
            state.blocking(move |store| Ok(store.unfinished_export_jobs(tenant, now_micros())?)).await
        {
            crate::quotas::note_exports_running(&state, tenant, unfinished);
        }
        drop(slot);
        state.planners.wake.notify_one();
    });
}

/// The lease as its holder keeps it: renewed by [`Heartbeat::keep`]'s thread and from the
/// progress callback, lost for good once a renewal is refused.
struct Heartbeat<'a> {
    state: &'a AppState,
    lease: &'a JobLease,
    renewed: Mutex<Instant>,
    /// The last progress reported, and when.
    progress: Mutex<(Instant, String)>,
    lost: std::sync::atomic::AtomicBool,
}

impl Heartbeat<'_> {
    /// Records progress, and renews the lease when a third of it has passed since the last
    /// renewal; false once lost.
    fn beat(&self, progress: &str) -> bool {
        *self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = (Instant::now(), progress.to_owned());
        self.renew()
    }

    /// Renews the lease when a third of it has passed since the last renewal; false once lost.
    fn renew(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return false;
        }
        let lease_for = self.state.config.export_lease;
        let mut renewed = self.renewed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if renewed.elapsed() < lease_for / 3 {
            return true;
        }
        let progress = self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).1.clone();
        match self.state.store.renew_export_job_lease(self.lease, now_micros(), micros(lease_for), &progress) {
            Ok(true) => *renewed = Instant::now(),
            Ok(false) => {
                tracing::warn!(job = %self.lease.job_id, fence = self.lease.fence, "export job lease lost: stopping");
                self.lost.store(true, Ordering::Release);
                return false;
            }
            // A failed renewal is retried at the next beat; the lease may lapse meanwhile, and
            // then the next fenced write tells.
            Err(error) => {
                tracing::warn!(job = %self.lease.job_id, error = %error, "renewing an export job lease failed")
            }
        }
        true
    }

    /// Renews the lease in the background until `stop` is dropped (or the lease is lost), while
    /// the job reported progress within [`STALL_LEASES`] leases.
    fn keep(&self, stop: std::sync::mpsc::Receiver<()>) {
        let lease_for = self.state.config.export_lease;
        let stalled = lease_for * STALL_LEASES;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(lease_for / 6) {
            let since_progress = self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.elapsed();
            if since_progress < stalled && !self.renew() {
                return;
            }
        }
    }
}

/// Runs the claimed job's work and finishes the job under its lease (blocking).
fn work(state: &AppState, claimed: ClaimedJob, planner: &Planner) {
    let interrupted_claims = claimed.interrupted_claims();
    let ClaimedJob { lease, work, checkpoint, parts, .. } = claimed;
    let store = state.store.as_ref();
    let started = Instant::now();
    let finish_or_log = |job_state: ExportJobState, body: &str| {
        store.finish_leased_export_job(&lease, job_state, body).unwrap_or_else(|error| {
            tracing::error!(job = %lease.job_id, error = %error, "finishing an export job failed");
            false
        })
    };
    // A stopping instance hands its jobs back (a deploy restarts every instance): only the
    // claims that followed a lost lease tell of a job that kills its workers.
    if interrupted_claims > MAX_CLAIMS {
        tracing::error!(job = %lease.job_id, claims = lease.fence, interrupted_claims, "export job interrupted too often: failing it");
        let (failed, body) = server_failure("this export was interrupted too often; kick the export off again");
        finish_or_log(failed, &body);
        return;
    }
    let Ok(work) = ExportWork::from_json(&work) else {
        // A job stored before jobs had work (an older version planned it in its own process).
        tracing::warn!(job = %lease.job_id, "export job without work: failing it");
        let (failed, body) =
            server_failure("the server restarted while this export was being planned; kick the export off again");
        finish_or_log(failed, &body);
        return;
    };
    let heartbeat = Heartbeat {
        state,
        lease: &lease,
        renewed: Mutex::new(Instant::now()),
        progress: Mutex::new((Instant::now(), "claimed".to_owned())),
        lost: false.into(),
    };
    let hook = state.planners.hook.clone();
    let progress = |step: PlanStep| {
        planner.progress.send_replace(Progress::At(step));
        if let Some(hook) = &hook {
            hook(step)?;
        }
        if planner.cancelled.load(Ordering::Acquire)
            || state.planners.draining.load(Ordering::Acquire)
            || !heartbeat.beat(&step.to_string())
        {
            return Err(ExportError::Cancelled);
        }
        Ok(())
    };
    let result = std::thread::scope(|scope| {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let heartbeat = &heartbeat;
        scope.spawn(move || heartbeat.keep(stopped));
        let result = crate::export_work::run(state, &work, &lease, checkpoint.as_deref(), &parts, &progress);
        drop(stop);
        result
    });
    let millis = started.elapsed().as_millis() as u64;
    let finish = |job_state: ExportJobState, body: &str| store.finish_leased_export_job(&lease, job_state, body);
    let finished = match result {
        Ok(manifest) => {
            tracing::info!(job = %lease.job_id, fence = lease.fence, millis, "export job complete");
            finish(ExportJobState::Complete, &manifest)
        }
        // The database (or the disk check) is unavailable for now: the job is not the problem,
        // so it is not failed; it waits and runs again, resuming from what is recorded.
        Err(WorkStop::Failed(error)) if error.status == StatusCode::SERVICE_UNAVAILABLE => {
            tracing::warn!(job = %lease.job_id, fence = lease.fence, millis, "export job paused: the database is unavailable");
            match pause_for_outage(state, &lease) {
                LeaseAfterOutage::Gone => Ok(false),
                LeaseAfterOutage::Shortened | LeaseAfterOutage::Lapsing => return,
            }
        }
        Err(WorkStop::Failed(error)) => {
            tracing::info!(job = %lease.job_id, status = %error.status, millis, "export job failed");
            let (failed, body) = failure(error);
            let finished = finish(failed, &body);
            if matches!(finished, Ok(true)) {
                // Only while the lease held: a new holder writes the same keys.
                remove_output(state, &lease, work.materialise);
            }
            finished
        }
        // Stopped by the shutdown, not by a lost lease or a cancel: the job goes to another
        // instance.
        Err(WorkStop::LeaseLost)
            if state.planners.draining.load(Ordering::Acquire)
                && !heartbeat.lost.load(Ordering::Acquire)
                && !planner.cancelled.load(Ordering::Acquire) =>
        {
            return hand_back(state, &lease);
        }
        Err(WorkStop::LeaseLost) => Ok(false),
    };
    let finished = match finished {
        Ok(finished) => finished,
        Err(StoreError::Unavailable(detail)) => {
            tracing::warn!(job = %lease.job_id, error = %detail, "finishing an export job failed: the database is unavailable");
            match pause_for_outage(state, &lease) {
                LeaseAfterOutage::Gone => false,
                LeaseAfterOutage::Shortened | LeaseAfterOutage::Lapsing => return,
            }
        }
        Err(error) => {
            tracing::error!(job = %lease.job_id, error = %error, "finishing an export job failed");
            false
        }
    };
    if !finished {
        // Cancelled (the row is gone: remove what this holder wrote), or taken over by another
        // instance (which writes the same keys: leave them).
        match store.export_job(lease.tenant, &lease.job_id) {
            Ok(None) => {
                tracing::info!(job = %lease.job_id, "export job cancelled: result discarded");
                remove_output(state, &lease, work.materialise);
            }
            Ok(Some(_)) => {
                tracing::info!(job = %lease.job_id, fence = lease.fence, "export job taken over: result discarded")
            }
            Err(error) => tracing::warn!(job = %lease.job_id, error = %error, "looking up a stopped export job failed"),
        }
    }
}

/// How soon a job paused by an unavailable database is due again once the database answers.
const RESUME_AFTER_OUTAGE: Duration = Duration::from_secs(1);

/// What became of a lease its holder gave back after an outage.
enum LeaseAfterOutage {
    /// Due again in [`RESUME_AFTER_OUTAGE`].
    Shortened,
    /// The database stayed unreachable: the lease lapses as it would have.
    Lapsing,
    /// Taken over or cancelled meanwhile: nothing of the job is this holder's any more.
    Gone,
}

/// Gives a job whose work stopped on an unavailable database back to the queue: its lease is
/// shortened to [`RESUME_AFTER_OUTAGE`], so any instance's next claim resumes it (from its
/// checkpoint and recorded files) soon after the database is back, rather than a whole lease
/// later. While the database stays unreachable this retries, until the lease has lapsed anyway.
fn pause_for_outage(state: &AppState, lease: &JobLease) -> LeaseAfterOutage {
    let started = Instant::now();
    let until_lapsed = state.config.export_lease;
    loop {
        match state.store.renew_export_job_lease(
            lease,
            now_micros(),
            micros(RESUME_AFTER_OUTAGE),
            "waiting for the database",
        ) {
            Ok(true) => {
                tracing::info!(job = %lease.job_id, "export job queued again");
                return LeaseAfterOutage::Shortened;
            }
            Ok(false) => return LeaseAfterOutage::Gone,
            Err(_) if started.elapsed() >= until_lapsed => return LeaseAfterOutage::Lapsing,
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Gives the lease of a job this instance stopped at shutdown back, due at once and counted as
/// a hand-back, not an interruption (one attempt: should it fail, the lease lapses as it would
/// have, and the next claim counts as an interrupted one).
fn hand_back(state: &AppState, lease: &JobLease) {
    match state.store.hand_back_export_job(lease, now_micros(), "handed back by a stopping instance") {
        Ok(true) => {
            tracing::info!(job = %lease.job_id, fence = lease.fence, "export job handed back: this instance is stopping")
        }
        Ok(false) => tracing::info!(job = %lease.job_id, "export job taken over or cancelled while stopping"),
        Err(error) => {
            tracing::warn!(job = %lease.job_id, error = %error, "handing an export job back failed: its lease lapses instead")
        }
    }
}

/// A server-side failure's status and OperationOutcome.
fn server_failure(diagnostics: &str) -> (ExportJobState, String) {
    let failed = ExportJobState::Failed { status: StatusCode::INTERNAL_SERVER_ERROR.as_u16() };
    (failed, operation_outcome(&[Issue::error(IssueType::Exception, diagnostics)]).to_string())
}

/// Deletes the job's output objects (a failed or cancelled job's); failures are logged, and
/// the expiry sweep removes what is left.
fn remove_output(state: &AppState, lease: &JobLease, materialised: bool) {
    let Some(output) = state.output.as_ref().filter(|_| materialised) else { return };
    let runtime = tokio::runtime::Handle::current();
    if let Err(error) = runtime.block_on(output.delete_job(lease.tenant, &lease.job_id)) {
        tracing::error!(job = %lease.job_id, error = %error, "removing a stopped job's output failed");
    }
}
