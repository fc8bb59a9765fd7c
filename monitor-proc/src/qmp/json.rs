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
//!   QEMU. One "JSON parse error, stray '...'" quoting the bad token so far
//!   (as QEMU shows it: cut at a NUL byte, each invalid UTF-8 sequence as
//!   U+FFFD); the message being read is dropped; the lexer then skips input up to the
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

/// Token buffer capacity kept between tokens.
const KEEP_TOKEN_CAPACITY: usize = 64 << 10;

fn parse_error(what: impl std::fmt::Display) -> QmpError {
    QmpError::generic(format!("JSON parse error, {what}"))
}

/// Bytes as QEMU's JSON writer shows them: each invalid sequence (a bad
/// lead byte and the continuation bytes it claims) becomes one U+FFFD.
fn lossy(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(&lead) = rest.first() {
        let (c, len) = utf8_char(rest).unwrap_or_else(|| {
            let claimed = match lead {
                0xC0..=0xFD => lead.leading_ones() as usize - 1,
                _ => 0,
            };
            let cont = rest.iter().skip(1).take(claimed);
            (
                '\u{FFFD}',
                1 + cont.take_while(|&&b| b & 0xC0 == 0x80).count(),
            )
        });
        out.push(c);
        rest = rest.get(len..).unwrap_or_default();
    }
    out
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
        (Zero, b'0'..=b'9') | (Sign | Dot | Exp | ExpSign, _) => NumStep::Bad,
        (Zero | Int, _) => NumStep::End(Tok::Int),
        (Frac | ExpDigits, _) => NumStep::End(Tok::Float),
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

    /// A byte that no token can contain at this point. QEMU quotes the token
    /// as a C string, so a NUL byte (only ever the last one) is not shown.
    fn lex_error(&mut self, b: u8, out: &mut Output) -> usize {
        self.store(&[b]);
        let text = self.tok.split(|&c| c == 0).next().unwrap_or_default();
        out.push(Err(parse_error(format_args!("stray '{}'", lossy(text)))));
        self.clear_token();
        self.msg = Message::default();
        self.lex = Lex::Recovery;
        1
    }

    /// Forgets the current token, releasing the buffer a huge one left behind.
    fn clear_token(&mut self) {
        self.tok.clear();
        self.tok.shrink_to(KEEP_TOKEN_CAPACITY);
        self.tok_len = 0;
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
        self.clear_token();

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

/// One of Unicode's 66 noncharacters, which QEMU neither reads nor writes.
pub(super) fn is_noncharacter(cp: u32) -> bool {
    (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE
}

/// QEMU accepts Unicode scalar values except the noncharacters.
fn valid_char(cp: u32) -> Option<char> {
    if is_noncharacter(cp) {
        None
    } else {
        char::from_u32(cp)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Out = Vec<Result<Value, QmpError>>;

    fn err(what: &str) -> Result<Value, QmpError> {
        Err(parse_error(what))
    }

    fn whole(input: &[u8]) -> Out {
        JsonStreamer::new(Limits::default()).feed(input)
    }

    fn chunked(s: &mut JsonStreamer, input: &[u8], size: usize) -> Out {
        input.chunks(size).flat_map(|c| s.feed(c)).collect()
    }

    /// Feeds `input` whole, byte by byte and in odd chunks; all must agree.
    fn run(input: &[u8]) -> Out {
        let out = whole(input);
        for size in [1, 3, 7] {
            let mut s = JsonStreamer::new(Limits::default());
            assert_eq!(chunked(&mut s, input, size), out, "chunks of {size}");
        }
        out
    }

    #[test]
    fn measured_qemu_errors() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"{\"execute\": }", &["expecting value"]),
            (b"}", &["expecting value"]),
            (b"@", &["stray '@'"]),
            (b"{\"id\":tru}", &["invalid keyword 'tru'"]),
            (b"{\"a\":1,\"a\":2}", &["duplicate key"]),
            (b"\x01", &["stray '\u{1}'"]),
            (
                b"{\"execute\":\"a\x01b\"}",
                &["stray '\"a\u{1}'", "expecting value"],
            ),
            (b"\"a\x01b\"", &["stray '\"a\u{1}'"]),
            (b"\x00", &["stray ''"]),
            (b"[\"ab\x00\"]", &["stray '\"ab'", "expecting value"]),
            (b"\xc3\xa9", &["stray '\u{FFFD}'"]),
            (b"\xff", &["stray '\u{FFFD}'"]),
            // One U+FFFD per bad lead byte and the continuation bytes it claims.
            (
                b"'x\xf0\x8c]\xe0\x80\x80\xef\xbf\xbe\xc3\xa9\x80\x01",
                &["stray ''x\u{FFFD}]\u{FFFD}\u{FFFD}\u{e9}\u{FFFD}\u{1}'"],
            ),
            (b"\"\xff\"", &["stray '\"\u{FFFD}'"]),
            (b"'a\xfe'", &["stray ''a\u{FFFD}'"]),
            // 0xFE/0xFF end recovery (and are stray themselves); digits do not.
            (b"@x\xfe1 ", &["stray '@'", "stray '\u{FFFD}'"]),
            (b"\"\xc3\"", &["invalid UTF-8 sequence in string"]),
            (b"\"\xef\xbf\xbe\"", &["invalid UTF-8 sequence in string"]),
            (
                b"[\"\\uD800\"]",
                &["\\uD800 is not a valid Unicode character"],
            ),
            (
                b"[\"\\uDBFF\\uDFFF\"]",
                &["\\uDBFF\\uDFFF is not a valid Unicode character"],
            ),
            (
                b"[\"\\uD800\\u0041\"]",
                &["\\uD800 is not a valid Unicode character"],
            ),
            (
                b"[\"\\u12\"]",
                &["\\u12\" is not a valid Unicode character"],
            ),
            (b"[\"\\u\"]", &["\\u\" is not a valid Unicode character"]),
            (b"[\"\\x\"]", &["invalid escape sequence in string"]),
            (b"01 ", &["stray '01'"]),
            (b"-a", &["stray '-a'"]),
            (b"- ", &["stray '- '"]),
            (b"-}", &["stray '-}'"]),
            (b"1.x", &["stray '1.x'"]),
            (b"1e+x", &["stray '1e+x'"]),
            (b"True", &["stray 'T'"]),
            (b"{1:2}", &["key is not a string in object"]),
            (b"{[1 2]:3}", &["expected separator in list"]),
            (b"{\"a\" 1}", &["missing : in object pair"]),
            (b"{\"a\":1 \"b\"}", &["expected separator in dict"]),
            (b"[1 2]", &["expected separator in list"]),
            (b"[1,]", &["expecting value"]),
            (b"{\"a\":1,}", &["expecting value"]),
            (b"{]", &["expecting value"]),
            (b"[}", &["expecting value"]),
            (
                b"{\"a\": 1]}",
                &["expected separator in dict", "expecting value"],
            ),
            (b"[{]}", &["expecting value"]),
        ];
        for (input, expected) in cases {
            let expected: Out = expected.iter().map(|e| err(e)).collect();
            assert_eq!(run(input), expected, "input {:?}", lossy(input));
        }
    }

    #[test]
    fn lexical_error_desc_keeps_raw_control_char() {
        let out = whole(b"\x01");
        let Some(Err(e)) = out.first() else {
            panic!("no error: {out:?}")
        };
        assert_eq!(e.desc, "JSON parse error, stray '\u{1}'");
        assert_eq!(e.class, super::super::ErrorClass::GenericError);
    }

    #[test]
    fn values_and_qemu_extensions() {
        let out = run(b"{'execute':'nope','id':'a\\'b\"c'}");
        assert_eq!(out, vec![Ok(json!({"execute": "nope", "id": "a'b\"c"}))]);
        let mut input = br#"["\u00e9\uD83D\uDE00\u0000\n\t\b\f\r\/\\\"", "\u00E9", ""#.to_vec();
        input.extend_from_slice("é😀\", \"".as_bytes());
        input.extend_from_slice(b"\xc0\x80\"]");
        let out = run(&input);
        assert_eq!(
            out,
            vec![Ok(json!(["é😀\0\n\t\u{8}\u{c}\r/\\\"", "é", "é😀", "\0"]))]
        );
        let out = run(b"{\"a\": [true, false, null, {}, []], \"b\": {\"c\": \"d\"}}");
        assert_eq!(
            out,
            vec![Ok(
                json!({"a": [true, false, null, {}, []], "b": {"c": "d"}})
            )]
        );
        // Member order is preserved.
        let out = run(b"{\"z\": 1, \"a\": 2}");
        let keys: Vec<String> = match out.first() {
            Some(Ok(Value::Object(m))) => m.keys().cloned().collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(keys, ["z", "a"]);
    }

    #[test]
    fn numbers_keep_integer_width() {
        let out = run(b"[0, -0, -1, 9223372036854775807, 9223372036854775808, \
              18446744073709551615, 18446744073709551616, -9223372036854775809, \
              1.5e3, 1E2, 0.5e-1, -2.5]");
        let expected = json!([
            0,
            0,
            -1,
            i64::MAX,
            9_223_372_036_854_775_808_u64,
            u64::MAX,
            18_446_744_073_709_551_616.0,
            -9_223_372_036_854_775_809.0,
            1500.0,
            100.0,
            0.05,
            -2.5
        ]);
        assert_eq!(out, vec![Ok(expected)]);
        // `0` cannot take an exponent: QEMU lexes `0e5` as 0, keyword e, 5.
        assert_eq!(
            run(b"0e5 "),
            vec![Ok(json!(0)), err("invalid keyword 'e'"), Ok(json!(5))]
        );
        assert_eq!(run(b"[1e999]"), vec![err("number '1e999' out of range")]);
    }

    #[test]
    fn messages_need_no_newline_and_scalars_wait_for_lookahead() {
        let mut s = JsonStreamer::new(Limits::default());
        let out = s.feed(b"{\"a\":1}{\"b\":2}[3]\"s\"'t' 4 true");
        assert_eq!(
            out,
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": 2})),
                Ok(json!([3])),
                Ok(json!("s")),
                Ok(json!("t")),
                Ok(json!(4))
            ]
        );
        assert_eq!(s.feed(b"\n"), vec![Ok(json!(true))]);
        assert_eq!(s.feed(b"12"), vec![]);
        assert_eq!(s.feed(b"3{}"), vec![Ok(json!(123)), Ok(json!({}))]);
    }

    #[test]
    fn fragmentation_does_not_matter() {
        let input = "{\"execute\": \"x\", \"arguments\": {\"s\": \"é😀\\u00e9\\ud83d\\ude00\", \
                     \"n\": -12.5e-3, \"l\": [1, [2, {}]], 'q': 'it\\'s'}, \"id\": 1}\r\n\
                     [1]\"two\" 3 nul true @ {\"ok\": null}\n";
        let out = run(input.as_bytes());
        assert_eq!(out.len(), 8, "{out:?}");
        assert_eq!(out.get(1), Some(&Ok(json!([1]))));
        assert_eq!(out.get(4), Some(&err("invalid keyword 'nul'")));
        assert_eq!(out.get(5), Some(&Ok(json!(true))));
        assert_eq!(out.get(6), Some(&err("stray '@'")));
        assert_eq!(out.get(7), Some(&Ok(json!({"ok": null}))));
    }

    #[test]
    fn lexical_errors_resume_at_next_token_like_qemu() {
        assert_eq!(
            run(b"{\"execute\": @}{\"execute\":\"x\"}"),
            vec![
                err("stray '@'"),
                err("expecting value"),
                Ok(json!({"execute": "x"}))
            ]
        );
        // Recovery skips to a newline (not a tab), a structural char or 0xFE/0xFF.
        assert_eq!(
            run(b"@a\t\"x\" 5\n1 "),
            vec![err("stray '@'"), Ok(json!(1))]
        );
        assert_eq!(
            run(b"{\"a\": \xff{\"b\":1}"),
            vec![err("stray '\u{FFFD}'"), Ok(json!({"b": 1}))]
        );
        // A control character resets a half-read message.
        assert_eq!(
            run(b"{\"execute\": \"x\", \"arguments\": {\x1b{\"execute\":\"y\"}"),
            vec![err("stray '\u{1b}'"), Ok(json!({"execute": "y"}))]
        );
        // A pending grammar error is dropped by the reset, as QEMU never saw it.
        assert_eq!(
            run(b"{\"a\" 1, \x01 {\"ok\":1}"),
            vec![err("stray '\u{1}'"), Ok(json!({"ok": 1}))]
        );
    }

    #[test]
    fn grammar_error_reported_once_at_message_end() {
        let mut s = JsonStreamer::new(Limits::default());
        assert_eq!(s.feed(b"{\"a\" 1, \"b\": [1, 2, {\"c\": 3}"), vec![]);
        assert!(
            s.msg.parser.stack.is_empty(),
            "failed message is not stored"
        );
        assert_eq!(
            s.feed(b"]}{\"ok\":1}"),
            vec![err("missing : in object pair"), Ok(json!({"ok": 1}))]
        );
    }

    fn small() -> JsonStreamer {
        JsonStreamer::new(Limits {
            max_message_bytes: 32,
            max_tokens: 10,
            max_depth: 3,
        })
    }

    #[test]
    fn default_limits_are_qemus() {
        let l = Limits::default();
        assert_eq!(
            (l.max_message_bytes, l.max_tokens, l.max_depth),
            (64 * 1024 * 1024, 2_097_152, 1024)
        );
    }

    #[test]
    fn size_limit_one_error_bounded_memory_and_recovery() {
        let size = || err_plain("JSON token size limit exceeded");
        let mut s = small();
        // Token bytes + 1 may reach the limit but not exceed it, as in QEMU.
        let fits = format!("\"{}\"", "a".repeat(29));
        assert_eq!(s.feed(fits.as_bytes()), vec![Ok(json!("a".repeat(29)))]);
        let over = format!("\"{}\"", "a".repeat(30));
        assert_eq!(s.feed(over.as_bytes()), vec![size()]);

        assert_eq!(s.feed(b"{\"s\": \""), vec![]);
        let mut out = s.feed(&[b'a'; 100_000]);
        assert!(s.tok.len() <= 32, "token buffer grew to {}", s.tok.len());
        assert!(s.msg.parser.stack.is_empty());
        out.extend(s.feed(b"\", \"t\": [1, 2]}{\"ok\":1}"));
        assert_eq!(out, vec![size(), Ok(json!({"ok": 1}))]);
    }

    fn err_plain(desc: &str) -> Result<Value, QmpError> {
        Err(QmpError::generic(desc))
    }

    #[test]
    fn token_count_limit() {
        let count = || err_plain("JSON token count limit exceeded");
        let mut s = small();
        assert_eq!(s.feed(b"[1,2,[[]]]"), vec![Ok(json!([1, 2, [[]]]))]);
        assert_eq!(s.feed(b"[1,2,3,4,5]"), vec![count()]);
        // Mid-message: one error, the rest of the message is skipped.
        assert_eq!(
            s.feed(b"[1,2,3,4,5,6,[7],8][9]"),
            vec![count(), Ok(json!([9]))]
        );
        // A limit error replaces a pending grammar error, as in QEMU.
        assert_eq!(s.feed(b"{\"a\" 1,2,3,4,5,6}"), vec![count()]);
    }

    #[test]
    fn nesting_limit() {
        let depth = || err_plain("JSON nesting depth limit exceeded");
        let mut s = small();
        assert_eq!(s.feed(b"[[[1]]]"), vec![Ok(json!([[[1]]]))]);
        assert_eq!(s.feed(b"{\"a\":[[1]]}"), vec![Ok(json!({"a": [[1]]}))]);
        assert_eq!(s.feed(b"[[[[1]]]][2]"), vec![depth(), Ok(json!([2]))]);
        assert_eq!(s.feed(b"{\"a\":[[[1]]]}"), vec![depth()]);
        // A lexical error still resets a discarded message at once.
        assert_eq!(
            s.feed(b"[[[[\x01[1]"),
            vec![depth(), err("stray '\u{1}'"), Ok(json!([1]))]
        );
    }

    fn nested(depth: usize, inner: &str) -> String {
        format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn default_depth_matches_qemu() {
        let depth = || err_plain("JSON nesting depth limit exceeded");
        let out = whole(nested(1024, "1").as_bytes());
        assert!(matches!(out.as_slice(), [Ok(Value::Array(_))]), "{out:?}");
        assert_eq!(whole(nested(1025, "1").as_bytes()), vec![depth()]);
        let in_object = |n| {
            format!(
                "{{\"execute\": \"x\", \"arguments\": {{\"a\": {}}}}}",
                nested(n, "")
            )
        };
        assert!(matches!(
            whole(in_object(1022).as_bytes()).as_slice(),
            [Ok(_)]
        ));
        assert_eq!(whole(in_object(1023).as_bytes()), vec![depth()]);
        assert_eq!(whole(in_object(1024).as_bytes()), vec![depth()]);
    }

    #[test]
    fn depth_100000_neither_overflows_nor_spews() {
        let mut s = JsonStreamer::new(Limits::default());
        let mut input = nested(100_000, "1");
        input.push_str(&"{\"a\":".repeat(100_000));
        input.push_str(&"}".repeat(100_000));
        input.push_str("{\"execute\":\"x\"}");
        let depth = || err_plain("JSON nesting depth limit exceeded");
        assert_eq!(
            chunked(&mut s, input.as_bytes(), 4096),
            vec![depth(), depth(), Ok(json!({"execute": "x"}))]
        );
    }

    #[test]
    fn ten_megabyte_string_is_accepted() {
        let big = "x".repeat(10 << 20);
        let input = format!("{{\"execute\": \"e\", \"arguments\": {{\"s\": \"{big}\"}}}}");
        let mut s = JsonStreamer::new(Limits::default());
        let out = chunked(&mut s, input.as_bytes(), 64 << 10);
        let [Ok(v)] = out.as_slice() else {
            panic!("{} results", out.len())
        };
        assert_eq!(
            v.pointer("/arguments/s")
                .and_then(Value::as_str)
                .map(str::len),
            Some(10 << 20)
        );
        assert!(s.tok.capacity() <= KEEP_TOKEN_CAPACITY, "token buffer kept");
    }

    /// xorshift64*: deterministic pseudo-random numbers without dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics_and_always_resyncs() {
        const SEEDS: &[&[u8]] = &[
            b"{\"execute\": \"query-status\", \"id\": [1, 2.5e3, -0]}",
            b"{'execute':'x','arguments':{'a':\"\\u00e9\\ud83d\\ude00\",'b':[true,null]}}",
            b"[[[[\"\\\\\", {\"k\": false}]]]]",
            "\"é😀\\'\\/\\b\"".as_bytes(),
        ];
        const ALPHABET: &[u8] =
            b"{}[],:\"'\\-+.0123456789eEtruefalsn \t\r\nu@\x01\x7f\xc3\xa9\xff\xf0\x9f";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let mut input: Vec<u8> = if round % 2 == 0 {
                let len = rng.below(120);
                (0..len)
                    .map(|_| match rng.below(8) {
                        0 => rng.next().to_le_bytes().first().copied().unwrap_or(0),
                        _ => ALPHABET
                            .get(rng.below(ALPHABET.len()))
                            .copied()
                            .unwrap_or(b' '),
                    })
                    .collect()
            } else {
                SEEDS
                    .get(rng.below(SEEDS.len()))
                    .copied()
                    .unwrap_or_default()
                    .to_vec()
            };
            for _ in 0..rng.below(4) {
                let at = rng.below(input.len() + 1);
                let byte = ALPHABET
                    .get(rng.below(ALPHABET.len()))
                    .copied()
                    .unwrap_or(b'x');
                match rng.below(3) {
                    0 if at < input.len() => {
                        input.remove(at);
                    }
                    1 if at < input.len() => {
                        if let Some(b) = input.get_mut(at) {
                            *b = byte;
                        }
                    }
                    _ => input.insert(at, byte),
                }
            }
            let limits = if round % 3 == 0 {
                Limits {
                    max_message_bytes: 24,
                    max_tokens: 6,
                    max_depth: 2,
                }
            } else {
                Limits::default()
            };
            let mut a = JsonStreamer::new(limits);
            let mut b = JsonStreamer::new(limits);
            let out = a.feed(&input);
            assert_eq!(chunked(&mut b, &input, 1 + rng.below(5)), out, "{input:?}");
            // A control character always brings the reader back.
            let tail = a.feed(b"\x01{\"ok\":1}");
            assert_eq!(tail.last(), Some(&Ok(json!({"ok": 1}))), "{input:?}");
        }
    }
}
