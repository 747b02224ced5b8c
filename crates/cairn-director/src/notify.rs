//! Who hears of a task: its report mailed (with the boot checks' screenshots) and POSTed as JSON
//! to a webhook, when the task ends. A notification that cannot be sent is said in the task's
//! log; it never changes the task's state.

use crate::catalog::{Job, Task, TaskState};
use crate::jobs::{JobSpec, NotifyWhen};
use crate::Settings;
use std::time::Duration;

/// How long a webhook may take to answer. Redirects are not followed: the URL the operator
/// gave is the only one the server posts to.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends the report of `task` (ended) of job `spec` as its `notify` says; `log` gets what
/// happened to each notification.
pub fn task_ended(
    settings: &Settings,
    spec: &JobSpec,
    task: &Task,
    screenshots: &[(String, Vec<u8>)],
    log: &dyn Fn(&str),
) {
    let Some(notify) = &spec.notify else { return };
    let problem = !matches!(task.state, TaskState::Ok);
    if notify.when == NotifyWhen::Problems && !problem {
        return;
    }
    if let Some(to) = &notify.mail_to {
        match &settings.mail {
            None => log(&format!("report not mailed to {to}: the server has no SMTP server set (CAIRN_SMTP_SERVER)")),
            Some(template) => {
                send_mail(template, to, &subject(spec, task), body(spec, task), screenshots, "report", log)
            }
        }
    }
    if let Some(url) = &notify.webhook {
        post_json(url, serde_json::json!({"job": spec.name, "task": task}), "report", log);
    }
}

/// Mails `body` to `to` through the server's SMTP settings `template`; says in `log` how the
/// `what` (report, alert) went.
fn send_mail(
    template: &cairn_ops::mail::MailSettings,
    to: &str,
    subject: &str,
    body: String,
    images: &[(String, Vec<u8>)],
    what: &str,
    log: &dyn Fn(&str),
) {
    let mail = cairn_ops::mail::MailSettings { to: to.to_string(), ..template.clone() };
    match mail.send(subject, body, images) {
        Ok(()) => log(&format!("{what} mailed to {to}")),
        Err(e) => log(&format!("{what} not mailed to {to}: {e:#}")),
    }
}

/// POSTs `body` to webhook `url`; says in `log` how the `what` went.
fn post_json(url: &str, body: serde_json::Value, what: &str, log: &dyn Fn(&str)) {
    let agent = ureq::AgentBuilder::new().timeout(WEBHOOK_TIMEOUT).redirects(0).build();
    match agent.post(url).send_json(body) {
        Ok(r) => log(&format!("{what} posted to {url} ({})", r.status())),
        Err(e) => log(&format!("{what} not posted to {url}: {e}")),
    }
}

/// Says that job `job` has had no good run for longer than its schedule allows (its period
/// `period`), to where its reports go (whatever their `when`).
pub fn overdue(settings: &Settings, job: &Job, period: jiff::SignedDuration, log: &dyn Fn(&str)) {
    let Some(notify) = &job.spec.notify else { return };
    let since = job.last_good.as_deref().unwrap_or("never (since it was made)");
    let what = format!(
        "Job {} has had no good run since {since}: its schedule ({}) runs it every {} or so.\n\
         Its newest task: {}.\n",
        job.spec.name,
        job.spec.schedule.as_deref().unwrap_or("-"),
        humanize(period),
        job.last_task.as_ref().map(|t| format!("{} ({})", t.id, t.state.as_str())).unwrap_or("none".into())
    );
    let subject = format!("cairn ALERT: job {} has had no good run since {since}", job.spec.name);
    if let (Some(to), Some(template)) = (&notify.mail_to, &settings.mail) {
        send_mail(template, to, &subject, what.clone(), &[], "overdue alert", log);
    }
    if let Some(url) = &notify.webhook {
        let alert = serde_json::json!({"job": job.spec.name, "alert": "overdue", "last_good": job.last_good,
            "period_seconds": period.as_secs(), "text": what});
        post_json(url, alert, "overdue alert", log);
    }
}

fn humanize(d: jiff::SignedDuration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86400 == 0 => format!("{} day(s)", s / 86400),
        s if s % 3600 == 0 => format!("{} hour(s)", s / 3600),
        s => format!("{} minute(s)", s / 60),
    }
}

fn subject(spec: &JobSpec, task: &Task) -> String {
    format!("cairn job {}: {} (task {})", spec.name, task.state.as_str().to_uppercase(), task.id)
}

/// The report as text: the task, then a line per VM.
pub fn body(spec: &JobSpec, task: &Task) -> String {
    let mut out = format!(
        "Job {}: {}\nTask {} ({}, asked by {}), started {}, ended {}\n",
        spec.name,
        task.state.as_str().to_uppercase(),
        task.id,
        task.trigger,
        task.requested_by,
        task.started.as_deref().unwrap_or("-"),
        task.ended.as_deref().unwrap_or("-")
    );
    if let Some(e) = &task.error {
        out.push_str(&format!("Attention: {e}\n"));
    }
    out.push('\n');
    let vms = task.result.as_ref().and_then(|r| r["vms"].as_array().cloned()).unwrap_or_default();
    for vm in vms {
        // The VM's name from its point (a job by tag or `all` asks for VMs by UUID).
        let name = vm["name"].as_str().or(vm["vm"].as_str()).unwrap_or("?");
        if vm["ok"] != true {
            out.push_str(&format!("VM {name}: FAILED: {}\n", vm["error"].as_str().unwrap_or("")));
            continue;
        }
        let point = vm["point"].as_str().map(|p| &p[..p.len().min(8)]).unwrap_or("?");
        out.push_str(&format!(
            "VM {name}: restore point {point} ({} backup, {}, {} MiB read)\n",
            vm["chain"].as_str().unwrap_or("?"),
            vm["method"].as_str().unwrap_or("?"),
            vm["read_bytes"].as_u64().unwrap_or(0) >> 20
        ));
        if let Some(boot) = vm.get("boot").filter(|b| b.is_object()) {
            match boot["verdict"].as_str() {
                Some(v) => out.push_str(&format!(
                    "  boot check: {}: {}\n",
                    v.to_uppercase(),
                    boot["reason"].as_str().unwrap_or("")
                )),
                None => {
                    out.push_str(&format!("  boot check could not run: {}\n", boot["error"].as_str().unwrap_or("")))
                }
            }
        }
    }
    if let Some(n) = task.result.as_ref().and_then(|r| r["retention"]["forgotten"].as_u64()) {
        out.push_str(&format!(
            "\nRetention: {n} restore point(s) forgotten (their space comes back at the next prune).\n"
        ));
    }
    out
}
