//! NBD wire protocol: the magics, option / reply / command / flag / error numbers, the
//! structured-reply chunk types and the `base:allocation` context of the NBD protocol
//! specification (`doc/proto.md` of NetworkBlockDevice/nbd), and the big-endian encoding
//! and bounds-checked decoding of its messages. Nothing here does I/O.

use std::io;

// ---------------------------------------------------------------------------------------
// Magics.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle `cliserv_magic` (obsolete; recognised only to refuse it).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------
// Handshake flags (server, u16) and client flags (u32).

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------
// Transmission flags (u16).

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TFLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------
// Options.

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------
// Option reply types; errors have bit 31 set.

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------------------
// NBD_REP_INFO types.

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------
// Commands and command flags.

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------
// Structured replies.

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// ---------------------------------------------------------------------------------------
// Error values (the wire values, not necessarily the host's errno).

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------
// Metadata contexts.

/// The one context this implementation knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` state: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------
// Sizes and limits.

/// Longest string (export name, description, error message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Advertised minimum block size.
pub const MIN_BLOCK: u32 = 1;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Advertised maximum block size: the longest READ or WRITE payload, 32 MiB.
pub const MAX_BLOCK: u32 = 32 << 20;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A request header (the payload of a WRITE follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a header; `None` when the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        let mut r = Reader::new(b);
        if r.u32()? != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An option request header; `None` when the magic is wrong.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Option<(u32, u32)> {
    let mut r = Reader::new(b);
    if r.u64()? != IHAVEOPT {
        return None;
    }
    Some((r.u32()?, r.u32()?))
}

/// Encodes an option request.
pub fn put_option(buf: &mut Vec<u8>, option: u32, data: &[u8]) {
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&len32(data.len()).to_be_bytes());
    buf.extend_from_slice(data);
}

/// Encodes an option reply.
pub fn put_option_reply(buf: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    buf.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&reply.to_be_bytes());
    buf.extend_from_slice(&len32(data.len()).to_be_bytes());
    buf.extend_from_slice(data);
}

/// Where the reply encoders append their bytes: a `Vec`, or the server's reusable buffers.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Encodes a simple reply header.
pub fn put_simple_reply(buf: &mut impl Sink, error: u32, cookie: u64) {
    buf.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf.put(&error.to_be_bytes());
    buf.put(&cookie.to_be_bytes());
}

/// Encodes a structured reply chunk header; `length` is the payload's.
pub fn put_chunk_header(buf: &mut impl Sink, flags: u16, kind: u16, cookie: u64, length: u32) {
    buf.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    buf.put(&flags.to_be_bytes());
    buf.put(&kind.to_be_bytes());
    buf.put(&cookie.to_be_bytes());
    buf.put(&length.to_be_bytes());
}

/// Encodes a final `NBD_REPLY_TYPE_ERROR` chunk with a message (cut to fit the protocol's
/// string limit).
pub fn put_error_chunk(buf: &mut impl Sink, cookie: u64, error: u32, msg: &str) {
    let msg = truncate_utf8(msg, MAX_STRING);
    put_chunk_header(
        buf,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len32(6 + msg.len()),
    );
    buf.put(&error.to_be_bytes());
    buf.put(&(msg.len() as u16).to_be_bytes());
    buf.put(msg.as_bytes());
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A length that the callers have already bounded, as the protocol's u32.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The wire error for a device error (QEMU's `system_errno_to_nbd_errno`, except that
/// unknown errors become `EIO` rather than `EINVAL`).
pub fn errno_to_nbd(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        _ => EIO,
    }
}

/// The host error for a wire error (an unknown value counts as `EINVAL`, as the
/// specification asks of clients).
pub fn nbd_to_io_error(e: u32) -> io::Error {
    io::Error::from_raw_os_error(match e {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    })
}

/// Name of an option, for messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of a command, for messages.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// A bounds-checked big-endian reader over a byte slice: every getter returns `None`
/// instead of reading past the end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A u32 length followed by that many bytes.
    pub fn string32(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.bytes(usize::try_from(n).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[0, 0, 0, 5, 1, 2]);
        assert_eq!(r.string32(), None);
        let mut r = Reader::new(&[0, 0, 0, 2, 1, 2, 9]);
        assert_eq!(r.string32(), Some(&[1u8, 2][..]));
        assert_eq!(r.u16(), None);
        assert_eq!(r.remaining(), 1);
    }

    #[test]
    fn error_chunk_and_truncation() {
        let mut b = Vec::new();
        put_error_chunk(&mut b, 7, EINVAL, "é".repeat(3000).as_str());
        let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]) as usize;
        assert_eq!(b.len(), CHUNK_HEADER_LEN + len);
        let msglen = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert!(msglen <= MAX_STRING);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
        assert_eq!(
            errno_to_nbd(&io::Error::from_raw_os_error(libc::EROFS)),
            EPERM
        );
        assert_eq!(errno_to_nbd(&io::Error::other("x")), EIO);
        assert_eq!(nbd_to_io_error(ENOSPC).raw_os_error(), Some(libc::ENOSPC));
    }
}
