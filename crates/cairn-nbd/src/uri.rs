//! NBD URIs (the subset of the NBD URI standard that QEMU and libnbd use).

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
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
            let Some(export) = path.strip_prefix('/').or((path.is_empty()).then_some("")) else {
                return Err(bad("a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)"));
            };
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("missing socket= parameter"))?;
            return Ok(NbdAddress {
                transport: Transport::Unix { socket: percent_decode(socket).into() },
                export: percent_decode(export),
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let rest = rest.split('?').next().unwrap_or("");
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            let port = |p: &str| p.parse::<u16>().map_err(|_| bad("bad port"));
            let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
                // [ipv6]:port
                let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                let p = match p {
                    "" => None,
                    p => Some(port(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)?),
                };
                (h.to_string(), p)
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(port(p)?)),
                    None => (hostport.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            // RFC 3986: an IPv6 address is written in brackets, and brackets mean nothing else.
            if host.contains(['[', ']']) || (host.contains(':') && !hostport.starts_with('[')) {
                return Err(bad("a host with ':' must be in brackets, as in nbd://[::1]:10809/EXPORT"));
            }
            return Ok(NbdAddress {
                transport: Transport::Tcp { host, port: port.unwrap_or(10809) },
                export: percent_decode(export),
            });
        }
        Err(bad("unknown scheme"))
    }
}

/// What an export name or socket path must escape to read back as itself: the separators the
/// parser splits on, `%` itself, and anything not printable ASCII.
const ESCAPED: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'?').add(b'&').add(b'#').add(b'"');

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = utf8_percent_encode(&self.export, ESCAPED);
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => write!(f, "nbd://[{host}]:{port}/{export}"),
            Transport::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            Transport::Unix { socket } => {
                let socket = socket.to_string_lossy();
                write!(f, "nbd+unix:///{export}?socket={}", utf8_percent_encode(&socket, ESCAPED))
            }
        }
    }
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits stays as it is.
fn percent_decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
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
        let v6 = NbdAddress::parse("nbd://[::1]:10810/vda").unwrap();
        assert_eq!(v6.transport, Transport::Tcp { host: "::1".into(), port: 10810 });
        assert_eq!(v6.to_string(), "nbd://[::1]:10810/vda");
    }

    #[test]
    fn a_percent_before_a_multibyte_character_is_kept_not_panicked_on() {
        // Found by the operator review: `%a` then a two-byte character split a char boundary.
        assert_eq!(NbdAddress::parse("nbd://h/%aé").unwrap().export, "%aé");
        assert_eq!(NbdAddress::parse("nbd://h/%éa").unwrap().export, "%éa");
        assert_eq!(NbdAddress::parse("nbd+unix:///x?socket=/s%€").unwrap(), NbdAddress::unix("/s%€", "x"));
        assert_eq!(NbdAddress::parse("nbd://h/a%").unwrap().export, "a%");
        assert_eq!(NbdAddress::parse("nbd://h/a%4").unwrap().export, "a%4");
    }

    #[test]
    fn a_trailing_escape_is_decoded() {
        assert_eq!(NbdAddress::parse("nbd://h/disk%20").unwrap().export, "disk ");
        assert_eq!(NbdAddress::parse("nbd+unix:///x?socket=/run/a%2Bb").unwrap(), NbdAddress::unix("/run/a+b", "x"));
        assert_eq!(NbdAddress::parse("nbd://h/%41").unwrap().export, "A");
    }

    #[test]
    fn printed_addresses_parse_back_to_themselves() {
        for a in [
            NbdAddress::unix("/run/a b&c%d?e", "vd a?%"),
            NbdAddress::unix("/s", ""),
            NbdAddress { transport: Transport::Tcp { host: "fe80::1".into(), port: 0 }, export: "x/y#z".into() },
            NbdAddress { transport: Transport::Tcp { host: "backup".into(), port: 10809 }, export: "é".into() },
        ] {
            assert_eq!(NbdAddress::parse(&a.to_string()).unwrap(), a, "{a}");
        }
    }

    #[test]
    fn malformed_hosts_and_sockets_are_refused() {
        // The first ambiguous host was found by the nbd_uri fuzz target (its printed form did
        // not parse back).
        for s in [
            "nbd://",
            "nbd://:10809/x",
            "nbd://[]:1/x",
            "nbd://[::1]junk/x",
            "nbd://h:99999/x",
            "nbd://#::1]:10809/vda",
            "nbd://::1:10809/x",
            "nbd://[[::1]:1/x",
        ] {
            assert!(NbdAddress::parse(s).is_err(), "{s}");
        }
        for s in ["nbd+unix:///x?socket=", "nbd+unix://host/x?socket=/s"] {
            assert!(NbdAddress::parse(s).is_err(), "{s}");
        }
    }
}
