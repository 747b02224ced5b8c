//! Job schedules from API clients (calendar events and cron expressions). Oracles: a schedule
//! that parses has a next run after any instant that is later than it (or none within the
//! horizon), on a whole minute, and parsing its own text again gives the same schedule.
#![no_main]
use cairn_schedule::Schedule;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(s) = Schedule::parse(text) else { return };
    assert_eq!(Schedule::parse(s.text()).as_ref(), Ok(&s));
    let after = Timestamp::from_second(1_800_000_000).unwrap();
    if let Some(next) = s.next_after(after, &TimeZone::UTC) {
        assert!(next.timestamp() > after);
        assert_eq!(next.second(), 0);
        // The run after it is later still.
        if let Some(then) = s.next_after(next.timestamp(), &TimeZone::UTC) {
            assert!(then.timestamp() > next.timestamp());
        }
    }
});
