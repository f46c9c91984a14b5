//! Bulk export: kick-off parameters, plans, signed file tokens, and NDJSON file production.

pub mod associated;
pub mod elements;
pub mod files;
pub mod group;
pub mod level;
pub mod params;
pub mod prefer;
pub mod record;
pub mod retention;
pub mod token;

pub use group::{
    check_group, plan_group_export, plan_group_export_at, ExportError, GroupExportPlan, GroupExportRequest,
    PlanProgress, PlanStep,
};
pub use level::ExportLevel;
