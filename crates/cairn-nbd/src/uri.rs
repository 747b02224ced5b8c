//! NBD URIs (the subset of the NBD URI standard that QEMU and libnbd use).

use std::fmt;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix { socket: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdAddress {
    pub transport: Transport,
    pub export: String,
}

impl NbdAddress {
    pub fn unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        NbdAddress { transport: Transport::Unix { socket: socket.into() }, export: export.into() }
    }

    /// Whether a string looks like an NBD URI (to tell it from a file path).
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    /// Parses `nbd://host[:port][/export]` or `nbd+unix:///export?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdAddress, String> {
        let bad = |why: &str| {
            format!("{s:?} is not a usable NBD URI: {why} (forms: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)")
        };
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("missing ?socket="))?;
            let path = path.strip_prefix('/').unwrap_or(path);
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing socket= parameter"))?;
            return Ok(NbdAddress {
                transport: Transport::Unix { socket: percent_decode(socket).into() },
                export: percent_decode(path),
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let rest = rest.split('?').next().unwrap_or("");
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            if hostport.is_empty() {
                return Err(bad("missing host"));
            }
            let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
                // [ipv6]:port
                let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                (h.to_string(), p.strip_prefix(':').map(|p| p.parse().map_err(|_| bad("bad port"))).transpose()?)
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.parse().map_err(|_| bad("bad port"))?)),
                    None => (hostport.to_string(), None),
                }
            };
            return Ok(NbdAddress {
                transport: Transport::Tcp { host, port: port.unwrap_or(10809) },
                export: percent_decode(export),
            });
        }
        Err(bad("unknown scheme"))
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Transport::Unix { socket } => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, socket.display())
            }
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_common_forms() {
        assert_eq!(
            NbdAddress::parse("nbd+unix:///full0?socket=/tmp/nbd.sock").unwrap(),
            NbdAddress::unix("/tmp/nbd.sock", "full0")
        );
        assert_eq!(NbdAddress::parse("nbd+unix://?socket=/a%20b").unwrap(), NbdAddress::unix("/a b", ""));
        let t = NbdAddress::parse("nbd://127.0.0.1:10810/disk").unwrap();
        assert_eq!(t.transport, Transport::Tcp { host: "127.0.0.1".into(), port: 10810 });
        assert_eq!(t.export, "disk");
        assert_eq!(
            NbdAddress::parse("nbd://host").unwrap().transport,
            Transport::Tcp { host: "host".into(), port: 10809 }
        );
        assert!(NbdAddress::parse("nbd+unix:///x").is_err());
        assert!(NbdAddress::parse("http://x").is_err());
    }
}
