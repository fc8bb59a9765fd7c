//! The migration stream's wire format (docs/migration.md): a versioned header, then
//! checksummed sections (configuration, RAM pages with zero pages as such, vCPU state,
//! device state, end); the destination answers with one acknowledgement section.
//!
//! ```text
//! header   "SVMMIGR\n" (8 bytes)  version: u32 LE
//! section  kind: u8  length: u32 LE  payload: length bytes  crc32(kind|length|payload): u32 LE
//! ```
//!
//! Everything read is untrusted: a decoder error names what was wrong and nothing here
//! panics or allocates more than [`MAX_SECTION`] for one section.

use std::io::{self, Read, Write};

/// The stream's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"SVMMIGR\n";
/// The format this build writes and the only one it reads.
pub const VERSION: u32 = 1;
/// Guest page size: the unit of RAM in the stream.
pub const PAGE: usize = 4096;
/// The largest section payload accepted.
pub const MAX_SECTION: u32 = 4 << 20;

/// Section kinds.
mod kind {
    pub const CONFIG: u8 = 1;
    pub const PAGES: u8 = 2;
    pub const VCPU: u8 = 3;
    pub const DEVICES: u8 = 4;
    pub const END: u8 = 5;
    pub const ACK: u8 = 6;
}

/// A page record's flags, in the low bits of its offset.
const PAGE_ZERO: u64 = 1;
const PAGE_NORMAL: u64 = 0;

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    #[error("migration stream ended early (truncated)")]
    Truncated,
    #[error("not a splitvmm migration stream (bad magic)")]
    BadMagic,
    #[error("migration stream version {0}; this splitvmm reads version {VERSION} only")]
    Version(u32),
    #[error("migration stream section of {0} bytes is over the {MAX_SECTION}-byte limit")]
    TooLong(u32),
    #[error("migration stream section kind {kind}: checksum mismatch (corrupted)")]
    Checksum { kind: u8 },
    #[error("migration stream: unknown section kind {0}")]
    UnknownKind(u8),
    #[error("migration stream: malformed {0} section")]
    Malformed(&'static str),
}

/// The source's machine, which the destination's must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    pub ram_size: u64,
    pub vcpus: u32,
    pub disks: u32,
}

/// One decoded section. Page payloads stay encoded; [`PageIter`] walks them.
#[derive(Debug, PartialEq, Eq)]
pub enum Section {
    Config(StreamConfig),
    Pages(Vec<u8>),
    Vcpu {
        index: u32,
        state: Vec<u8>,
    },
    Devices(Vec<u8>),
    End,
    /// The destination's answer: `Ok` after a successful load, or why it failed.
    Ack(Result<(), String>),
}

/// One page in a [`Section::Pages`] payload: its offset in guest RAM (the memfd) and its
/// bytes, or `None` for a page of zeroes.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRecord<'a> {
    pub offset: u64,
    pub data: Option<&'a [u8]>,
}

/// Walks a pages payload; a malformed record ends the walk with an error.
#[derive(Debug)]
pub struct PageIter<'a> {
    rest: &'a [u8],
}

impl<'a> PageIter<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Self { rest: payload }
    }
}

impl<'a> Iterator for PageIter<'a> {
    type Item = Result<PageRecord<'a>, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let bad = || Some(Err(StreamError::Malformed("pages")));
        let Some((head, rest)) = self.rest.split_first_chunk::<8>() else {
            self.rest = &[];
            return bad();
        };
        let word = u64::from_le_bytes(*head);
        let offset = word & !(PAGE as u64 - 1);
        match word & (PAGE as u64 - 1) {
            PAGE_ZERO => {
                self.rest = rest;
                Some(Ok(PageRecord { offset, data: None }))
            }
            PAGE_NORMAL if rest.len() >= PAGE => {
                let (data, rest) = rest.split_at(PAGE);
                self.rest = rest;
                Some(Ok(PageRecord {
                    offset,
                    data: Some(data),
                }))
            }
            _ => {
                self.rest = &[];
                bad()
            }
        }
    }
}

/// Whether a page holds only zeroes.
pub fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Collects page records into sections of at most [`MAX_SECTION`] bytes.
#[derive(Debug, Default)]
pub struct PageBatch {
    buf: Vec<u8>,
    pub zero: u64,
    pub normal: u64,
}

impl PageBatch {
    /// Adds the page at `offset` (page-aligned), as a zero page if it is one. Returns
    /// whether the batch is full and should be written.
    pub fn push(&mut self, offset: u64, page: &[u8]) -> bool {
        debug_assert!(offset.is_multiple_of(PAGE as u64) && page.len() == PAGE);
        if is_zero(page) {
            self.buf
                .extend_from_slice(&(offset | PAGE_ZERO).to_le_bytes());
            self.zero += 1;
        } else {
            self.buf
                .extend_from_slice(&(offset | PAGE_NORMAL).to_le_bytes());
            self.buf.extend_from_slice(page);
            self.normal += 1;
        }
        self.buf.len() + 8 + PAGE > MAX_SECTION as usize
    }

    /// Adds the page at `offset` as a zero page without looking at it (a hole).
    pub fn push_zero(&mut self, offset: u64) -> bool {
        self.buf
            .extend_from_slice(&(offset | PAGE_ZERO).to_le_bytes());
        self.zero += 1;
        self.buf.len() + 8 + PAGE > MAX_SECTION as usize
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes the collected payload, leaving the batch empty.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Writes the header.
pub fn write_header(w: &mut impl Write) -> Result<(), StreamError> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    Ok(())
}

/// Reads and checks the header.
pub fn read_header(r: &mut impl Read) -> Result<(), StreamError> {
    let mut head = [0u8; 12];
    read_exact(r, &mut head)?;
    if head[..8] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != VERSION {
        return Err(StreamError::Version(version));
    }
    Ok(())
}

/// Writes one section.
pub fn write_section(w: &mut impl Write, section: &Section) -> Result<(), StreamError> {
    let mut owned = Vec::new();
    let (k, payload): (u8, &[u8]) = match section {
        Section::Config(c) => {
            owned.extend_from_slice(&c.ram_size.to_le_bytes());
            owned.extend_from_slice(&c.vcpus.to_le_bytes());
            owned.extend_from_slice(&c.disks.to_le_bytes());
            (kind::CONFIG, &owned)
        }
        Section::Pages(p) => (kind::PAGES, p),
        Section::Vcpu { index, state } => {
            owned.extend_from_slice(&index.to_le_bytes());
            owned.extend_from_slice(state);
            (kind::VCPU, &owned)
        }
        Section::Devices(d) => (kind::DEVICES, d),
        Section::End => (kind::END, &[]),
        Section::Ack(result) => {
            match result {
                Ok(()) => owned.push(0),
                Err(why) => {
                    owned.push(1);
                    owned.extend_from_slice(why.as_bytes());
                }
            }
            (kind::ACK, &owned)
        }
    };
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_SECTION)
        .ok_or(StreamError::TooLong(u32::MAX))?;
    let mut head = [0u8; 5];
    head[0] = k;
    head[1..].copy_from_slice(&len.to_le_bytes());
    let crc = Crc32::new().update(&head).update(payload).finish();
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.write_all(&crc.to_le_bytes())?;
    Ok(())
}

/// Reads one section, checking its length, checksum and shape.
pub fn read_section(r: &mut impl Read) -> Result<Section, StreamError> {
    let mut head = [0u8; 5];
    read_exact(r, &mut head)?;
    let k = head[0];
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_SECTION {
        return Err(StreamError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact(r, &mut payload)?;
    let mut crc = [0u8; 4];
    read_exact(r, &mut crc)?;
    if Crc32::new().update(&head).update(&payload).finish() != u32::from_le_bytes(crc) {
        return Err(StreamError::Checksum { kind: k });
    }
    match k {
        kind::CONFIG => {
            let p: &[u8; 16] = payload
                .as_slice()
                .try_into()
                .map_err(|_| StreamError::Malformed("config"))?;
            let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
            let mut ram = [0u8; 8];
            ram.copy_from_slice(&p[..8]);
            Ok(Section::Config(StreamConfig {
                ram_size: u64::from_le_bytes(ram),
                vcpus: u32_at(8),
                disks: u32_at(12),
            }))
        }
        kind::PAGES => Ok(Section::Pages(payload)),
        kind::VCPU => {
            let (index, state) = payload
                .split_first_chunk::<4>()
                .ok_or(StreamError::Malformed("vCPU"))?;
            Ok(Section::Vcpu {
                index: u32::from_le_bytes(*index),
                state: state.to_vec(),
            })
        }
        kind::DEVICES => Ok(Section::Devices(payload)),
        kind::END if payload.is_empty() => Ok(Section::End),
        kind::END => Err(StreamError::Malformed("end")),
        kind::ACK => match payload.split_first() {
            Some((0, [])) => Ok(Section::Ack(Ok(()))),
            Some((1, why)) => Ok(Section::Ack(Err(String::from_utf8_lossy(why).into_owned()))),
            _ => Err(StreamError::Malformed("acknowledgement")),
        },
        other => Err(StreamError::UnknownKind(other)),
    }
}

/// `read_exact` that reports a clean end of stream as [`StreamError::Truncated`].
fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StreamError::Truncated,
        _ => StreamError::Io(e),
    })
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's), slicing by 8.
#[derive(Debug, Clone, Copy)]
pub struct Crc32(u32);

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    pub fn new() -> Self {
        Self(!0)
    }

    pub fn update(mut self, data: &[u8]) -> Self {
        let t = &CRC_TABLES;
        let mut c = self.0;
        let mut chunks = data.chunks_exact(8);
        for ch in &mut chunks {
            let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
            let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
            c = t[7][(lo & 0xff) as usize]
                ^ t[6][((lo >> 8) & 0xff) as usize]
                ^ t[5][((lo >> 16) & 0xff) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xff) as usize]
                ^ t[2][((hi >> 8) & 0xff) as usize]
                ^ t[1][((hi >> 16) & 0xff) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in chunks.remainder() {
            c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
        self
    }

    pub fn finish(self) -> u32 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut s = Vec::new();
        write_header(&mut s).expect("header");
        write_section(
            &mut s,
            &Section::Config(StreamConfig {
                ram_size: 1 << 20,
                vcpus: 2,
                disks: 1,
            }),
        )
        .expect("config");
        let mut batch = PageBatch::default();
        batch.push(0, &[0u8; PAGE]);
        batch.push(0x3000, &[0xa5u8; PAGE]);
        write_section(&mut s, &Section::Pages(batch.take())).expect("pages");
        write_section(
            &mut s,
            &Section::Vcpu {
                index: 1,
                state: vec![1, 2, 3],
            },
        )
        .expect("vcpu");
        write_section(&mut s, &Section::Devices(vec![9; 10])).expect("devices");
        write_section(&mut s, &Section::End).expect("end");
        s
    }

    fn read_all(mut bytes: &[u8]) -> Result<Vec<Section>, StreamError> {
        read_header(&mut bytes)?;
        let mut out = Vec::new();
        loop {
            let s = read_section(&mut bytes)?;
            if let Section::Pages(p) = &s {
                for r in PageIter::new(p) {
                    r?;
                }
            }
            let end = s == Section::End;
            out.push(s);
            if end {
                return Ok(out);
            }
        }
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(Crc32::new().update(b"123456789").finish(), 0xcbf4_3926);
        assert_eq!(Crc32::new().finish(), 0);
        let split = Crc32::new().update(b"1234").update(b"56789").finish();
        assert_eq!(split, 0xcbf4_3926);
    }

    #[test]
    fn a_stream_round_trips_with_zero_pages_as_such() {
        let s = sample();
        let sections = read_all(&s).expect("reads back");
        assert_eq!(sections.len(), 5);
        let Section::Pages(p) = &sections[1] else {
            panic!("pages expected, got {:?}", sections[1]);
        };
        // A zero page is 8 bytes on the wire, a normal one 8 + 4096.
        assert_eq!(p.len(), 8 + 8 + PAGE);
        let pages: Vec<_> = PageIter::new(p).collect::<Result<_, _>>().expect("pages");
        assert_eq!(
            pages[0],
            PageRecord {
                offset: 0,
                data: None
            }
        );
        assert_eq!(pages[1].offset, 0x3000);
        assert_eq!(pages[1].data, Some(&[0xa5u8; PAGE][..]));
        assert_eq!(
            sections[2],
            Section::Vcpu {
                index: 1,
                state: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let s = sample();
        for cut in 0..s.len() {
            let e = read_all(&s[..cut]).expect_err("a truncated stream must fail");
            assert!(matches!(e, StreamError::Truncated), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let s = sample();
        for at in 0..s.len() {
            let mut bad = s.clone();
            bad[at] ^= 0x40;
            assert!(read_all(&bad).is_err(), "flipping byte {at} went unnoticed");
        }
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let mut s = sample();
        s[8] = 2;
        assert!(matches!(read_all(&s), Err(StreamError::Version(2))));
        let e = read_all(&s).expect_err("version").to_string();
        assert!(e.contains("version 2"), "{e}");
        s[0] = b'X';
        assert!(matches!(read_all(&s), Err(StreamError::BadMagic)));
    }

    #[test]
    fn hostile_lengths_and_kinds_are_refused_without_allocating() {
        let mut s = Vec::new();
        write_header(&mut s).expect("header");
        s.push(kind::PAGES);
        s.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&s), Err(StreamError::TooLong(u32::MAX))));

        // A well-checksummed section of an unknown kind, and malformed payloads.
        let frame = |k: u8, payload: &[u8]| {
            let mut f = Vec::new();
            write_header(&mut f).expect("header");
            let mut head = vec![k];
            head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let crc = Crc32::new().update(&head).update(payload).finish();
            f.extend_from_slice(&head);
            f.extend_from_slice(payload);
            f.extend_from_slice(&crc.to_le_bytes());
            f
        };
        assert!(matches!(
            read_all(&frame(77, b"x")),
            Err(StreamError::UnknownKind(77))
        ));
        assert!(matches!(
            read_all(&frame(kind::CONFIG, b"short")),
            Err(StreamError::Malformed("config"))
        ));
        assert!(matches!(
            read_all(&frame(kind::VCPU, b"ab")),
            Err(StreamError::Malformed("vCPU"))
        ));
        // A page record with unknown flags, and a normal page cut short.
        assert!(matches!(
            read_all(&frame(kind::PAGES, &0x1002u64.to_le_bytes())),
            Err(StreamError::Malformed("pages"))
        ));
        let mut short = 0x1000u64.to_le_bytes().to_vec();
        short.extend_from_slice(&[1; 100]);
        assert!(matches!(
            read_all(&frame(kind::PAGES, &short)),
            Err(StreamError::Malformed("pages"))
        ));
        assert!(matches!(
            read_all(&frame(kind::PAGES, &[1, 2, 3])),
            Err(StreamError::Malformed("pages"))
        ));
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        let good = sample();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut s = good.clone();
            let at = (x as usize) % s.len();
            s[at] = (x >> 32) as u8;
            let cut = ((x >> 16) as usize) % (s.len() + 1);
            let _ = read_all(&s[..cut]);
        }
        // Random bytes after a valid header.
        let mut s = Vec::new();
        write_header(&mut s).expect("header");
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.extend_from_slice(&x.to_le_bytes());
        }
        assert!(read_all(&s).is_err());
    }

    #[test]
    fn acks_round_trip() {
        for ack in [Ok(()), Err("vCPU 1: bad state".to_string())] {
            let mut s = Vec::new();
            write_section(&mut s, &Section::Ack(ack.clone())).expect("ack");
            assert_eq!(read_section(&mut &s[..]).expect("ack"), Section::Ack(ack));
        }
    }
}
