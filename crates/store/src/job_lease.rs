//! Leases on the background work of asynchronous export jobs, shared by every instance on one
//! store: an instance claims a due job under a lease it renews while it works; each claim
//! increments the job's fencing token, and every write of the work carries the token it was
//! claimed with, so a holder whose lease was taken over (it stalled, or was presumed dead) can
//! no longer write anything (see the "export job leases" methods of [`crate::Store`]).

use bulkhead_fhir::Micros;

use crate::TenantId;

/// One instance's claim on a job's work, valid until `expires` unless renewed. Writes made
/// under it succeed only while `fence` is still the job's newest token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLease {
    pub tenant: TenantId,
    pub job_id: String,
    /// The claiming instance's id.
    pub owner: String,
    /// The fencing token: incremented by every claim of the job.
    pub fence: i64,
    /// When the claim lapses (µs) unless renewed; another instance may then claim the job.
    pub expires: Micros,
}

/// A job as a claim hands it over: the lease, the work its kick-off stored, and what earlier
/// holders recorded (a checkpoint, and the parts they finished), so the new holder resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedJob {
    pub lease: JobLease,
    /// What to do, as the kick-off stored it (text owned by the caller; empty for a job stored
    /// by [`crate::Store::create_export_job`], which no worker can run).
    pub work: String,
    /// The checkpoint an earlier holder saved, if any.
    pub checkpoint: Option<String>,
    /// Parts recorded by earlier holders, by ascending index.
    pub parts: Vec<JobPart>,
    /// How many earlier claims ended with their holder handing the job back
    /// ([`crate::Store::hand_back_export_job`]: its instance was stopping) rather than losing
    /// the lease.
    pub handed_back: i64,
}

impl ClaimedJob {
    /// The claims of the job, this one included, that did not follow a hand-back: the ones
    /// whose holder died, froze or lost its lease. A job that keeps killing its workers shows
    /// here; one that lived through graceful restarts does not.
    pub fn interrupted_claims(&self) -> i64 {
        self.lease.fence.saturating_sub(self.handed_back)
    }
}

/// One finished part of a job's work (a materialised file): recorded under the lease, so a
/// holder that takes the job over does not redo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPart {
    pub index: u32,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the part's bytes.
    pub sha256: String,
    pub lines: u64,
}

/// The answer to [`crate::Store::enqueue_export_job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAdmission {
    /// Stored, due at once.
    Queued,
    /// Not stored: the tenant already has `unfinished` jobs, at or beyond the cap.
    AtCap { unfinished: u64 },
}

/// Who works on a job now and how far it got, for status polls on any instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobActivity {
    /// The instance holding (or last holding) the lease; `None` before the first claim.
    pub owner: Option<String>,
    /// When the lease lapses (µs); 0 before the first claim.
    pub lease_expires: Micros,
    pub fence: i64,
    /// The holder's last progress text (empty before its first renewal).
    pub progress: String,
}
