//! Image names that are not file names: QEMU's protocol prefixes, as `drive-mirror`'s
//! `target` takes them. The monitor parses a target to connect its NBD server (block-proc
//! may make no socket), and block-proc parses it again to open the export over that
//! connection, so both share this parser and its errors (QEMU 10's texts, measured
//! against qemu-storage-daemon).
//!
//! NBD names come in two forms (`block/nbd.c`):
//! - URIs: `nbd://HOST[:PORT]/EXPORT` (also `nbd+tcp://`), `nbd+unix:///EXPORT?socket=PATH`;
//! - the legacy form: `nbd:unix:PATH[:exportname=X]`, `nbd:HOST:PORT[:exportname=X]`,
//!   `nbd:[V6ADDR]:PORT...` (with `inet` options after a comma: `,ipv4=on`...).

use serde_json::{Map, Value, json};

/// The member of `drive-mirror`'s arguments that carries the monitor's failure to connect
/// an NBD target to block-proc (the QMP schema refuses it from a client), for block-proc to
/// report where QEMU opens the target: after the checks that come first.
pub const CONNECT_ERROR_KEY: &str = "splitvmm-connect-error";

/// `NBD_DEFAULT_PORT`.
const DEFAULT_PORT: u16 = 10809;

/// What an image name designates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A file (a bare name, or `file:NAME`).
    File(String),
    /// An NBD export: its server (a flat QAPI `SocketAddress`, `inet` or `unix`) and name.
    Nbd(NbdTarget),
}

/// An NBD target. See [`Target::Nbd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    pub server: Map<String, Value>,
    pub export: Option<String>,
}

/// The protocol of a name, QEMU's `path_has_protocol`: a `:` before any `/` or `\`.
fn protocol(name: &str) -> Option<&str> {
    let end = name.find([':', '/', '\\'])?;
    (name.as_bytes()[end] == b':').then(|| &name[..end])
}

/// Parses an image name as QEMU's block layer does before opening it.
pub fn parse_target(name: &str) -> Result<Target, String> {
    match protocol(name) {
        None => Ok(Target::File(name.to_string())),
        Some("file") => Ok(Target::File(name["file:".len()..].to_string())),
        Some("nbd" | "nbd+tcp" | "nbd+unix") => parse_nbd(name).map(Target::Nbd),
        Some(p) => Err(format!("Unknown protocol '{p}'")),
    }
}

/// `nbd_parse_filename`.
fn parse_nbd(name: &str) -> Result<NbdTarget, String> {
    if name.contains("://") {
        return parse_uri(name).ok_or_else(|| "No valid URL specified".to_string());
    }
    const EXPORT: &str = ":exportname=";
    let missing = || "NBD server address missing".to_string();
    let (spec, export) = match name.find(EXPORT) {
        Some(i) if i + EXPORT.len() == name.len() => return Err(missing()),
        Some(i) => (&name[..i], Some(name[i + EXPORT.len()..].to_string())),
        None => (name, None),
    };
    let host_spec = spec
        .strip_prefix("nbd:")
        .ok_or_else(|| "File name string for NBD must start with 'nbd:'".to_string())?;
    if host_spec.is_empty() {
        return Err(missing());
    }
    let server = match host_spec.strip_prefix("unix:") {
        Some(path) => json!({"type": "unix", "path": path}),
        None => inet_parse(host_spec)?,
    };
    let Value::Object(server) = server else {
        return Err(missing());
    };
    Ok(NbdTarget { server, export })
}

/// `inet_parse`: `HOST:PORT`, `[V6]:PORT` or `:PORT`, then `,option`s; of those, `ipv4`
/// and `ipv6` are kept (QEMU's `to`, `keep-alive` and `mptcp` are not, nor are unknown
/// ones, which QEMU ignores too).
fn inet_parse(s: &str) -> Result<Value, String> {
    let (addr, opts) = s.split_once(',').map_or((s, ""), |(a, o)| (a, o));
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let bad = || format!("error parsing IPv6 address '{s}'");
        let (host, rest) = rest.split_once(']').ok_or_else(bad)?;
        let port = rest.strip_prefix(':').ok_or_else(bad)?;
        if host.is_empty() || host.len() > 64 || port.is_empty() || port.len() > 32 {
            return Err(bad());
        }
        (host, port)
    } else if let Some(port) = addr.strip_prefix(':') {
        if port.is_empty() || port.len() > 32 {
            return Err(format!("error parsing port in address '{s}'"));
        }
        ("", port)
    } else {
        let bad = || format!("error parsing address '{s}'");
        let (host, port) = addr.split_once(':').ok_or_else(bad)?;
        if host.len() > 64 || port.is_empty() || port.len() > 32 {
            return Err(bad());
        }
        (host, port)
    };
    let mut server = json!({"type": "inet", "host": host, "port": port});
    for opt in opts.split(',') {
        let (key, value) = opt.split_once('=').unwrap_or((opt, "on"));
        if matches!(key, "ipv4" | "ipv6") {
            let on = match value {
                "on" | "" => true,
                "off" => false,
                _ => return Err(format!("error parsing '{key}' flag '{opt}'")),
            };
            server[key] = Value::Bool(on);
        }
    }
    Ok(server)
}

/// `nbd_parse_uri`; `None` is QEMU's "No valid URL specified".
fn parse_uri(name: &str) -> Option<NbdTarget> {
    let (scheme, rest) = name.split_once("://")?;
    let unix = match scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => return None,
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (rest, query) = rest
        .split_once('?')
        .map_or((rest, None), |(r, q)| (r, Some(q)));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = split_authority(authority)?;
    let path = unescape(path)?;
    let export = path.strip_prefix('/').unwrap_or(&path);
    let export = (!export.is_empty()).then(|| export.to_string());
    let params: Vec<(String, Option<String>)> = match query {
        None => Vec::new(),
        Some(q) => q
            .split(['&', ';'])
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => Some((unescape(k)?, Some(unescape(v)?))),
                None => Some((unescape(p)?, None)),
            })
            .collect::<Option<_>>()?,
    };
    let server = if unix {
        let [(key, Some(path))] = params.as_slice() else {
            return None;
        };
        if !host.is_empty() || port.is_some() || key != "socket" {
            return None;
        }
        json!({"type": "unix", "path": path})
    } else {
        if !params.is_empty() || host.is_empty() {
            return None;
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host);
        let port = port.filter(|p| *p != 0).unwrap_or(DEFAULT_PORT);
        json!({"type": "inet", "host": host, "port": port.to_string()})
    };
    let Value::Object(server) = server else {
        return None;
    };
    Some(NbdTarget { server, export })
}

/// A URI's authority: its host (unescaped; brackets kept) and port (`None` when absent;
/// a `:` must be followed by a port of at most 65535).
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (h, rest) = authority.split_at(end + 1);
        match rest {
            "" => (h, None),
            r => (h, Some(r.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((unescape(host)?, port))
}

/// Percent-decoding; `None` for a malformed escape or a result that is not UTF-8.
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// QEMU's name for an NBD node once open (`nbd_refresh_filename`): `nbd://HOST:PORT/X` or
/// `nbd+unix:///X?socket=PATH`.
pub fn nbd_filename(server: &Map<String, Value>, export: Option<&str>) -> String {
    let str_of = |k: &str| server.get(k).and_then(Value::as_str).unwrap_or_default();
    let suffix = match export {
        Some(e) if !e.is_empty() => format!("/{e}"),
        _ => String::new(),
    };
    match str_of("type") {
        "inet" => {
            let host = str_of("host");
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            format!("nbd://{host}:{}{suffix}", str_of("port"))
        }
        _ => format!("nbd+unix://{suffix}?socket={}", str_of("path")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd(server: Value, export: Option<&str>) -> Result<Target, String> {
        let Value::Object(server) = server else {
            panic!("not an object")
        };
        Ok(Target::Nbd(NbdTarget {
            server,
            export: export.map(str::to_string),
        }))
    }

    #[test]
    fn every_form_of_nbd_name() {
        let cases = [
            (
                "nbd:unix:/s.sock",
                nbd(json!({"type": "unix", "path": "/s.sock"}), None),
            ),
            (
                "nbd:unix:/s.sock:exportname=e1",
                nbd(json!({"type": "unix", "path": "/s.sock"}), Some("e1")),
            ),
            (
                "nbd+unix:///e1?socket=/s%20x.sock",
                nbd(json!({"type": "unix", "path": "/s x.sock"}), Some("e1")),
            ),
            (
                "nbd+unix://?socket=/s",
                nbd(json!({"type": "unix", "path": "/s"}), None),
            ),
            (
                "nbd://127.0.0.1:1/x",
                nbd(
                    json!({"type": "inet", "host": "127.0.0.1", "port": "1"}),
                    Some("x"),
                ),
            ),
            (
                "nbd+tcp://[::1]/a/b",
                nbd(
                    json!({"type": "inet", "host": "::1", "port": "10809"}),
                    Some("a/b"),
                ),
            ),
            (
                "nbd:127.0.0.1:1:exportname=e",
                nbd(
                    json!({"type": "inet", "host": "127.0.0.1", "port": "1"}),
                    Some("e"),
                ),
            ),
            (
                "nbd:[::1]:7,ipv6=on,to=9",
                nbd(
                    json!({"type": "inet", "host": "::1", "port": "7", "ipv6": true}),
                    None,
                ),
            ),
            ("/a/b.raw", Ok(Target::File("/a/b.raw".into()))),
            ("file:/a/b.raw", Ok(Target::File("/a/b.raw".into()))),
            ("./x:y", Ok(Target::File("./x:y".into()))),
        ];
        for (name, want) in cases {
            assert_eq!(parse_target(name), want, "{name}");
        }
    }

    /// The texts are qemu-storage-daemon 10.0.2's for the same `drive-mirror` targets.
    #[test]
    fn bad_names_as_qemu_words_them() {
        let cases = [
            ("nbd+unix:///x", "No valid URL specified"),
            ("nbd://", "No valid URL specified"),
            ("nbd://127.0.0.1:99999/e1", "No valid URL specified"),
            ("nbd+unix:///e1?socket=/s&foo=1", "No valid URL specified"),
            ("nbd+unix://host/e1?socket=/x", "No valid URL specified"),
            ("nbd://127.0.0.1:1/e1?socket=/x", "No valid URL specified"),
            ("nbd:", "NBD server address missing"),
            ("nbd:unix:/s:exportname=", "NBD server address missing"),
            ("nbd:127.0.0.1", "error parsing address '127.0.0.1'"),
            ("nbd:[::1]", "error parsing IPv6 address '[::1]'"),
            ("nbd+foo://x", "Unknown protocol 'nbd+foo'"),
            ("foo:bar", "Unknown protocol 'foo'"),
            (
                "nbd+tcp:h:1",
                "File name string for NBD must start with 'nbd:'",
            ),
        ];
        for (name, want) in cases {
            assert_eq!(parse_target(name), Err(want.to_string()), "{name}");
        }
    }

    #[test]
    fn filenames_as_qemu_shows_them() {
        let Ok(Target::Nbd(t)) = parse_target("nbd:[::1]:7:exportname=e") else {
            panic!()
        };
        assert_eq!(
            nbd_filename(&t.server, t.export.as_deref()),
            "nbd://[::1]:7/e"
        );
        let Ok(Target::Nbd(t)) = parse_target("nbd:unix:/s") else {
            panic!()
        };
        assert_eq!(nbd_filename(&t.server, None), "nbd+unix://?socket=/s");
    }
}
