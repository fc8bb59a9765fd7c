//! Streaming JSON reader for QMP input, with QEMU's lexer, parser and limits.
//!
//! [`JsonStreamer::feed`] takes bytes in arbitrary fragments and returns every
//! complete top-level value, or error, in order. It reproduces QEMU 10's
//! `qobject/json-lexer.c`, `json-parser.c` and `json-streamer.c` behaviour:
//!
//! * **Lexer.** RFC 8259 tokens plus QEMU's extensions: `'single-quoted'`
//!   strings and the `\'` escape. Keywords lex as `[a-z]+` and are checked by
//!   the parser ("invalid keyword 'tru'"). Input is (modified) UTF-8; strings
//!   reject invalid UTF-8, noncharacters and unpaired surrogates, and accept
//!   `\uXXXX` escapes including surrogate pairs.
//! * **Messages.** A message ends when its braces and brackets balance, or when
//!   either count goes negative (so a lone `}` is a message of its own); a
//!   scalar at top level is a message by itself. No newline is needed.
//! * **Errors** are `GenericError` with QEMU's texts, e.g. "JSON parse error,
//!   expecting value". Control characters in a desc are kept raw; the wire
//!   writer escapes them, giving QEMU's bytes (`stray '\u0001'`).
//! * **Limits** ([`Limits`], defaults as QEMU's): the token bytes of one
//!   message (whitespace excluded, plus one), its token count, and its nesting
//!   depth (open braces + brackets, so 1024 nested arrays alone pass but not
//!   inside an object).
//!
//! # Resynchronisation
//!
//! * **Lexical error** (a byte no token can contain, e.g. `@`, a control
//!   character, `0xFF`, or a control character inside a string): exactly as
//!   QEMU. One "JSON parse error, stray '...'" quoting the bad token so far;
//!   the message being read is dropped; the lexer then skips input up to the
//!   next structural character (`{}[],:`), ASCII control character other
//!   than `\t` (so a newline), or byte `0xFE`/`0xFF`, and resumes there with
//!   a fresh message. Hence an ASCII control character other than `\t`, `\r`,
//!   `\n` (or `0xFF`) always resets the parser, as the QMP spec promises
//!   (it yields one "stray" error itself).
//! * **Grammar error** (e.g. a missing `:`): as QEMU, one error when the
//!   message's brackets balance. It is detected as soon as the offending token
//!   arrives; the rest of the message is only counted, not stored.
//! * **Limit exceeded**: one error, at once, and the partial message is freed.
//!   *Deviation from QEMU*, which resets its counters here and so treats every
//!   remaining closing bracket of the message as a message of its own (one
//!   "expecting value" each): we keep counting the message's brackets,
//!   discarding its tokens without storing them, until they balance, then
//!   start afresh. A single over-long token (e.g. a huge string) is skipped to
//!   its end rather than re-lexed from the middle. A lexical error still
//!   resets at once.
//!
//! Values are built iteratively (an explicit stack bounded by `max_depth`), so
//! no input depth can exhaust the call stack here. `serde_json::Value`'s own
//! `Drop` recurses, which `max_depth` keeps harmless; keep it modest.
//!
//! *Deviation:* a number too large for an `f64` (e.g. `1e999`) is an error
//! ("JSON parse error, number '1e999' out of range"); QEMU stores infinity and
//! would echo it as `inf`, which is not JSON.

use serde_json::{Map, Number, Value};

use super::QmpError;

/// Per-message limits. The defaults are QEMU's (`json-streamer.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of a message's tokens (whitespace between tokens excluded).
    pub max_message_bytes: usize,
    /// Tokens in one message.
    pub max_tokens: usize,
    /// Open braces plus brackets at any point of a message.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 20,
            max_tokens: 2 << 20,
            max_depth: 1 << 10,
        }
    }
}

/// Incremental JSON message reader; see the module docs.
#[derive(Debug)]
pub struct JsonStreamer {
    limits: Limits,
    lex: Lex,
    /// Bytes of the token being lexed, capped at `max_message_bytes`.
    tok: Vec<u8>,
    /// True length of the token being lexed.
    tok_len: usize,
    msg: Message,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    /// After a lexical error: skipping to a resynchronisation point.
    Recovery,
    Str {
        quote: u8,
        escaped: bool,
    },
    Num(Num),
    Keyword,
}

/// Number lexer states; see [`num_step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Sign,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Comma,
    Colon,
    Str,
    Int,
    Float,
    Keyword,
}

#[derive(Debug, Default)]
struct Message {
    braces: i64,
    brackets: i64,
    tokens: usize,
    bytes: usize,
    parser: Parser,
    state: State,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Parsing,
    /// Grammar error, reported when the message ends.
    Failed(QmpError),
    /// Limit error already reported; discarding to the end of the message.
    Reported,
}

type Output = Vec<Result<Value, QmpError>>;

fn parse_error(what: impl std::fmt::Display) -> QmpError {
    QmpError::generic(format!("JSON parse error, {what}"))
}

fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

const fn is_structural(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':')
}

/// Bytes allowed in strings (and skipped in recovery): no control
/// characters, no `0xFE`/`0xFF`. UTF-8 validity is checked by the parser.
const fn in_string_range(b: u8) -> bool {
    matches!(b, 0x20..=0xFD)
}

enum NumStep {
    Next(Num),
    /// The number ended before this byte, which is looked at again.
    End(Tok),
    /// The byte cannot continue the number: a lexical error.
    Bad,
}

fn num_step(n: Num, b: u8) -> NumStep {
    use Num::*;
    match (n, b) {
        (Sign, b'0') => NumStep::Next(Zero),
        (Sign | Int, b'1'..=b'9') | (Int, b'0') => NumStep::Next(Int),
        (Zero | Int, b'.') => NumStep::Next(Dot),
        (Dot | Frac, b'0'..=b'9') => NumStep::Next(Frac),
        (Int | Frac, b'e' | b'E') => NumStep::Next(Exp),
        (Exp, b'+' | b'-') => NumStep::Next(ExpSign),
        (Exp | ExpSign | ExpDigits, b'0'..=b'9') => NumStep::Next(ExpDigits),
        (Zero | Int, _) => NumStep::End(Tok::Int),
        (Frac | ExpDigits, _) => NumStep::End(Tok::Float),
        (Sign | Dot | Exp | ExpSign, _) => NumStep::Bad,
    }
}

impl JsonStreamer {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            lex: Lex::Start,
            tok: Vec::new(),
            tok_len: 0,
            msg: Message::default(),
        }
    }

    /// Feeds bytes; returns every message or error they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, QmpError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(&b) = rest.first() {
            let used = self.step(b, rest, &mut out);
            rest = rest.get(used..).unwrap_or_default();
        }
        out
    }

    /// Handles the first byte `b` of `rest`; returns how many bytes were
    /// consumed (0 when the byte must be looked at again in the new state).
    fn step(&mut self, b: u8, rest: &[u8], out: &mut Output) -> usize {
        match self.lex {
            Lex::Start => {
                let next = match b {
                    b' ' | b'\t' | b'\r' | b'\n' => return 1,
                    b'"' | b'\'' => Lex::Str {
                        quote: b,
                        escaped: false,
                    },
                    b'0' => Lex::Num(Num::Zero),
                    b'1'..=b'9' => Lex::Num(Num::Int),
                    b'-' => Lex::Num(Num::Sign),
                    b'a'..=b'z' => Lex::Keyword,
                    b'{' => return self.single(Tok::LCurly, b, out),
                    b'}' => return self.single(Tok::RCurly, b, out),
                    b'[' => return self.single(Tok::LSquare, b, out),
                    b']' => return self.single(Tok::RSquare, b, out),
                    b',' => return self.single(Tok::Comma, b, out),
                    b':' => return self.single(Tok::Colon, b, out),
                    _ => return self.lex_error(b, out),
                };
                self.lex = next;
                self.grow(&[b], out);
                1
            }
            Lex::Recovery => {
                if b == b'\t' || (in_string_range(b) && !is_structural(b)) {
                    1
                } else {
                    self.lex = Lex::Start;
                    0
                }
            }
            Lex::Str {
                quote,
                escaped: true,
            } => {
                if !in_string_range(b) {
                    return self.lex_error(b, out);
                }
                self.lex = Lex::Str {
                    quote,
                    escaped: false,
                };
                self.grow(&[b], out);
                1
            }
            Lex::Str {
                quote,
                escaped: false,
            } => {
                let run = rest
                    .iter()
                    .position(|&c| c == quote || c == b'\\' || !in_string_range(c))
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.grow(rest.get(..run).unwrap_or_default(), out);
                    return run;
                }
                if b == quote {
                    self.grow(&[b], out);
                    self.lex = Lex::Start;
                    self.finish(Tok::Str, out);
                } else if b == b'\\' {
                    self.grow(&[b], out);
                    self.lex = Lex::Str {
                        quote,
                        escaped: true,
                    };
                } else {
                    return self.lex_error(b, out);
                }
                1
            }
            Lex::Num(n) => match num_step(n, b) {
                NumStep::Next(n) => {
                    self.lex = Lex::Num(n);
                    self.grow(&[b], out);
                    1
                }
                NumStep::End(kind) => {
                    self.lex = Lex::Start;
                    self.finish(kind, out);
                    0
                }
                NumStep::Bad => self.lex_error(b, out),
            },
            Lex::Keyword => {
                if b.is_ascii_lowercase() {
                    self.grow(&[b], out);
                    1
                } else {
                    self.lex = Lex::Start;
                    self.finish(Tok::Keyword, out);
                    0
                }
            }
        }
    }

    /// A one-byte token.
    fn single(&mut self, kind: Tok, b: u8, out: &mut Output) -> usize {
        self.grow(&[b], out);
        self.finish(kind, out);
        1
    }

    /// Stores bytes of the current token (never more than the size limit).
    fn store(&mut self, bytes: &[u8]) {
        let room = self.limits.max_message_bytes.saturating_sub(self.tok.len());
        self.tok
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        self.tok_len = self.tok_len.saturating_add(bytes.len());
    }

    /// Adds bytes to the current token and enforces the message size limit
    /// while the token is still growing, so memory stays bounded.
    fn grow(&mut self, bytes: &[u8], out: &mut Output) {
        self.store(bytes);
        let total = self.msg.bytes.saturating_add(self.tok_len);
        if !matches!(self.msg.state, State::Reported) && total >= self.limits.max_message_bytes {
            self.fail("JSON token size limit exceeded", out);
        }
    }

    /// Reports a limit error now and discards the rest of the message.
    fn fail(&mut self, desc: &str, out: &mut Output) {
        out.push(Err(QmpError::generic(desc)));
        self.msg.state = State::Reported;
        self.msg.parser = Parser::default();
    }

    /// A byte that no token can contain at this point.
    fn lex_error(&mut self, b: u8, out: &mut Output) -> usize {
        self.store(&[b]);
        out.push(Err(parse_error(format_args!(
            "stray '{}'",
            lossy(&self.tok)
        ))));
        self.tok.clear();
        self.tok_len = 0;
        self.msg = Message::default();
        self.lex = Lex::Recovery;
        1
    }

    /// A complete token: account for it, parse it, and end the message when
    /// its brackets balance.
    fn finish(&mut self, kind: Tok, out: &mut Output) {
        let m = &mut self.msg;
        match kind {
            Tok::LCurly => m.braces += 1,
            Tok::RCurly => m.braces -= 1,
            Tok::LSquare => m.brackets += 1,
            Tok::RSquare => m.brackets -= 1,
            _ => {}
        }
        let max_depth = i64::try_from(self.limits.max_depth).unwrap_or(i64::MAX);
        let limit = if matches!(m.state, State::Reported) {
            None
        } else if m.tokens >= self.limits.max_tokens {
            Some("JSON token count limit exceeded")
        } else if m.braces + m.brackets > max_depth {
            Some("JSON nesting depth limit exceeded")
        } else {
            m.tokens += 1;
            m.bytes = m.bytes.saturating_add(self.tok_len);
            if matches!(m.state, State::Parsing)
                && let Err(e) = m.parser.token(kind, &self.tok)
            {
                m.state = State::Failed(e);
                m.parser = Parser::default();
            }
            None
        };
        if let Some(desc) = limit {
            self.fail(desc, out);
        }
        self.tok.clear();
        self.tok_len = 0;

        let m = &self.msg;
        if (m.braces > 0 || m.brackets > 0) && m.braces >= 0 && m.brackets >= 0 {
            return;
        }
        let done = std::mem::take(&mut self.msg);
        match done.state {
            State::Parsing => out.push(done.parser.finish()),
            State::Failed(e) => out.push(Err(e)),
            State::Reported => {}
        }
    }
}

/// Where the innermost open container stands; see [`Parser::token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Just opened: a value (a key, in an object) or the closing bracket.
    First,
    /// After `,` in an array or `:` in an object: a value.
    Value,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket.
    Sep,
}

#[derive(Debug)]
enum Frame {
    Array(Vec<Value>, Slot),
    /// The map, the key awaiting its value, and the slot.
    Object(Map<String, Value>, Option<String>, Slot),
}

/// Builds one message's value token by token with an explicit stack.
/// Errors are QEMU's, and come in the order its recursive descent finds them.
#[derive(Debug, Default)]
struct Parser {
    stack: Vec<Frame>,
    done: Option<Value>,
}

impl Parser {
    fn token(&mut self, kind: Tok, text: &[u8]) -> Result<(), QmpError> {
        let (slot, in_array) = match self.stack.last() {
            None => (Slot::Value, false),
            Some(Frame::Array(_, slot)) => (*slot, true),
            Some(Frame::Object(_, _, slot)) => (*slot, false),
        };
        match (slot, kind) {
            (Slot::First | Slot::Sep, Tok::RSquare) if in_array => self.close(),
            (Slot::First | Slot::Sep, Tok::RCurly) if !in_array => self.close(),
            (Slot::Sep, Tok::Comma) => {
                self.set_slot(if in_array { Slot::Value } else { Slot::Key });
                Ok(())
            }
            (Slot::Sep, _) if in_array => Err(parse_error("expected separator in list")),
            (Slot::Sep, _) => Err(parse_error("expected separator in dict")),
            (Slot::Colon, Tok::Colon) => {
                self.set_slot(Slot::Value);
                Ok(())
            }
            (Slot::Colon, _) => Err(parse_error("missing : in object pair")),
            (_, Tok::LSquare) => {
                self.stack.push(Frame::Array(Vec::new(), Slot::First));
                Ok(())
            }
            (_, Tok::LCurly) => {
                self.stack
                    .push(Frame::Object(Map::new(), None, Slot::First));
                Ok(())
            }
            (_, Tok::Str | Tok::Int | Tok::Float | Tok::Keyword) => {
                let v = scalar(kind, text)?;
                self.deliver(v)
            }
            _ => Err(parse_error("expecting value")),
        }
    }

    fn set_slot(&mut self, new: Slot) {
        if let Some(Frame::Array(_, slot) | Frame::Object(_, _, slot)) = self.stack.last_mut() {
            *slot = new;
        }
    }

    fn close(&mut self) -> Result<(), QmpError> {
        match self.stack.pop() {
            Some(Frame::Array(items, _)) => self.deliver(Value::Array(items)),
            Some(Frame::Object(map, _, _)) => self.deliver(Value::Object(map)),
            None => Err(parse_error("expecting value")),
        }
    }

    /// Hands a finished value to the innermost container (or the message).
    fn deliver(&mut self, v: Value) -> Result<(), QmpError> {
        match self.stack.last_mut() {
            None => self.done = Some(v),
            Some(Frame::Array(items, slot)) => {
                items.push(v);
                *slot = Slot::Sep;
            }
            Some(Frame::Object(map, key, slot)) => match (key.take(), v) {
                (None, Value::String(k)) => {
                    *key = Some(k);
                    *slot = Slot::Colon;
                }
                (None, _) => return Err(parse_error("key is not a string in object")),
                (Some(k), _) if map.contains_key(&k) => return Err(parse_error("duplicate key")),
                (Some(k), v) => {
                    map.insert(k, v);
                    *slot = Slot::Sep;
                }
            },
        }
        Ok(())
    }

    fn finish(self) -> Result<Value, QmpError> {
        self.done.ok_or_else(|| parse_error("premature EOI"))
    }
}

fn scalar(kind: Tok, text: &[u8]) -> Result<Value, QmpError> {
    match kind {
        Tok::Str => decode_string(text).map(Value::String),
        Tok::Keyword => match text {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            _ => Err(parse_error(format_args!(
                "invalid keyword '{}'",
                lossy(text)
            ))),
        },
        _ => number(kind == Tok::Int, &lossy(text)),
    }
}

/// Integers that fit `i64`, else `u64`, stay integers; the rest are `f64`.
fn number(integer: bool, s: &str) -> Result<Value, QmpError> {
    if integer {
        if let Ok(n) = s.parse::<i64>() {
            return Ok(n.into());
        }
        if let Ok(n) = s.parse::<u64>() {
            return Ok(n.into());
        }
    }
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| parse_error(format_args!("number '{s}' out of range")))
}

/// Decodes a string token, quotes included.
fn decode_string(tok: &[u8]) -> Result<String, QmpError> {
    let end = tok.len().saturating_sub(1);
    let mut out = String::with_capacity(end);
    let mut i = 1;
    while let Some(rest) = tok.get(i..end).filter(|r| !r.is_empty()) {
        if rest.first() == Some(&b'\\') {
            let (c, used) = unescape(tok, i)?;
            out.push(c);
            i += used;
        } else {
            let run = rest.iter().position(|&c| c == b'\\').unwrap_or(rest.len());
            decode_raw(rest.get(..run).unwrap_or_default(), &mut out)?;
            i += run;
        }
    }
    Ok(out)
}

/// Unescaped string bytes: QEMU's modified UTF-8 (`C0 80` is U+0000).
fn decode_raw(mut raw: &[u8], out: &mut String) -> Result<(), QmpError> {
    while !raw.is_empty() {
        let (ascii, rest) =
            raw.split_at(raw.iter().position(|b| !b.is_ascii()).unwrap_or(raw.len()));
        out.push_str(std::str::from_utf8(ascii).unwrap_or_default());
        if rest.is_empty() {
            break;
        }
        let (c, len) =
            utf8_char(rest).ok_or_else(|| parse_error("invalid UTF-8 sequence in string"))?;
        out.push(c);
        raw = rest.get(len..).unwrap_or_default();
    }
    Ok(())
}

fn utf8_char(b: &[u8]) -> Option<(char, usize)> {
    let len = match *b.first()? {
        0xC0 if b.get(1) == Some(&0x80) => return Some(('\0', 2)),
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    let c = std::str::from_utf8(b.get(..len)?).ok()?.chars().next()?;
    valid_char(u32::from(c)).map(|c| (c, len))
}

/// QEMU accepts Unicode scalar values except the 66 noncharacters.
fn valid_char(cp: u32) -> Option<char> {
    let nonchar = (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE;
    if nonchar { None } else { char::from_u32(cp) }
}

/// The escape at `tok[i]` (a backslash): the char and the bytes it spans.
fn unescape(tok: &[u8], i: usize) -> Result<(char, usize), QmpError> {
    let c = match tok.get(i + 1) {
        Some(b'"') => '"',
        Some(b'\'') => '\'',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => return unicode_escape(tok, i),
        _ => return Err(parse_error("invalid escape sequence in string")),
    };
    Ok((c, 2))
}

/// `\uXXXX`, or a `\uXXXX\uXXXX` surrogate pair. On error QEMU quotes the
/// 6 (or 12) bytes of the escape, cut at the end of the token.
fn unicode_escape(tok: &[u8], i: usize) -> Result<(char, usize), QmpError> {
    let hex4 = |at: usize| {
        tok.get(at..at + 4)?
            .iter()
            .try_fold(0, |acc, &c| Some(acc * 16 + char::from(c).to_digit(16)?))
    };
    let mut len = 6;
    let mut cp = hex4(i + 2);
    if let Some(lead @ 0xD800..=0xDBFF) = cp
        && tok.get(i + 6..i + 8) == Some(b"\\u".as_slice())
    {
        cp = match hex4(i + 8) {
            Some(trail @ 0xDC00..=0xDFFF) => {
                len = 12;
                Some(0x10000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
            }
            _ => None,
        };
    }
    match cp.and_then(valid_char) {
        Some(c) => Ok((c, len)),
        None => {
            let shown = tok.get(i..tok.len().min(i + len)).unwrap_or_default();
            Err(parse_error(format_args!(
                "{} is not a valid Unicode character",
                lossy(shown)
            )))
        }
    }
}
