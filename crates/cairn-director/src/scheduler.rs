//! The scheduler: jobs run when their schedule comes due.
//!
//! Each job keeps its next due time in the catalog (`next_run`), so a restart neither runs it
//! again nor skips it silently: at the first tick after the server starts, a job whose due time
//! passed while the server was down runs once (trigger `missed`), however many times it was due,
//! and its next due time is counted from now; so does a job whose scheduled run the stop
//! interrupted. The scheduler ticks every few seconds; schedules have a resolution of one minute.
//!
//! It also watches for silence: a scheduled job with no good run (a task ended `ok`) past the
//! second due time after its last good one, plus slack ([`overdue_at`]), gets one alert (mail,
//! webhook: its `notify`), sent again only after a good run and a new silence. Counting from the
//! last good run (not from now) keeps irregular schedules (`mon..fri 22:00`) from alerting every
//! weekend.

use crate::catalog::{Catalog, Job, TaskState};
use crate::runner::Runner;
use crate::Settings;
use anyhow::Result;
use cairn_schedule::Schedule;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use std::sync::Arc;

/// The next due time of `schedule` after `now`, as the catalog keeps it.
pub fn next_run(schedule: &Schedule, now: Timestamp, tz: &TimeZone) -> Option<String> {
    schedule.next_after(now, tz).map(|z| z.timestamp().to_string())
}

/// When a job last good at `since` is overdue: its schedule's second due time after `since`
/// (one run may fail) plus half the gap between the two (at least five minutes); with that gap.
pub fn overdue_at(schedule: &Schedule, since: Timestamp, tz: &TimeZone) -> Option<(Timestamp, jiff::SignedDuration)> {
    let first = schedule.next_after(since, tz)?.timestamp();
    let second = schedule.next_after(first, tz)?.timestamp();
    let gap = second.duration_since(first);
    let slack = (gap / 2).max(jiff::SignedDuration::from_mins(5));
    Some((second.checked_add(slack).ok()?, gap))
}

/// Whether enabled job `job` has had no good run for longer than its schedule allows at `now`.
pub fn is_overdue(job: &Job, now: Timestamp, tz: &TimeZone) -> bool {
    let Some(schedule) = job.spec.schedule.as_deref().and_then(|s| Schedule::parse(s).ok()) else { return false };
    let since = job.last_good.as_deref().unwrap_or(&job.created);
    let Ok(since) = since.parse::<Timestamp>() else { return false };
    job.spec.enabled && overdue_at(&schedule, since, tz).is_some_and(|(at, _)| now > at)
}

/// Sends the overdue alert of `job` if it has had no good run for too long and was not alerted
/// about this silence yet.
fn watch_silence(
    catalog: &Catalog,
    settings: &Settings,
    job: &Job,
    schedule: &Schedule,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<()> {
    let since_text = job.last_good.clone().unwrap_or_else(|| job.created.clone());
    let Ok(since) = since_text.parse::<Timestamp>() else { return Ok(()) };
    let Some((overdue, period)) = overdue_at(schedule, since, tz) else { return Ok(()) };
    let about = job.last_good.clone().unwrap_or_else(|| "never".into());
    if now <= overdue || job.alerted.as_deref() == Some(about.as_str()) {
        return Ok(());
    }
    catalog.set_alerted(job.id, &about)?;
    // Sent from a thread of its own: a slow mail server or webhook must not delay the jobs due.
    let (settings, job) = (settings.clone(), job.clone());
    std::thread::Builder::new().name("overdue-alert".into()).spawn(move || {
        crate::notify::overdue(&settings, &job, period, &|line| eprintln!("job {}: {line}", job.spec.name))
    })?;
    Ok(())
}

/// One pass over the jobs at `now`: those due are started. `first` says this is the server's
/// first pass, when a due time already past was missed while it was down.
pub fn tick(
    catalog: &Catalog,
    runner: &Arc<Runner>,
    settings: &Settings,
    now: Timestamp,
    tz: &TimeZone,
    first: bool,
) -> Result<()> {
    for job in catalog.jobs()? {
        let Some(text) = &job.spec.schedule else { continue };
        // Checked when stored.
        let Ok(schedule) = Schedule::parse(text) else { continue };
        // Not at the first pass: the runs missed while the server was down start first.
        if job.spec.enabled && !first {
            watch_silence(catalog, settings, &job, &schedule, now, tz)?;
        }
        // A scheduled run the server's stop interrupted runs again, once.
        let interrupted = job
            .last_task
            .as_ref()
            .is_some_and(|t| t.state == TaskState::Interrupted && matches!(t.trigger.as_str(), "schedule" | "missed"));
        if first && job.spec.enabled && interrupted {
            if let Ok(task) = runner.submit(job.id, job.spec.clone(), "missed", "scheduler", true) {
                let _ = catalog
                    .log(task.id, "its last scheduled run was interrupted when the server stopped: run once now");
            }
            continue;
        }
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
        match runner.submit(job.id, job.spec.clone(), trigger, "scheduler", true) {
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
