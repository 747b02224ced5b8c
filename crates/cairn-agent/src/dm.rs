//! Device-mapper through its ioctls on `/dev/mapper/control`: the few calls a snapshot needs
//! (create, load a table, suspend/resume, read a table, remove, list). The guest has no dmsetup
//! (busybox), and libdevmapper would not link statically; the ABI is `linux/dm-ioctl.h`, version 4.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `sizeof(struct dm_ioctl)`: where the data area starts.
const HEADER: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const SPEC: usize = 40;
const NAME_LEN: usize = 128;

const fn iowr(nr: u64) -> u64 {
    // _IOWR(0xfd, nr, struct dm_ioctl)
    (3 << 30) | ((HEADER as u64) << 16) | (0xfd << 8) | nr
}
const DM_LIST_DEVICES: u64 = iowr(2);
const DM_DEV_CREATE: u64 = iowr(3);
const DM_DEV_REMOVE: u64 = iowr(4);
const DM_DEV_SUSPEND: u64 = iowr(6);
const DM_DEV_STATUS: u64 = iowr(7);
const DM_TABLE_LOAD: u64 = iowr(9);
const DM_TABLE_STATUS: u64 = iowr(12);

const SUSPEND_FLAG: u32 = 1 << 1;
const STATUS_TABLE_FLAG: u32 = 1 << 4;
const BUFFER_FULL_FLAG: u32 = 1 << 8;
const SKIP_LOCKFS_FLAG: u32 = 1 << 10;

/// One line of a table: `start length type params`, in 512-byte sectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub length: u64,
    pub kind: String,
    pub params: String,
}

/// A device's state, as `DM_DEV_STATUS` says it.
#[derive(Clone, Copy, Debug)]
pub struct Status {
    pub dev: (u32, u32),
    pub suspended: bool,
}

pub struct Control(File);

impl Control {
    pub fn open() -> io::Result<Control> {
        let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/mapper/control").map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open /dev/mapper/control (is dm-mod loaded?): {e}"))
        })?;
        Ok(Control(f))
    }

    /// Creates device `name` with no table; returns its major:minor.
    pub fn create(&self, name: &str) -> io::Result<(u32, u32)> {
        let out = self.call(DM_DEV_CREATE, name, 0, &[])?;
        Ok(dev_of(&out))
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.call(DM_DEV_REMOVE, name, 0, &[]).map(|_| ())
    }

    /// Suspends `name`; without `lockfs`, the filesystem on it is not frozen by the kernel (the
    /// guest's own freeze holds it already, and a second freeze would fail with EBUSY).
    pub fn suspend(&self, name: &str, lockfs: bool) -> io::Result<()> {
        let flags = SUSPEND_FLAG | if lockfs { 0 } else { SKIP_LOCKFS_FLAG };
        self.call(DM_DEV_SUSPEND, name, flags, &[]).map(|_| ())
    }

    /// Resumes `name`; a table loaded since becomes its table.
    pub fn resume(&self, name: &str) -> io::Result<()> {
        self.call(DM_DEV_SUSPEND, name, 0, &[]).map(|_| ())
    }

    pub fn status(&self, name: &str) -> io::Result<Status> {
        let out = self.call(DM_DEV_STATUS, name, 0, &[])?;
        Ok(Status { dev: dev_of(&out), suspended: flags_of(&out) & SUSPEND_FLAG != 0 })
    }

    /// Loads `targets` as the inactive table of `name` (the next resume makes it live).
    pub fn load(&self, name: &str, targets: &[Target]) -> io::Result<()> {
        let mut data = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let at = data.len();
            data.resize(at + SPEC, 0);
            data[at..at + 8].copy_from_slice(&t.start.to_ne_bytes());
            data[at + 8..at + 16].copy_from_slice(&t.length.to_ne_bytes());
            let kind = t.kind.as_bytes();
            if kind.len() >= 16 || t.params.contains('\0') {
                return Err(invalid(format!("target {:?}", t.kind)));
            }
            data[at + 24..at + 24 + kind.len()].copy_from_slice(kind);
            data.extend_from_slice(t.params.as_bytes());
            data.push(0);
            while data.len() % 8 != 0 {
                data.push(0);
            }
            // On input, `next` counts from this spec to the next one.
            let next = if i + 1 < targets.len() { (data.len() - at) as u32 } else { 0 };
            data[at + 20..at + 24].copy_from_slice(&next.to_ne_bytes());
        }
        self.call_with(DM_TABLE_LOAD, name, 0, &data, targets.len() as u32).map(|_| ())
    }

    /// The live table of `name`.
    pub fn table(&self, name: &str) -> io::Result<Vec<Target>> {
        let out = self.call(DM_TABLE_STATUS, name, STATUS_TABLE_FLAG, &[])?;
        let count = u32::from_ne_bytes(out[20..24].try_into().unwrap()) as usize;
        let start = u32::from_ne_bytes(out[16..20].try_into().unwrap()) as usize;
        let mut targets = Vec::new();
        let mut at = start;
        for _ in 0..count.min(1024) {
            let spec = out.get(at..at + SPEC).ok_or_else(|| invalid("a table past its buffer".into()))?;
            let sector = u64::from_ne_bytes(spec[0..8].try_into().unwrap());
            let length = u64::from_ne_bytes(spec[8..16].try_into().unwrap());
            // On output, `next` counts from the start of the data area.
            let next = u32::from_ne_bytes(spec[20..24].try_into().unwrap()) as usize;
            let kind = c_string(&spec[24..40]);
            let params = c_string(out.get(at + SPEC..).unwrap_or_default());
            targets.push(Target { start: sector, length, kind, params });
            at = start + next;
        }
        Ok(targets)
    }

    /// The names of every device-mapper device.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let out = self.call(DM_LIST_DEVICES, "", 0, &[])?;
        let start = u32::from_ne_bytes(out[16..20].try_into().unwrap()) as usize;
        let mut names = Vec::new();
        let mut at = start;
        // struct dm_name_list { u64 dev; u32 next; char name[]; }
        while let Some(entry) = out.get(at..at + 12) {
            let dev = u64::from_ne_bytes(entry[0..8].try_into().unwrap());
            let next = u32::from_ne_bytes(entry[8..12].try_into().unwrap()) as usize;
            if dev == 0 && next == 0 && names.is_empty() && c_string(&out[at + 12..]).is_empty() {
                break; // no device at all
            }
            names.push(c_string(&out[at + 12..]));
            if next == 0 || names.len() > 4096 {
                break;
            }
            at += next;
        }
        Ok(names)
    }

    fn call(&self, request: u64, name: &str, flags: u32, data: &[u8]) -> io::Result<Vec<u8>> {
        self.call_with(request, name, flags, data, 0)
    }

    /// One ioctl with a buffer that grows while the kernel says it was too small.
    fn call_with(&self, request: u64, name: &str, flags: u32, data: &[u8], targets: u32) -> io::Result<Vec<u8>> {
        if name.len() >= NAME_LEN {
            return Err(invalid(format!("device name {name:?} is too long")));
        }
        let mut size = (HEADER + data.len() + 16 * 1024).next_multiple_of(8);
        loop {
            // u64s: the buffer is 8-aligned, as the kernel's structures want.
            let mut words = vec![0u64; size / 8];
            // SAFETY: a u64 buffer seen as its bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, size) };
            buf[0..4].copy_from_slice(&4u32.to_ne_bytes()); // version 4.0.0
            buf[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
            buf[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes());
            buf[20..24].copy_from_slice(&targets.to_ne_bytes());
            buf[28..32].copy_from_slice(&flags.to_ne_bytes());
            buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
            buf[HEADER..HEADER + data.len()].copy_from_slice(data);
            // SAFETY: the buffer is as long as data_size says, and lives through the call.
            let r = unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, words.as_mut_ptr()) };
            if r != 0 {
                let e = io::Error::last_os_error();
                let errno = e.raw_os_error().unwrap_or(0);
                let text = format!("device-mapper {} of {name:?}: {e}", what(request));
                return Err(io::Error::new(e.kind(), Failure { errno, text }));
            }
            let out = buf.to_vec();
            if flags_of(&out) & BUFFER_FULL_FLAG != 0 && size < 16 << 20 {
                size *= 4;
                continue;
            }
            return Ok(out);
        }
    }
}

/// A failed ioctl: its errno kept for callers that act on it ([`errno`]), with a message.
#[derive(Debug)]
struct Failure {
    errno: i32,
    text: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Failure {}

/// The errno of a failed call of this module.
pub fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| e.get_ref()?.downcast_ref::<Failure>().map(|f| f.errno))
}

fn what(request: u64) -> &'static str {
    match request {
        DM_LIST_DEVICES => "list",
        DM_DEV_CREATE => "create",
        DM_DEV_REMOVE => "remove",
        DM_DEV_SUSPEND => "suspend/resume",
        DM_DEV_STATUS => "status",
        DM_TABLE_LOAD => "table load",
        DM_TABLE_STATUS => "table status",
        _ => "ioctl",
    }
}

fn flags_of(out: &[u8]) -> u32 {
    u32::from_ne_bytes(out[28..32].try_into().unwrap())
}

/// The kernel's `huge_encode_dev` of the reply's `dev`, as major and minor.
fn dev_of(out: &[u8]) -> (u32, u32) {
    let dev = u64::from_ne_bytes(out[40..48].try_into().unwrap());
    (libc::major(dev), libc::minor(dev))
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_numbers_are_the_kernels() {
        // From linux/dm-ioctl.h on this machine (gcc, DM 4.47).
        assert_eq!(super::DM_DEV_CREATE, 0xc138fd03);
        assert_eq!(super::DM_DEV_REMOVE, 0xc138fd04);
        assert_eq!(super::DM_DEV_SUSPEND, 0xc138fd06);
        assert_eq!(super::DM_TABLE_LOAD, 0xc138fd09);
        assert_eq!(super::DM_TABLE_STATUS, 0xc138fd0c);
    }

    #[test]
    fn a_failures_errno_survives_its_message() {
        let e = std::io::Error::other(super::Failure { errno: libc::EBUSY, text: "busy".into() });
        assert_eq!(super::errno(&e), Some(libc::EBUSY));
        assert_eq!(e.to_string(), "busy");
        assert_eq!(super::errno(&std::io::Error::from_raw_os_error(libc::ENXIO)), Some(libc::ENXIO));
    }
}
