//! # cairn-schedule: when jobs run
//!
//! A job's schedule is one string, in either of two syntaxes:
//! - a **calendar event**, as Proxmox Backup Server writes them (a subset of systemd's):
//!   `[WEEKDAYS] [[YEARS-]MONTHS-DAYS] [HOURS:MINUTES[:SECONDS]]`. Each field is `*`, a value,
//!   a range `a..b`, a repetition `start/step` (or `a..b/step`), or a comma list of those;
//!   weekdays are `mon`..`sun`. A missing date is every day, a missing time midnight. Shortcuts:
//!   `minutely`, `hourly`, `daily`, `weekly`, `monthly`, `yearly` (`annually`), `quarterly`,
//!   `semiannually`. Examples: `daily`, `mon..fri 22:00`, `sat *-1..7 15:00` (the first
//!   Saturday), `*:0/15` (every quarter hour);
//! - a **cron expression**: five fields `MINUTE HOUR DAY MONTH WEEKDAY` (`*`, `a-b`, `a,b`,
//!   `*/n`, `a-b/n`; month and weekday names; weekday 0 or 7 is Sunday), or `@hourly`,
//!   `@daily` (`@midnight`), `@weekly`, `@monthly`, `@yearly` (`@annually`). As in cron, when
//!   both DAY and WEEKDAY are restricted a day matching either runs.
//!
//! Both become one [`Schedule`]: the sets of minutes, hours, days, months, weekdays and years it
//! runs at. Time is the server's civil time (as in PBS, no time zone in the text); a time that a
//! daylight-saving change skips runs as much later as the clock jumped (02:30 at 03:30), and
//! the times of an hour the clock goes back over run once, at their first pass. The resolution is the minute: a
//! seconds field may only be `0`. [`Schedule::next_after`] finds the next run within
//! [`HORIZON_YEARS`] years.
//!
//! The text comes from API clients: it is at most [`MAX_LEN`] bytes, every number is checked
//! against its field's range, and the `schedule` fuzz target runs the parser.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ZonedDateTime};
use std::fmt;

/// The longest schedule text taken.
pub const MAX_LEN: usize = 256;
/// How far ahead [`Schedule::next_after`] looks (a schedule for February 29th of a year that is
/// not a leap year never runs).
pub const HORIZON_YEARS: i16 = 8;

/// Why a schedule text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule {text:?}: {why}")]
pub struct ScheduleError {
    pub text: String,
    pub why: String,
}

/// When a job runs.
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    /// Bit n: minute n (0..=59).
    minutes: u64,
    /// Bit n: hour n (0..=23).
    hours: u32,
    /// Bit n: day of the month n (1..=31).
    days: u32,
    /// Bit n: month n (1..=12).
    months: u16,
    /// Bit n: weekday n, Monday 0 .. Sunday 6.
    weekdays: u8,
    /// Years it runs in (empty: every year), as (first, last, step).
    years: Vec<(i16, i16, i16)>,
    /// cron's rule: with both the day and the weekday restricted, either one matching is enough.
    day_or_weekday: bool,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Schedule {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        Schedule::parse(s)
    }
}

const ALL_DAYS: u32 = ((1u64 << 32) - 2) as u32; // 1..=31
const ALL_MONTHS: u16 = ((1 << 13) - 2) as u16; // 1..=12
const ALL_WEEKDAYS: u8 = (1 << 7) - 1;

const WEEKDAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MONTH_NAMES: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

impl Schedule {
    /// Parses a calendar event or a cron expression (see the crate's documentation).
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let fail = |why: String| ScheduleError { text: text.chars().take(MAX_LEN).collect(), why };
        if text.len() > MAX_LEN {
            return Err(fail(format!("longer than {MAX_LEN} bytes")));
        }
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(fail("empty".into()));
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        let parsed = if trimmed.starts_with('@') || fields.len() == 5 {
            cron(trimmed, &fields)
        } else {
            calendar(&trimmed.to_ascii_lowercase())
        };
        let mut s = parsed.map_err(fail)?;
        s.text = trimmed.to_string();
        Ok(s)
    }

    /// The schedule's text, as given (trimmed).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first run strictly after `after`, in time zone `tz`; none within [`HORIZON_YEARS`].
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<ZonedDateTime> {
        let now = after.to_zoned_datetime(tz.clone());
        // The next whole minute after `after`.
        let start = now.datetime().round(jiff::Unit::Minute).ok()?;
        let start = if start <= now.datetime() { start.checked_add(jiff::Span::new().minutes(1)).ok()? } else { start };
        let mut day = start.date();
        let last = Date::new(start.year().checked_add(HORIZON_YEARS)?, 12, 31).ok()?;
        while day <= last {
            if self.runs_on(day) {
                let mut from = if day == start.date() { start.time() } else { Time::midnight() };
                while let Some(t) = self.first_time_from(from) {
                    let when = DateTime::from_parts(day, t).to_zoned_datetime(tz.clone()).ok()?;
                    if when.timestamp() > after {
                        return Some(when);
                    }
                    // A time of an hour the clock went back over, taken at its first pass, which
                    // was before `after`: the next time of the same day.
                    match t.checked_add(jiff::Span::new().minutes(1)) {
                        Ok(next) if next > t => from = next,
                        _ => break,
                    }
                }
            }
            day = day.tomorrow().ok()?;
        }
        None
    }

    fn runs_on(&self, day: Date) -> bool {
        let year = day.year();
        if !self.years.is_empty()
            && !self.years.iter().any(|&(a, b, step)| year >= a && year <= b && (year - a) % step == 0)
        {
            return false;
        }
        if self.months & (1 << day.month()) == 0 {
            return false;
        }
        let by_day = self.days & (1 << day.day()) != 0;
        let by_weekday = self.weekdays & (1 << day.weekday().to_monday_zero_offset()) != 0;
        if self.day_or_weekday {
            by_day || by_weekday
        } else {
            by_day && by_weekday
        }
    }

    fn first_time_from(&self, from: Time) -> Option<Time> {
        for h in from.hour()..24 {
            if self.hours & (1 << h) == 0 {
                continue;
            }
            let first_minute = if h == from.hour() { from.minute() } else { 0 };
            for m in first_minute..60 {
                if self.minutes & (1 << m) != 0 {
                    return Time::new(h, m, 0, 0).ok();
                }
            }
        }
        None
    }
}

/// One field: the set of values in `lo..=hi` it names, as bits. `names` are accepted for the
/// values from `names_from` on. `range_op` is `..` (calendar events) or `-` (cron).
fn field(text: &str, lo: i64, hi: i64, names: &[&str], names_from: i64, range_op: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err("an empty field".into());
    }
    let items: Vec<&str> = text.split(',').collect();
    if items.len() > 64 {
        return Err(format!("{text:?}: more than 64 items"));
    }
    let value = |s: &str| -> Result<i64, String> {
        match names.iter().position(|n| s.eq_ignore_ascii_case(n)) {
            Some(i) => Ok(names_from + i as i64),
            None => value_in(s, lo, hi),
        }
    };
    let mut bits = 0u64;
    for item in items {
        let (span, step) = match item.split_once('/') {
            Some((a, s)) => {
                let step = value_in(s, 1, hi.max(1)).map_err(|e| format!("step {e}"))?;
                (a, Some(step))
            }
            None => (item, None),
        };
        let (first, last) = if span == "*" {
            (lo, hi)
        } else if let Some((a, b)) = span.split_once(range_op) {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!("{item:?}: the range goes backwards"));
            }
            (a, b)
        } else {
            let a = value(span)?;
            // `start/step` repeats up to the field's end.
            (a, if step.is_some() { hi } else { a })
        };
        let step = step.unwrap_or(1);
        let mut v = first;
        while v <= last {
            bits |= 1 << (v - lo).min(63);
            v += step;
        }
    }
    Ok(bits)
}

fn value_in(s: &str, lo: i64, hi: i64) -> Result<i64, String> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a number between {lo} and {hi}"));
    }
    let v: i64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v < lo || v > hi {
        return Err(format!("{v} is outside {lo}..{hi}"));
    }
    Ok(v)
}

/// Bits of `field` for values `lo..=hi` shifted so that bit n is value n.
fn shifted(bits: u64, lo: i64) -> u64 {
    bits << lo
}

fn every_day() -> Schedule {
    Schedule {
        text: String::new(),
        minutes: 1,
        hours: 1,
        days: ALL_DAYS,
        months: ALL_MONTHS,
        weekdays: ALL_WEEKDAYS,
        years: Vec::new(),
        day_or_weekday: false,
    }
}

/// A calendar event (lower-cased).
fn calendar(text: &str) -> Result<Schedule, String> {
    let expanded = match text {
        "minutely" => "*-*-* *:*",
        "hourly" => "*-*-* *:00",
        "daily" => "*-*-* 00:00",
        "weekly" => "mon *-*-* 00:00",
        "monthly" => "*-*-01 00:00",
        "yearly" | "annually" => "*-01-01 00:00",
        "quarterly" => "*-01,04,07,10-01 00:00",
        "semiannually" => "*-01,07-01 00:00",
        other => other,
    };
    let mut s = every_day();
    let mut fields: Vec<&str> = expanded.split_whitespace().collect();
    if fields.len() > 3 {
        return Err("a calendar event has at most a weekday, a date and a time".into());
    }
    // Weekdays first (letters), then a date (with '-'), then a time (with ':').
    if fields.first().is_some_and(|f| f.starts_with(|c: char| c.is_ascii_alphabetic())) {
        let w = fields.remove(0);
        s.weekdays = field(w, 0, 6, &WEEKDAY_NAMES, 0, "..").map_err(|e| format!("weekdays: {e}"))? as u8;
    }
    if fields.first().is_some_and(|f| f.contains('-')) {
        let d = fields.remove(0);
        let parts: Vec<&str> = d.split('-').collect();
        let (years, months, days) = match parts[..] {
            [m, d] => (None, m, d),
            [y, m, d] => (Some(y), m, d),
            _ => return Err(format!("{d:?} is not a date (YEARS-MONTHS-DAYS or MONTHS-DAYS)")),
        };
        if let Some(y) = years.filter(|y| *y != "*") {
            s.years = years_field(y)?;
        }
        s.months = shifted(field(months, 1, 12, &[], 1, "..").map_err(|e| format!("months: {e}"))?, 1) as u16;
        s.days = shifted(field(days, 1, 31, &[], 1, "..").map_err(|e| format!("days: {e}"))?, 1) as u32;
    }
    if let Some(t) = fields.first().filter(|f| f.contains(':')) {
        let parts: Vec<&str> = t.split(':').collect();
        let (h, m, sec) = match parts[..] {
            [h, m] => (h, m, None),
            [h, m, s] => (h, m, Some(s)),
            _ => return Err(format!("{t:?} is not a time (HOURS:MINUTES[:SECONDS])")),
        };
        if let Some(sec) = sec {
            if field(sec, 0, 59, &[], 0, "..").map_err(|e| format!("seconds: {e}"))? != 1 {
                return Err("schedules run at whole minutes: the seconds can only be 0".into());
            }
        }
        s.hours = field(h, 0, 23, &[], 0, "..").map_err(|e| format!("hours: {e}"))? as u32;
        s.minutes = field(m, 0, 59, &[], 0, "..").map_err(|e| format!("minutes: {e}"))?;
        fields.remove(0);
    }
    if let Some(rest) = fields.first() {
        return Err(format!("{rest:?} is neither a weekday, a date nor a time, or comes out of order"));
    }
    Ok(s)
}

fn years_field(text: &str) -> Result<Vec<(i16, i16, i16)>, String> {
    let mut out = Vec::new();
    for item in text.split(',').take(65) {
        let (span, step) = match item.split_once('/') {
            Some((a, s)) => (a, value_in(s, 1, 100).map_err(|e| format!("years: step {e}"))? as i16),
            None => (item, 1),
        };
        let year = |s: &str| value_in(s, 1970, 9999).map(|v| v as i16).map_err(|e| format!("years: {e}"));
        let (a, b) = match span.split_once("..") {
            Some((a, b)) => (year(a)?, year(b)?),
            None if item.contains('/') => (year(span)?, 9999),
            None => (year(span)?, year(span)?),
        };
        if a > b {
            return Err(format!("years: {item:?}: the range goes backwards"));
        }
        out.push((a, b, step));
    }
    if out.len() > 64 {
        return Err("years: more than 64 items".into());
    }
    Ok(out)
}

/// A cron expression (five fields, or an @ shortcut).
fn cron(text: &str, fields: &[&str]) -> Result<Schedule, String> {
    let expanded: Vec<&str> = match text {
        "@hourly" => vec!["0", "*", "*", "*", "*"],
        "@daily" | "@midnight" => vec!["0", "0", "*", "*", "*"],
        "@weekly" => vec!["0", "0", "*", "*", "0"],
        "@monthly" => vec!["0", "0", "1", "*", "*"],
        "@yearly" | "@annually" => vec!["0", "0", "1", "1", "*"],
        t if t.starts_with('@') => {
            return Err(format!("{t:?} is not a cron shortcut (@hourly, @daily, @weekly, @monthly, @yearly)"))
        }
        _ => fields.to_vec(),
    };
    let [m, h, dom, mon, dow] = expanded[..] else {
        return Err("a cron expression has five fields: MINUTE HOUR DAY MONTH WEEKDAY".into());
    };
    let mut s = every_day();
    s.minutes = field(m, 0, 59, &[], 0, "-").map_err(|e| format!("minute: {e}"))?;
    s.hours = field(h, 0, 23, &[], 0, "-").map_err(|e| format!("hour: {e}"))? as u32;
    s.days = shifted(field(dom, 1, 31, &[], 1, "-").map_err(|e| format!("day: {e}"))?, 1) as u32;
    s.months = shifted(field(mon, 1, 12, &MONTH_NAMES, 1, "-").map_err(|e| format!("month: {e}"))?, 1) as u16;
    // cron counts Sunday 0 (and 7), Monday 1.
    const CRON_DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let cron_days = field(dow, 0, 7, &CRON_DAYS, 0, "-").map_err(|e| format!("weekday: {e}"))?;
    s.weekdays = (0..7)
        .filter(|d| cron_days & (1 << ((d + 1) % 7)) != 0 || (*d == 6 && cron_days & (1 << 7) != 0))
        .fold(0u8, |w, d| w | 1 << d);
    // As Vixie cron: a field starting with `*` (`*`, `*/2`) does not restrict.
    s.day_or_weekday = !dom.starts_with('*') && !dow.starts_with('*');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(s: &str, after: &str) -> String {
        let tz = TimeZone::UTC;
        let after: Timestamp = format!("{after}Z").parse().unwrap();
        Schedule::parse(s).unwrap().next_after(after, &tz).map(|z| z.datetime().to_string()).unwrap_or_default()
    }

    #[test]
    fn calendar_events_run_when_pbs_says() {
        assert_eq!(next("daily", "2026-11-30T13:00:00"), "2026-12-01T00:00:00");
        assert_eq!(next("hourly", "2026-11-30T13:00:00"), "2026-11-30T14:00:00");
        assert_eq!(next("*:0/15", "2026-11-30T13:07:10"), "2026-11-30T13:15:00");
        assert_eq!(next("mon..fri 22:00", "2026-12-04T22:00:00"), "2026-12-07T22:00:00"); // Fri -> Mon
        assert_eq!(next("sat *-1..7 15:00", "2026-11-30T00:00:00"), "2026-12-05T15:00:00"); // first Saturday
        assert_eq!(next("mon..fri 8..17,22:0/15", "2026-11-30T17:50:00"), "2026-11-30T22:00:00");
        assert_eq!(next("weekly", "2026-11-30T00:00:00"), "2026-12-07T00:00:00"); // 30th is a Monday
        assert_eq!(next("monthly", "2026-11-30T00:00:00"), "2026-12-01T00:00:00");
        assert_eq!(next("quarterly", "2026-11-30T00:00:00"), "2027-01-01T00:00:00");
        assert_eq!(next("2027-06-15 12:30", "2026-11-30T00:00:00"), "2027-06-15T12:30:00");
        assert_eq!(next("12:00", "2026-11-30T12:00:00"), "2026-12-01T12:00:00");
        assert_eq!(next("*-02-29", "2026-11-30T00:00:00"), "2028-02-29T00:00:00");
        assert_eq!(next("2025-01-01", "2026-11-30T00:00:00"), "", "a date in the past never runs");
        assert_eq!(next("Sun 03:00:00", "2026-11-30T00:00:00"), "2026-12-06T03:00:00");
    }

    #[test]
    fn cron_expressions_run_when_cron_says() {
        assert_eq!(next("0 3 * * *", "2026-11-30T13:00:00"), "2026-12-01T03:00:00");
        assert_eq!(next("*/20 * * * *", "2026-11-30T13:00:00"), "2026-11-30T13:20:00");
        assert_eq!(next("30 2 * * 0", "2026-11-30T13:00:00"), "2026-12-06T02:30:00"); // Sunday
        assert_eq!(next("30 2 * * 7", "2026-11-30T13:00:00"), "2026-12-06T02:30:00");
        assert_eq!(next("0 0 * * mon-fri", "2026-12-04T12:00:00"), "2026-12-07T00:00:00");
        assert_eq!(next("0 0 1 jan *", "2026-11-30T13:00:00"), "2027-01-01T00:00:00");
        // Day and weekday both restricted: either (the 13th, or a Friday).
        assert_eq!(next("0 0 13 * 5", "2026-11-30T13:00:00"), "2026-12-04T00:00:00");
        assert_eq!(next("@weekly", "2026-11-30T13:00:00"), "2026-12-06T00:00:00");
        // A day field starting with `*` does not restrict: Mondays that are odd days, both.
        assert_eq!(next("0 0 */2 * 1", "2026-11-30T00:00:00"), "2026-12-07T00:00:00");
    }

    #[test]
    fn bad_schedules_are_refused_with_the_reason() {
        for (text, why) in [
            ("", "empty"),
            ("25:00", "hours"),
            ("*:61", "minutes"),
            ("12:00:30", "whole minutes"),
            ("funday", "weekdays"),
            ("mon 12:00 tue", "out of order"),
            ("*-13-01", "months"),
            ("5..1 * * * *", "minute"),
            ("60 * * * *", "minute"),
            ("*/0 * * * *", "step"),
            ("@often", "shortcut"),
            ("1 2 3", "neither"),
        ] {
            let e = Schedule::parse(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        assert!(Schedule::parse(&"*".repeat(MAX_LEN + 1)).unwrap_err().to_string().contains("longer"));
        let many = (0..70).map(|i| (i % 60).to_string()).collect::<Vec<_>>().join(",");
        assert!(Schedule::parse(&format!("{many} * * * *")).is_err());
    }

    #[test]
    fn in_an_hour_the_clock_goes_back_over_the_next_run_is_the_same_day_not_tomorrow() {
        let tz = TimeZone::get("Europe/Paris").unwrap();
        // 2026-10-25: 03:00 CEST -> 02:00 CET. 02:20 CET (01:20 UTC) is in the second pass, whose
        // times already ran at the first: the next run is 03:00 CET, the same day.
        let after: Timestamp = "2026-10-25T01:20:00Z".parse().unwrap();
        let next = Schedule::parse("*:0/15").unwrap().next_after(after, &tz).unwrap();
        assert_eq!(next.timestamp().to_string(), "2026-10-25T02:00:00Z");
    }

    #[test]
    fn a_skipped_civil_time_runs_when_the_clock_resumes() {
        let tz = TimeZone::get("Europe/Paris").unwrap();
        // 2027-03-28: 02:00 -> 03:00 in Paris.
        let after: Timestamp = "2027-03-27T12:00:00Z".parse().unwrap();
        let next = Schedule::parse("02:30").unwrap().next_after(after, &tz).unwrap();
        assert_eq!(next.datetime().date().to_string(), "2027-03-28");
        assert!(next.timestamp() > after);
    }
}
