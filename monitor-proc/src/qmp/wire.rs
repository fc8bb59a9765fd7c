//! QMP request validation and QEMU-format output lines.
//!
//! * [`parse_request`] applies `qmp_dispatch()`'s checks to one parsed input
//!   value and yields a [`Request`]. Members are checked in input order.
//!   *Deviation:* QEMU walks its hash table, so when several members are bad
//!   the one it names can differ (`{"foo": 1, "execute": 1}` gives "member
//!   'execute' must be a string" on QEMU, "member 'foo' is unexpected" here).
//! * [`to_wire`] serialises like QEMU's JSON writer: one line, `", "` and
//!   `": "` separators, pure ASCII (`\u00E9`, surrogate pairs, uppercase
//!   hex), control characters and DEL escaped. Floats use the shortest digits
//!   that round-trip, laid out as C's `%g` would (`1500`, `0.1`, `1e+22`,
//!   `-0`); QEMU prints 17 significant digits (`0.10000000000000001`).
//! * [`greeting`], [`response_ok`], [`response_err`] and [`event`] build whole
//!   lines, each ending in `"\r\n"`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::QmpError;

/// A validated QMP command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    /// `{}` when the request had no `arguments`.
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// A request rejected before dispatch, with the `id` to echo (if any).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    pub id: Option<Value>,
    pub error: QmpError,
}

/// Checks a parsed input value the way QEMU does before looking up the command.
pub fn parse_request(v: Value) -> Result<Request, RequestError> {
    let Value::Object(mut map) = v else {
        return Err(RequestError {
            id: None,
            error: QmpError::generic("QMP input must be a JSON object"),
        });
    };
    let problem = map.iter().find_map(|(key, value)| match key.as_str() {
        "execute" if !value.is_string() => {
            Some("QMP input member 'execute' must be a string".into())
        }
        "arguments" if !value.is_object() => {
            Some("QMP input member 'arguments' must be an object".into())
        }
        "execute" | "arguments" | "id" => None,
        _ => Some(format!("QMP input member '{key}' is unexpected")),
    });
    let id = map.remove("id");
    let execute = match (problem, map.remove("execute")) {
        (None, Some(Value::String(execute))) => execute,
        (problem, _) => {
            let desc = problem.unwrap_or_else(|| "QMP input lacks member 'execute'".into());
            return Err(RequestError {
                id,
                error: QmpError::generic(desc),
            });
        }
    };
    let arguments = match map.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        _ => Map::new(),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// Serialises `v` in QEMU's single-line, ASCII-only format. Iterative, so
/// any depth is safe.
pub fn to_wire(v: &Value) -> String {
    enum Level<'a> {
        Array(std::slice::Iter<'a, Value>),
        Object(serde_json::map::Iter<'a>),
    }
    let mut out = String::new();
    let mut stack: Vec<(Level<'_>, bool)> = Vec::new();
    let mut next = Some(v);
    loop {
        match next.take() {
            None => {}
            Some(Value::Array(items)) => {
                out.push('[');
                stack.push((Level::Array(items.iter()), true));
            }
            Some(Value::Object(map)) => {
                out.push('{');
                stack.push((Level::Object(map.iter()), true));
            }
            Some(Value::Null) => out.push_str("null"),
            Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
            Some(Value::String(s)) => push_str(&mut out, s),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if n.is_f64() => push_float(&mut out, f),
                _ => out.push_str(&n.to_string()),
            },
        }
        let Some((level, first)) = stack.last_mut() else {
            return out;
        };
        let (key, item, close) = match level {
            Level::Array(it) => (None, it.next(), ']'),
            Level::Object(it) => match it.next() {
                Some((k, v)) => (Some(k), Some(v), '}'),
                None => (None, None, '}'),
            },
        };
        match item {
            Some(item) => {
                if !std::mem::take(first) {
                    out.push_str(", ");
                }
                if let Some(key) = key {
                    push_str(&mut out, key);
                    out.push_str(": ");
                }
                next = Some(item);
            }
            None => {
                out.push(close);
                stack.pop();
            }
        }
    }
}

fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// Shortest round-trip digits in C's `%g` layout (precision 17): plain
/// notation for decimal exponents -4..=16, else `d.ddde+XX`.
fn push_float(out: &mut String, f: f64) {
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    out.push_str(sign);
    if (-4..17).contains(&exp) {
        let int_len = usize::try_from(exp + 1).unwrap_or(0);
        if int_len == 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', exp.unsigned_abs() as usize - 1));
            out.push_str(&digits);
        } else if digits.len() <= int_len {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', int_len - digits.len()));
        } else {
            let (int, frac) = digits.split_at(int_len);
            let _ = write!(out, "{int}.{frac}");
        }
    } else {
        let (lead, rest) = digits.split_at(1.min(digits.len()));
        out.push_str(lead);
        if !rest.is_empty() {
            let _ = write!(out, ".{rest}");
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    }
}

/// `{"QMP": {"version": ..., "capabilities": []}}`: no capability (OOB) is offered.
pub fn greeting(version: &Value) -> String {
    format!(
        "{{\"QMP\": {{\"version\": {}, \"capabilities\": []}}}}\r\n",
        to_wire(version)
    )
}

/// `{"return": ..., "id": ...}`, `id` omitted when `None`.
pub fn response_ok(ret: &Value, id: Option<&Value>) -> String {
    let mut line = format!("{{\"return\": {}", to_wire(ret));
    if let Some(id) = id {
        let _ = write!(line, ", \"id\": {}", to_wire(id));
    }
    line.push_str("}\r\n");
    line
}

/// `{"id": ..., "error": {"class": ..., "desc": ...}}`: QEMU puts `id` first
/// here, and omits it when `None`.
pub fn response_err(err: &QmpError, id: Option<&Value>) -> String {
    let mut line = String::from("{");
    if let Some(id) = id {
        let _ = write!(line, "\"id\": {}, ", to_wire(id));
    }
    line.push_str("\"error\": {\"class\": ");
    push_str(&mut line, err.class.as_str());
    line.push_str(", \"desc\": ");
    push_str(&mut line, &err.desc);
    line.push_str("}}\r\n");
    line
}

/// Event time, split as QEMU's `g_get_real_time()` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// The real-time clock now, or -1/-1 (as the QMP spec says) if unavailable.
    pub fn now() -> Self {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| {
                Some(Self {
                    seconds: i64::try_from(d.as_secs()).ok()?,
                    microseconds: i64::from(d.subsec_micros()),
                })
            })
            .unwrap_or(Self {
                seconds: -1,
                microseconds: -1,
            })
    }
}

/// `{"timestamp": {...}, "event": NAME, "data": {...}}`, `data` omitted when `None`.
pub fn event(name: &str, data: Option<&Value>, ts: Timestamp) -> String {
    let mut line = format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": ",
        ts.seconds, ts.microseconds
    );
    push_str(&mut line, name);
    if let Some(data) = data {
        let _ = write!(line, ", \"data\": {}", to_wire(data));
    }
    line.push_str("}\r\n");
    line
}
