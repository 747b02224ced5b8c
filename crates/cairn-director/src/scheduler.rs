//! The scheduler: jobs run when their schedule comes due.
//!
//! Each job keeps its next due time in the catalog (`next_run`), so a restart neither runs it
//! again nor skips it silently: at the first tick after the server starts, a job whose due time
//! passed while the server was down runs once (trigger `missed`), however many times it was due,
//! and its next due time is counted from now. The scheduler ticks every few seconds; schedules
//! have a resolution of one minute.

use crate::catalog::Catalog;
use crate::runner::Runner;
use anyhow::Result;
use cairn_schedule::Schedule;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use std::sync::Arc;

/// The next due time of `schedule` after `now`, as the catalog keeps it.
pub fn next_run(schedule: &Schedule, now: Timestamp, tz: &TimeZone) -> Option<String> {
    schedule.next_after(now, tz).map(|z| z.timestamp().to_string())
}

/// One pass over the jobs at `now`: those due are started. `first` says this is the server's
/// first pass, when a due time already past was missed while it was down.
pub fn tick(catalog: &Catalog, runner: &Arc<Runner>, now: Timestamp, tz: &TimeZone, first: bool) -> Result<()> {
    for job in catalog.jobs()? {
        let Some(text) = &job.spec.schedule else { continue };
        let Ok(schedule) = Schedule::parse(text) else { continue }; // checked when stored
        let due = job.next_run.as_deref().and_then(|d| d.parse::<Timestamp>().ok());
        let Some(due) = due else {
            catalog.set_next_run(job.id, next_run(&schedule, now, tz))?;
            continue;
        };
        if due > now {
            continue;
        }
        catalog.set_next_run(job.id, next_run(&schedule, now, tz))?;
        if !job.spec.enabled {
            continue;
        }
        let trigger = if first { "missed" } else { "schedule" };
        match runner.submit(job.id, job.spec.clone(), trigger, "scheduler") {
            Ok(task) => {
                if first {
                    let _ = catalog.log(task.id, &format!("due at {due} while the server was down: run once now"));
                }
            }
            // Still running from its last time: this run is skipped (the next one stays due).
            Err(e) => eprintln!("job {}: not started at its due time {due}: {e:#}", job.spec.name),
        }
    }
    Ok(())
}
