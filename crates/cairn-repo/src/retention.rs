//! Retention policy: which restore points of one group a `forget` keeps, and why.
//!
//! Pure logic: no repository access, no clock, no system time zone. The caller groups points
//! (per VM UUID, or per image name), passes `now` and the zone periods are counted in
//! (`TimeZone::system()` in the CLI), and gets one [`Decision`] per point.
//!
//! ## Semantics
//! The period rules are exactly those of Proxmox Backup Server (`compute_prune_info` and
//! `mark_selections` in `pbs-datastore/src/prune.rs`, documented in PBS's "Prune" chapter), so
//! that an operator who knows `--keep-daily 7` there gets the same result here:
//!
//! 1. Points are sorted newest first (ties: by id, see [`decide`]).
//! 2. Rules run in the order keep-last, keep-hourly (local `%Y/%m/%d/%H`), keep-daily
//!    (`%Y/%m/%d`), keep-weekly (ISO week-year and week, `%G/%V`), keep-monthly (`%Y/%m`),
//!    keep-yearly (`%Y`). keep-last counts points, each its own "period".
//! 3. A rule walks the points newest first. It skips points an earlier rule already decided,
//!    and points whose period is covered by a point an earlier rule kept. The first point of a
//!    new period is kept, until N periods are selected; the rule stops at the first point of
//!    the (N+1)-th period, leaving the older points free for the later rules. The other points
//!    of a period it selected are marked removed, and, as in PBS, no later rule reconsiders
//!    them: with `keep-weekly 1, keep-monthly 2`, a removed point in the kept week's older
//!    month cannot become that month's monthly point (see the test `removed_points_stay_removed`).
//! 4. Whatever no rule kept is removed.
//!
//! Protected points are kept and count toward no rule (as in PBS). Additions beyond PBS, each
//! also kept outside the rules and counting toward none:
//! - keep-within: a point at most that long before `now` is kept (boundary included);
//! - a point later than `now` (a clock was wrong, or another host's clock) is kept: it cannot
//!   be placed among the periods honestly, and removing data on a clock error is the wrong way
//!   to fail;
//! - a point whose time could not be read is kept, for the same reason.
//!
//! A policy without any rule would remove every point: [`decide`] refuses it
//! ([`EmptyPolicy`]), and [`Policy::is_empty`] lets the CLI refuse it before any work.

use std::collections::HashSet;
use std::time::Duration;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// What to keep. A count of 0 turns its rule off, as does a `keep_within` of zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The N newest points.
    pub keep_last: u32,
    /// The newest point of each of the N newest local hours that have one.
    pub keep_hourly: u32,
    /// The newest point of each of the N newest local days that have one.
    pub keep_daily: u32,
    /// The newest point of each of the N newest ISO weeks that have one.
    pub keep_weekly: u32,
    /// The newest point of each of the N newest local months that have one.
    pub keep_monthly: u32,
    /// The newest point of each of the N newest local years that have one.
    pub keep_yearly: u32,
    /// Every point at most this long before `now`.
    pub keep_within: Option<Duration>,
}

impl Policy {
    /// True when the policy has no rule at all: applying it would remove every point, so the
    /// caller must refuse it rather than apply it.
    pub fn is_empty(&self) -> bool {
        self.counted_rules().iter().all(|&(_, n)| n == 0) && self.within().is_none()
    }

    /// The rules in force, in the CLI's words: `"keep-within 2days, keep-last 3, keep-daily 7"`.
    /// Empty for an empty policy.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(within) = self.within() {
            parts.push(format!("keep-within {}", humantime::format_duration(within)));
        }
        for (reason, n) in self.counted_rules() {
            if n > 0 {
                parts.push(format!("keep-{} {n}", reason.as_str()));
            }
        }
        parts.join(", ")
    }

    fn within(&self) -> Option<Duration> {
        self.keep_within.filter(|d| !d.is_zero())
    }

    /// The counted rules in the order they apply (PBS's order).
    fn counted_rules(&self) -> [(Reason, u32); 6] {
        [
            (Reason::Last, self.keep_last),
            (Reason::Hourly, self.keep_hourly),
            (Reason::Daily, self.keep_daily),
            (Reason::Weekly, self.keep_weekly),
            (Reason::Monthly, self.keep_monthly),
            (Reason::Yearly, self.keep_yearly),
        ]
    }
}

/// One restore point of the group, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The point's id; orders points taken at the same instant (see [`decide`]).
    pub id: &'a str,
    /// When the point was taken; `None` when its time could not be read.
    pub time: Option<Timestamp>,
    /// Protected by the operator: always kept, counts toward no rule.
    pub protected: bool,
}

/// Why a point is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Protected,
    Within,
    Future,
    UnknownTime,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Reason {
    /// The reason's name, as serialized (`"unknown-time"`, `"daily"`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Protected => "protected",
            Reason::Within => "within",
            Reason::Future => "future",
            Reason::UnknownTime => "unknown-time",
            Reason::Last => "last",
            Reason::Hourly => "hourly",
            Reason::Daily => "daily",
            Reason::Weekly => "weekly",
            Reason::Monthly => "monthly",
            Reason::Yearly => "yearly",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to one point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Keep(Reason),
    Remove,
}

impl Decision {
    pub fn is_keep(&self) -> bool {
        matches!(self, Decision::Keep(_))
    }
}

/// [`decide`] was given a policy without any rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the retention policy has no rule: it would remove every point")]
pub struct EmptyPolicy;

/// Decides, for one group of points, which are kept and why (see the module documentation).
///
/// Returns one decision per candidate, in the candidates' order; the order given does not
/// matter otherwise. Points taken at the same instant are ordered by id, the greater id counting
/// as the newer, so the result depends only on the set of candidates.
pub fn decide(
    policy: &Policy,
    candidates: &[Candidate],
    now: Timestamp,
    tz: &TimeZone,
) -> Result<Vec<Decision>, EmptyPolicy> {
    if policy.is_empty() {
        return Err(EmptyPolicy);
    }
    // A keep-within longer than the timestamp range reaches back to its start.
    let within_from = policy.within().map(|d| now.checked_sub(d).unwrap_or(Timestamp::MIN));

    let mut marks: Vec<Option<Decision>> = vec![None; candidates.len()];
    let mut ruled = Vec::new();
    for (index, c) in candidates.iter().enumerate() {
        let outside_rules = match c.time {
            // The operator's explicit mark wins over every other reason.
            _ if c.protected => Some(Reason::Protected),
            None => Some(Reason::UnknownTime),
            Some(t) if t > now => Some(Reason::Future),
            Some(t) if within_from.is_some_and(|from| t >= from) => Some(Reason::Within),
            Some(time) => {
                ruled.push(Ruled { index, id: c.id, time, local: tz.to_datetime(time) });
                None
            }
        };
        marks[index] = outside_rules.map(Decision::Keep);
    }
    // Newest first. The id breaks ties so the result does not depend on the caller's order;
    // the sort is stable, so only points identical in time and id keep the given order.
    ruled.sort_by(|a, b| (b.time, b.id).cmp(&(a.time, a.id)));

    for (reason, keep) in policy.counted_rules() {
        if keep > 0 {
            mark_selections(&mut marks, &ruled, reason, usize::try_from(keep).unwrap_or(usize::MAX));
        }
    }
    Ok(marks.into_iter().map(|m| m.unwrap_or(Decision::Remove)).collect())
}

/// Reads a point's time (RFC 3339, as points store it: `2026-11-25T10:00:00.000Z`). `None`
/// when it cannot be read, including a time without an offset, which names no instant.
pub fn parse_point_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

/// A point the counted rules apply to.
struct Ruled<'a> {
    /// Its position among the candidates.
    index: usize,
    id: &'a str,
    time: Timestamp,
    /// Its wall-clock time in the policy's zone, which the periods are made of.
    local: DateTime,
}

/// The period a point falls in, for one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Period {
    /// keep-last: every point is its own period (PBS uses the backup time, unique there).
    Point(usize),
    Hour(i16, i8, i8, i8),
    Day(i16, i8, i8),
    /// ISO week-year and week: 2027-01-01 is in 2026-W53.
    Week(i16, i8),
    Month(i16, i8),
    Year(i16),
}

fn period(reason: Reason, p: &Ruled) -> Period {
    let t = p.local;
    match reason {
        Reason::Hourly => Period::Hour(t.year(), t.month(), t.day(), t.hour()),
        Reason::Daily => Period::Day(t.year(), t.month(), t.day()),
        Reason::Weekly => {
            let w = t.date().iso_week_date();
            Period::Week(w.year(), w.week())
        }
        Reason::Monthly => Period::Month(t.year(), t.month()),
        Reason::Yearly => Period::Year(t.year()),
        // Only the counted rules reach here; keep-last and any other are per point.
        _ => Period::Point(p.index),
    }
}

/// One counted rule, as PBS's `mark_selections` (see the module documentation).
fn mark_selections(marks: &mut [Option<Decision>], newest_first: &[Ruled], reason: Reason, keep: usize) {
    // Periods already covered by a point an earlier rule kept. Points removed by an earlier
    // rule cover nothing.
    let covered: HashSet<Period> = newest_first
        .iter()
        .filter(|p| matches!(marks[p.index], Some(Decision::Keep(_))))
        .map(|p| period(reason, p))
        .collect();
    let mut selected = HashSet::new();
    for p in newest_first {
        if marks[p.index].is_some() {
            continue;
        }
        let key = period(reason, p);
        if covered.contains(&key) {
            continue;
        }
        if selected.contains(&key) {
            marks[p.index] = Some(Decision::Remove);
        } else {
            if selected.len() >= keep {
                break;
            }
            selected.insert(key);
            marks[p.index] = Some(Decision::Keep(reason));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Europe/Paris's rule since 1996, as a POSIX TZ string so the tests need no tz database.
    fn paris() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    /// Candidates from `(id, time)`; none protected.
    fn points<'a>(list: &[(&'a str, &str)]) -> Vec<Candidate<'a>> {
        list.iter().map(|&(id, t)| Candidate { id, time: Some(ts(t)), protected: false }).collect()
    }

    fn run(policy: &Policy, candidates: &[Candidate], now: &str, tz: &TimeZone) -> Vec<Decision> {
        decide(policy, candidates, ts(now), tz).unwrap()
    }

    /// The ids kept, with their reasons, in the candidates' order.
    fn kept<'a>(candidates: &[Candidate<'a>], decisions: &[Decision]) -> Vec<(&'a str, Reason)> {
        candidates
            .iter()
            .zip(decisions)
            .filter_map(|(c, d)| match d {
                Decision::Keep(r) => Some((c.id, *r)),
                Decision::Remove => None,
            })
            .collect()
    }

    use Reason::*;

    #[test]
    fn policy_is_empty_and_describe() {
        assert!(Policy::default().is_empty());
        assert_eq!(Policy::default().describe(), "");
        // A zero duration is "off", like a zero count.
        assert!(Policy { keep_within: Some(Duration::ZERO), ..Policy::default() }.is_empty());
        for p in [
            Policy { keep_last: 1, ..Policy::default() },
            Policy { keep_yearly: 1, ..Policy::default() },
            Policy { keep_within: Some(Duration::from_secs(1)), ..Policy::default() },
        ] {
            assert!(!p.is_empty(), "{p:?}");
        }
        let p = Policy { keep_last: 3, keep_daily: 7, ..Policy::default() };
        assert_eq!(p.describe(), "keep-last 3, keep-daily 7");
        let p = Policy {
            keep_hourly: 1,
            keep_weekly: 2,
            keep_monthly: 3,
            keep_yearly: 4,
            keep_within: Some(Duration::from_secs(2 * 86400)),
            ..Policy::default()
        };
        assert_eq!(p.describe(), "keep-within 2days, keep-hourly 1, keep-weekly 2, keep-monthly 3, keep-yearly 4");
    }

    #[test]
    fn empty_policy_is_refused() {
        let c = points(&[("a", "2026-11-25T10:00:00Z")]);
        assert_eq!(decide(&Policy::default(), &c, ts("2026-11-26T00:00:00Z"), &TimeZone::UTC), Err(EmptyPolicy));
        assert_eq!(decide(&Policy::default(), &[], ts("2026-11-26T00:00:00Z"), &TimeZone::UTC), Err(EmptyPolicy));
    }

    #[test]
    fn reason_names_match_serde() {
        for r in [Protected, Within, Future, UnknownTime, Last, Hourly, Daily, Weekly, Monthly, Yearly] {
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::Value::from(r.as_str()));
        }
        assert_eq!(UnknownTime.as_str(), "unknown-time");
    }

    #[test]
    fn parse_point_time_reads_rfc3339() {
        assert_eq!(parse_point_time("2026-11-25T10:00:00.000Z"), Some(ts("2026-11-25T10:00:00Z")));
        assert_eq!(parse_point_time("2026-11-25T11:00:00+01:00"), Some(ts("2026-11-25T10:00:00Z")));
        assert_eq!(parse_point_time("2026-11-25T10:00:00.123Z").map(|t| t.subsec_millisecond()), Some(123));
        for bad in ["", "yesterday", "2026-11-25", "2026-11-25T10:00:00", "2026-13-25T10:00:00Z"] {
            assert_eq!(parse_point_time(bad), None, "{bad:?}");
        }
    }

    /// PBS documentation: keep-daily keeps the newest point of each of the N newest days.
    #[test]
    fn keep_daily_keeps_newest_of_each_day() {
        let mut list = Vec::new();
        for day in 20..=25 {
            for hour in [2, 10, 18] {
                list.push((format!("d{day}h{hour}"), format!("2026-11-{day}T{hour:02}:00:00Z")));
            }
        }
        let list: Vec<(&str, &str)> = list.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let c = points(&list);
        let policy = Policy { keep_daily: 3, ..Policy::default() };
        let d = run(&policy, &c, "2026-11-25T20:00:00Z", &TimeZone::UTC);
        assert_eq!(kept(&c, &d), [("d23h18", Daily), ("d24h18", Daily), ("d25h18", Daily)]);
    }

    /// PBS documentation: keep-last 3 + keep-daily 2. The last three cover today, so keep-daily
    /// takes the two days before; today's fourth point is removed.
    #[test]
    fn keep_last_then_daily_picks_previous_days() {
        let c = points(&[
            ("t06", "2026-11-25T06:00:00Z"),
            ("t12", "2026-11-25T12:00:00Z"),
            ("t18", "2026-11-25T18:00:00Z"),
            ("t20", "2026-11-25T20:00:00Z"),
            ("y08", "2026-11-24T08:00:00Z"),
            ("y16", "2026-11-24T16:00:00Z"),
            ("b09", "2026-11-23T09:00:00Z"),
            ("b21", "2026-11-23T21:00:00Z"),
            ("c12", "2026-11-22T12:00:00Z"),
        ]);
        let policy = Policy { keep_last: 3, keep_daily: 2, ..Policy::default() };
        let d = run(&policy, &c, "2026-11-25T21:00:00Z", &TimeZone::UTC);
        assert_eq!(kept(&c, &d), [("t12", Last), ("t18", Last), ("t20", Last), ("y16", Daily), ("b21", Daily)]);
    }

    /// As PBS: a point a rule removed (it shared a selected period) is not reconsidered by a
    /// later rule, even when it would be the newest of that rule's period.
    #[test]
    fn removed_points_stay_removed() {
        // ISO week 2027-W13 runs from Monday 2027-03-29 to Sunday 2027-04-04.
        let c = points(&[
            ("apr02", "2027-04-02T12:00:00Z"),
            ("mar30", "2027-03-30T12:00:00Z"),
            ("mar10", "2027-03-10T12:00:00Z"),
        ]);
        let policy = Policy { keep_weekly: 1, keep_monthly: 2, ..Policy::default() };
        let d = run(&policy, &c, "2027-04-03T00:00:00Z", &TimeZone::UTC);
        assert_eq!(d, [Decision::Keep(Weekly), Decision::Remove, Decision::Keep(Monthly)]);
    }

    /// 2026-12-31 (Thursday) and 2027-01-01 (Friday) are both in ISO week 2026-W53; keep-yearly
    /// splits them, keep-weekly does not.
    #[test]
    fn iso_week_spans_the_year_boundary() {
        let c = points(&[
            ("mon28", "2026-12-28T12:00:00Z"),
            ("thu31", "2026-12-31T12:00:00Z"),
            ("fri01", "2027-01-01T12:00:00Z"),
            ("mon04", "2027-01-04T12:00:00Z"),
        ]);
        let now = "2027-01-05T00:00:00Z";
        let weekly = Policy { keep_weekly: 3, ..Policy::default() };
        assert_eq!(kept(&c, &run(&weekly, &c, now, &TimeZone::UTC)), [("fri01", Weekly), ("mon04", Weekly)]);
        let yearly = Policy { keep_yearly: 3, ..Policy::default() };
        assert_eq!(kept(&c, &run(&yearly, &c, now, &TimeZone::UTC)), [("thu31", Yearly), ("mon04", Yearly)]);
    }

    /// 2026-10-25 in Paris: 03:00 CEST becomes 02:00 CET at 01:00Z, so local hour 02 lasts two
    /// real hours and holds one hourly point, where UTC has two.
    #[test]
    fn dst_day_in_paris_hour_buckets() {
        let tz = paris();
        // The test's premise: both instants read 02:15 in Paris.
        assert_eq!(tz.to_datetime(ts("2026-10-25T00:15:00Z")).hour(), 2);
        assert_eq!(tz.to_datetime(ts("2026-10-25T01:15:00Z")).hour(), 2);
        let c = points(&[
            ("a", "2026-10-25T00:15:00Z"), // 02:15 CEST
            ("b", "2026-10-25T00:45:00Z"), // 02:45 CEST
            ("c", "2026-10-25T01:15:00Z"), // 02:15 CET
            ("d", "2026-10-25T01:45:00Z"), // 02:45 CET
            ("e", "2026-10-25T02:15:00Z"), // 03:15 CET
        ]);
        let now = "2026-10-25T12:00:00Z";
        let hourly = Policy { keep_hourly: 10, ..Policy::default() };
        assert_eq!(kept(&c, &run(&hourly, &c, now, &tz)), [("d", Hourly), ("e", Hourly)]);
        assert_eq!(kept(&c, &run(&hourly, &c, now, &TimeZone::UTC)), [("b", Hourly), ("d", Hourly), ("e", Hourly)]);

        // Days too follow the zone: 22:30Z on the 24th is already the 25th in Paris (CEST).
        let c = points(&[
            ("late", "2026-10-25T02:15:00Z"),
            ("midnight", "2026-10-24T22:30:00Z"),
            ("evening", "2026-10-24T21:30:00Z"),
        ]);
        let daily = Policy { keep_daily: 2, ..Policy::default() };
        assert_eq!(kept(&c, &run(&daily, &c, now, &tz)), [("late", Daily), ("evening", Daily)]);
        assert_eq!(kept(&c, &run(&daily, &c, now, &TimeZone::UTC)), [("late", Daily), ("midnight", Daily)]);
    }

    /// Protected points are kept and count toward no rule: keep-last 2 still keeps two others.
    #[test]
    fn protected_points_do_not_count() {
        let mut c = points(&[
            ("p1", "2026-11-25T12:00:00Z"),
            ("p2", "2026-11-25T11:00:00Z"),
            ("x1", "2026-11-25T10:00:00Z"),
            ("x2", "2026-11-25T09:00:00Z"),
            ("x3", "2026-11-25T08:00:00Z"),
            ("old", "2020-01-01T00:00:00Z"),
        ]);
        for i in [0, 1, 5] {
            c[i].protected = true;
        }
        let policy = Policy { keep_last: 2, keep_daily: 1, ..Policy::default() };
        let d = run(&policy, &c, "2026-11-26T00:00:00Z", &TimeZone::UTC);
        assert_eq!(
            d,
            [
                Decision::Keep(Protected),
                Decision::Keep(Protected),
                Decision::Keep(Last),
                Decision::Keep(Last),
                Decision::Remove, // the day is covered by x1, kept by keep-last
                Decision::Keep(Protected),
            ]
        );
    }

    /// Points after `now` or without a time are kept and do not fill keep-last; protection is
    /// reported before them.
    #[test]
    fn future_and_unknown_time_points_are_kept() {
        let c = vec![
            Candidate { id: "future", time: Some(ts("2026-11-25T13:00:00Z")), protected: false },
            Candidate { id: "unknown", time: None, protected: false },
            Candidate { id: "newest", time: Some(ts("2026-11-25T11:00:00Z")), protected: false },
            Candidate { id: "older", time: Some(ts("2026-11-25T10:00:00Z")), protected: false },
            Candidate { id: "prot-future", time: Some(ts("2027-01-01T00:00:00Z")), protected: true },
            Candidate { id: "prot-unknown", time: None, protected: true },
        ];
        let policy = Policy { keep_last: 1, ..Policy::default() };
        let d = run(&policy, &c, "2026-11-25T12:00:00Z", &TimeZone::UTC);
        assert_eq!(
            d,
            [
                Decision::Keep(Future),
                Decision::Keep(UnknownTime),
                Decision::Keep(Last),
                Decision::Remove,
                Decision::Keep(Protected),
                Decision::Keep(Protected),
            ]
        );
        // A point exactly at `now` is not in the future.
        let at_now = points(&[("now", "2026-11-25T12:00:00Z"), ("before", "2026-11-25T11:00:00Z")]);
        assert_eq!(
            run(&policy, &at_now, "2026-11-25T12:00:00Z", &TimeZone::UTC),
            [Decision::Keep(Last), Decision::Remove]
        );
    }

    /// keep-within includes its boundary, comes before keep-last and does not fill it.
    #[test]
    fn keep_within_boundary() {
        let c = points(&[
            ("now", "2026-11-25T12:00:00Z"),
            ("edge", "2026-11-24T12:00:00Z"),
            ("past-edge", "2026-11-24T11:59:59.999999999Z"),
            ("older", "2026-11-20T00:00:00Z"),
        ]);
        let now = "2026-11-25T12:00:00Z";
        let day = Some(Duration::from_secs(86400));
        let within = Policy { keep_within: day, ..Policy::default() };
        assert_eq!(
            run(&within, &c, now, &TimeZone::UTC),
            [Decision::Keep(Within), Decision::Keep(Within), Decision::Remove, Decision::Remove]
        );
        let with_last = Policy { keep_within: day, keep_last: 1, ..Policy::default() };
        assert_eq!(
            run(&with_last, &c, now, &TimeZone::UTC),
            [Decision::Keep(Within), Decision::Keep(Within), Decision::Keep(Last), Decision::Remove]
        );
        // A duration past the start of time keeps every past point, without overflowing.
        let forever = Policy { keep_within: Some(Duration::MAX), ..Policy::default() };
        assert!(run(&forever, &c, now, &TimeZone::UTC).iter().all(|d| *d == Decision::Keep(Within)));
    }

    /// Points taken at the same instant: the greater id counts as the newer, whatever the order.
    #[test]
    fn ties_are_broken_by_id() {
        let policy = Policy { keep_last: 1, keep_daily: 2, ..Policy::default() };
        let now = "2026-11-26T00:00:00Z";
        let forward = points(&[
            ("a", "2026-11-25T10:00:00Z"),
            ("b", "2026-11-25T10:00:00Z"),
            ("c", "2026-11-24T10:00:00Z"),
            ("d", "2026-11-24T10:00:00Z"),
        ]);
        let mut backward = forward.clone();
        backward.reverse();
        let d = run(&policy, &forward, now, &TimeZone::UTC);
        assert_eq!(kept(&forward, &d), [("b", Last), ("d", Daily)]);
        let d = run(&policy, &backward, now, &TimeZone::UTC);
        assert_eq!(kept(&backward, &d), [("d", Daily), ("b", Last)]);
    }

    /// splitmix64: a tiny deterministic generator for the property test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform enough in `0..n` for a test.
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    #[test]
    fn properties_over_random_groups() {
        let mut rng = Rng(0x00C0_FFEE);
        let now = ts("2026-11-25T12:00:00Z");
        let zones = [TimeZone::UTC, paris()];
        let mut newest_checked = 0;
        for round in 0..2000 {
            let tz = &zones[round % zones.len()];
            let policy = Policy {
                keep_last: if rng.chance(50) { rng.below(4) as u32 } else { 0 },
                keep_hourly: if rng.chance(30) { rng.below(5) as u32 } else { 0 },
                keep_daily: if rng.chance(50) { rng.below(5) as u32 } else { 0 },
                keep_weekly: if rng.chance(40) { rng.below(4) as u32 } else { 0 },
                keep_monthly: if rng.chance(40) { rng.below(4) as u32 } else { 0 },
                keep_yearly: if rng.chance(30) { rng.below(3) as u32 } else { 0 },
                keep_within: rng.chance(25).then(|| Duration::from_secs(rng.below(5 * 86400))),
            };
            let n = rng.below(40) as usize;
            let ids: Vec<String> = (0..n).map(|i| format!("p{i:02}")).collect();
            // A span per round, so that hours and days are shared as often as years are.
            let span = [2 * 86400, 60 * 86400, 3 * 366 * 86400][rng.below(3) as usize];
            let mut candidates: Vec<Candidate> = Vec::with_capacity(n);
            for id in &ids {
                let time = if rng.chance(5) {
                    None
                } else if !candidates.is_empty() && rng.chance(15) {
                    // The same instant as another point: ties must not depend on the order.
                    candidates[rng.below(candidates.len() as u64) as usize].time
                } else {
                    // Mostly in the past span, a few in the next day; whole minutes or hours.
                    let step = if rng.chance(50) { 3600 } else { 60 };
                    let back = rng.below(span / step) as i64 * step as i64;
                    let ahead = if rng.chance(5) { rng.below(86400) as i64 + 1 } else { 0 };
                    now.checked_add(jiff::SignedDuration::from_secs(ahead - back)).ok()
                };
                candidates.push(Candidate { id, time, protected: rng.chance(10) });
            }

            let Ok(decisions) = decide(&policy, &candidates, now, tz) else {
                assert!(policy.is_empty());
                continue;
            };
            assert!(!policy.is_empty());
            assert_eq!(decisions.len(), n);
            let within_from = policy.within().map(|d| now.checked_sub(d).unwrap());

            for (c, d) in candidates.iter().zip(&decisions) {
                // Points outside the rules keep their own reason; only the others may go.
                let expected = match c.time {
                    _ if c.protected => Some(Protected),
                    None => Some(UnknownTime),
                    Some(t) if t > now => Some(Future),
                    Some(t) if within_from.is_some_and(|f| t >= f) => Some(Within),
                    Some(_) => None,
                };
                match expected {
                    Some(r) => assert_eq!(*d, Decision::Keep(r), "{c:?} {policy:?}"),
                    None => assert!(
                        matches!(
                            d,
                            Decision::Remove | Decision::Keep(Last | Hourly | Daily | Weekly | Monthly | Yearly)
                        ),
                        "{c:?} {d:?}"
                    ),
                }
            }

            // Each rule keeps at most N points, each from a different period.
            for (reason, keep) in policy.counted_rules() {
                let mut periods = HashSet::new();
                for (index, (c, d)) in candidates.iter().zip(&decisions).enumerate() {
                    if *d == Decision::Keep(reason) {
                        let time = c.time.unwrap();
                        let p = Ruled { index, id: c.id, time, local: tz.to_datetime(time) };
                        assert!(periods.insert(period(reason, &p)), "{reason:?} kept two points of one period");
                    }
                }
                assert!(periods.len() <= keep as usize, "{reason:?}: {} > {keep}", periods.len());
            }

            // With any counted rule, the newest point that is not in the future is kept.
            if policy.counted_rules().iter().any(|&(_, k)| k > 0) {
                let newest = candidates.iter().filter_map(|c| c.time).filter(|t| *t <= now).max();
                if let Some(newest) = newest {
                    newest_checked += 1;
                    assert!(
                        candidates.iter().zip(&decisions).any(|(c, d)| c.time == Some(newest) && d.is_keep()),
                        "newest point removed: {policy:?}"
                    );
                }
            }

            // The caller's order does not matter.
            let mut shuffled = candidates.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let again = decide(&policy, &shuffled, now, tz).unwrap();
            let by_id: HashMap<&str, Decision> = shuffled.iter().map(|c| c.id).zip(again).collect();
            for (c, d) in candidates.iter().zip(&decisions) {
                assert_eq!(by_id[c.id], *d, "{} decided differently after shuffling", c.id);
            }
        }
        // The generator must exercise the main property, not skip it.
        assert!(newest_checked > 1000, "{newest_checked}");
    }
}
