//! QMP request validation and QEMU-format output lines.
//!
//! * [`parse_request`] applies `qmp_dispatch()`'s checks to one parsed input
//!   value and yields a [`Request`]. Members are checked in input order.
//!   *Deviation:* QEMU walks its hash table, so when several members are bad
//!   the one it names can differ (`{"foo": 1, "execute": 1}` gives "member
//!   'execute' must be a string" on QEMU, "member 'foo' is unexpected" here).
//! * [`to_wire`] serialises like QEMU's JSON writer: one line, `", "` and
//!   `": "` separators, pure ASCII (`\u00E9`, surrogate pairs, uppercase
//!   hex), control characters and DEL escaped, Unicode noncharacters
//!   replaced by `\uFFFD` as QEMU's writer does. Floats use the shortest digits
//!   that round-trip, laid out as C's `%g` would (`1500`, `0.1`, `1e+22`,
//!   `-0`); QEMU prints 17 significant digits (`0.10000000000000001`).
//! * [`greeting`], [`response_ok`], [`response_err`] and [`event`] build whole
//!   lines, each ending in `"\r\n"`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::QmpError;
use super::json::is_noncharacter;

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
            _ if is_noncharacter(u32::from(c)) => out.push_str("\\uFFFD"),
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

#[cfg(test)]
mod tests {
    use super::super::ErrorClass;
    use super::super::json::{JsonStreamer, Limits};
    use super::*;
    use serde_json::json;

    /// Parses one message with our reader, as a monitor would.
    fn parse(input: &[u8]) -> Value {
        match JsonStreamer::new(Limits::default()).feed(input).as_slice() {
            [Ok(v)] => v.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn rejected(v: Value) -> (Option<Value>, String) {
        match parse_request(v) {
            Err(RequestError { id, error }) => {
                assert_eq!(error.class, ErrorClass::GenericError);
                (id, error.desc)
            }
            Ok(r) => panic!("accepted {r:?}"),
        }
    }

    #[test]
    fn request_errors_in_qemu_order() {
        let cases = [
            (json!([1]), None, "QMP input must be a JSON object"),
            (json!("x"), None, "QMP input must be a JSON object"),
            (
                json!({"id": 1}),
                Some(json!(1)),
                "QMP input lacks member 'execute'",
            ),
            (json!({}), None, "QMP input lacks member 'execute'"),
            (
                json!({"exec-oob": "x", "id": 1}),
                Some(json!(1)),
                "QMP input member 'exec-oob' is unexpected",
            ),
            (
                json!({"execute": 1, "foo": 1, "id": 7}),
                Some(json!(7)),
                "QMP input member 'execute' must be a string",
            ),
            // Input order: QEMU (hash order) would name 'execute' here.
            (
                json!({"foo": 1, "execute": 1, "id": 7}),
                Some(json!(7)),
                "QMP input member 'foo' is unexpected",
            ),
            (
                json!({"arguments": 1, "execute": "x"}),
                None,
                "QMP input member 'arguments' must be an object",
            ),
            (
                json!({"execute": "x", "arguments": [], "id": {"a": [null]}}),
                Some(json!({"a": [null]})),
                "QMP input member 'arguments' must be an object",
            ),
            // The id is read first, so even a trailing id is echoed.
            (
                json!({"bad": 1, "execute": "x", "id": "late"}),
                Some(json!("late")),
                "QMP input member 'bad' is unexpected",
            ),
            // An explicit null id is an id.
            (
                json!({"id": null}),
                Some(Value::Null),
                "QMP input lacks member 'execute'",
            ),
        ];
        for (input, id, desc) in cases {
            assert_eq!(rejected(input.clone()), (id, desc.to_owned()), "{input}");
        }
    }

    #[test]
    fn valid_requests() {
        let r = parse_request(json!({"id": [1], "arguments": {"a": 1}, "execute": "stop"}));
        assert_eq!(
            r,
            Ok(Request {
                execute: "stop".into(),
                arguments: json!({"a": 1}).as_object().cloned().unwrap_or_default(),
                id: Some(json!([1])),
            })
        );
        let r = parse_request(json!({"execute": "cont"}));
        assert_eq!(
            r,
            Ok(Request {
                execute: "cont".into(),
                arguments: Map::new(),
                id: None
            })
        );
    }

    #[test]
    fn wire_format_matches_qemu() {
        let v = json!({"return": {"a": [1, "x", null, true, false, {}, []]}, "id": 1});
        assert_eq!(
            to_wire(&v),
            r#"{"return": {"a": [1, "x", null, true, false, {}, []]}, "id": 1}"#
        );
        let s = json!("é😀\u{0}\u{1f}\u{7f}\n\t\u{8}\u{c}\r/\\\"'\u{2028}\u{FFFE}\u{10FFFF}");
        assert_eq!(
            to_wire(&s),
            r#""\u00E9\uD83D\uDE00\u0000\u001F\u007F\n\t\b\f\r/\\\"'\u2028\uFFFD\uFFFD""#
        );
    }

    #[test]
    fn float_output() {
        // The id QEMU 10.0.2 was sent; its echo differs only where %.17g
        // shows 17 digits (0.10000000000000001, 1.0000000000000001e+300,
        // 9.9999999999999995e-08, -9.2233720368547758e+18).
        let id = parse(
            b"[1.5e3, 0.1, 1e300, -0.0, 1e-7, 12345678901234567890123, \
              18446744073709551615, -9223372036854775809, 1e22, 1e16, \
              123456789012345678, 0.5, 100.25, 1e21, 1e17, 1e-4, 1.5e-5, 0.0]",
        );
        assert_eq!(
            to_wire(&id),
            "[1500, 0.1, 1e+300, -0, 1e-07, 1.2345678901234568e+22, \
             18446744073709551615, -9.223372036854776e+18, 1e+22, 10000000000000000, \
             123456789012345678, 0.5, 100.25, 1e+21, 1e+17, 0.0001, 1.5e-05, 0]"
        );
    }

    #[test]
    fn echoed_id_is_byte_identical_to_qemu() {
        let mut input = b"{\"execute\":\"nope\",\"id\":\"".to_vec();
        input.extend_from_slice("é😀".as_bytes());
        input.extend_from_slice(b"\\u0000\\u001f\x7f\\n\\t\\b\\f\\r\\/\\\\\"}");
        let req = parse_request(parse(&input));
        let Ok(Request { id, .. }) = req else {
            panic!("{req:?}")
        };
        let err = QmpError::command_not_found("The command nope has not been found");
        assert_eq!(
            response_err(&err, id.as_ref()),
            "{\"id\": \"\\u00E9\\uD83D\\uDE00\\u0000\\u001F\\u007F\\n\\t\\b\\f\\r/\\\\\", \
             \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
        );
    }

    #[test]
    fn lexical_error_line_is_byte_identical_to_qemu() {
        let out = JsonStreamer::new(Limits::default()).feed(b"{\"execute\":\"a\x01b\"}");
        let lines: Vec<String> = out
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| response_err(e, None))
            .collect();
        assert_eq!(
            lines,
            [
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\\"a\\u0001'\"}}\r\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\r\n",
            ]
        );
    }

    #[test]
    fn message_lines() {
        let version = json!({"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""});
        assert_eq!(
            greeting(&version),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
             \"package\": \"\"}, \"capabilities\": []}}\r\n"
        );
        assert_eq!(response_ok(&json!({}), None), "{\"return\": {}}\r\n");
        assert_eq!(
            response_ok(&json!([1]), Some(&json!("a"))),
            "{\"return\": [1], \"id\": \"a\"}\r\n"
        );
        let err = QmpError::generic("JSON parse error, expecting value");
        assert_eq!(
            response_err(&err, None),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\r\n"
        );
        assert_eq!(
            response_err(
                &QmpError::new(ErrorClass::DeviceNotActive, "x"),
                Some(&json!(1.5e3))
            ),
            "{\"id\": 1500, \"error\": {\"class\": \"DeviceNotActive\", \"desc\": \"x\"}}\r\n"
        );
        let ts = Timestamp {
            seconds: 1_700_000_000,
            microseconds: 42,
        };
        assert_eq!(
            event("STOP", None, ts),
            "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 42}, \"event\": \"STOP\"}\r\n"
        );
        assert_eq!(
            event(
                "JOB_STATUS_CHANGE",
                Some(&json!({"status": "ready", "id": "j\n"})),
                ts
            ),
            "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 42}, \
             \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"ready\", \"id\": \"j\\n\"}}\r\n"
        );
    }

    #[test]
    fn output_is_one_ascii_line() {
        let nasty = json!({"k\n": ["\r\n", "ü", "\u{10FFFD}", 0.1, {"\u{1}": null}]});
        let lines = [
            response_ok(&nasty, Some(&nasty)),
            response_err(&QmpError::generic("a\nb\u{85}"), Some(&nasty)),
            event("E\r", Some(&nasty), Timestamp::now()),
            greeting(&nasty),
        ];
        for line in lines {
            let body = line.strip_suffix("\r\n").unwrap_or_default();
            assert!(body.bytes().all(|b| (0x20..0x7f).contains(&b)), "{line:?}");
            // And it parses back to what was sent.
            assert!(matches!(
                JsonStreamer::new(Limits::default())
                    .feed(body.as_bytes())
                    .as_slice(),
                [Ok(Value::Object(_))]
            ));
        }
        let back = parse(to_wire(&nasty).as_bytes());
        assert_eq!(back, nasty);
    }

    #[test]
    fn timestamp_now_is_plausible() {
        let ts = Timestamp::now();
        assert!(ts.seconds > 1_600_000_000, "{ts:?}");
        assert!((0..1_000_000).contains(&ts.microseconds), "{ts:?}");
    }

    #[test]
    fn to_wire_handles_any_depth() {
        let mut v = json!(1);
        for _ in 0..100_000 {
            v = Value::Array(vec![v]);
        }
        let s = to_wire(&v);
        assert_eq!(s.len(), 200_001);
        assert!(s.starts_with("[[[") && s.contains("[1]") && s.ends_with("]]]"));
        // serde_json's Drop recurses; take the value apart iteratively.
        while let Value::Array(mut items) = v {
            v = items.pop().unwrap_or_default();
        }
    }
}
