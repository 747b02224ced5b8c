//! Processes of ours that outlive the run that started them: an instant recovery's NBD server of
//! the point, and its link to another host. A rerun finds them again, or stops them, by PID and
//! start time (a PID alone may name another process after a reboot), and checks their command
//! line before it signals them.

/// A process's command line: its arguments, as bytes.
pub type Args<'a> = [&'a [u8]];

/// The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22): a PID is
/// reused by other processes, a PID and its start time are not.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, is in parentheses and may hold spaces or ')': count after the last.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid` is still the one we started: when recorded, its start time matches, and
/// its command line is what `matches` expects.
pub fn is_ours(pid: u32, start: Option<u64>, matches: &dyn Fn(&Args) -> bool) -> bool {
    if pid == 0 || start.is_some_and(|t| start_time(pid) != Some(t)) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    matches(&args)
}

/// A process of our user whose command line `matches`: (PID, start time).
pub fn find(matches: &dyn Fn(&Args) -> bool) -> Option<(u32, Option<u64>)> {
    use std::os::unix::fs::MetadataExt;
    let me = unsafe { libc::geteuid() };
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let owner = e.metadata().ok()?.uid();
        (owner == me && is_ours(pid, None, matches)).then(|| (pid, start_time(pid)))
    })
}

/// Stops (SIGTERM) process `pid` if it still is ours ([`is_ours`]); returns whether it was. The
/// process is pinned by a pidfd before it is checked, and signalled through that pidfd, so a PID
/// reused in between cannot be hit.
pub fn stop(pid: u32, start: Option<u64>, matches: &dyn Fn(&Args) -> bool) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        let nosys = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
        // A kernel without pidfds (before 5.3): check, then signal by PID.
        if nosys && is_ours(pid, start, matches) {
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            return true;
        }
        return false; // gone
    }
    let ours = is_ours(pid, start, matches);
    if ours {
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGTERM, std::ptr::null::<libc::siginfo_t>(), 0)
        };
    }
    unsafe { libc::close(fd) };
    ours
}

/// Waits (up to 2 s) for process `pid` to end and collects its exit status, if this process is
/// its parent: a long-running process (the director) would otherwise gather zombies. A process
/// of another parent is left alone (`waitpid` says it is not our child).
pub fn reap(pid: u32) {
    for _ in 0..100 {
        let r = unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
        if r != 0 {
            return; // reaped, or not our child
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `args` hold `flag` followed by `value`.
pub fn has_option(args: &Args, flag: &str, value: &[u8]) -> bool {
    args.windows(2).any(|w| w[0] == flag.as_bytes() && w[1] == value)
}
