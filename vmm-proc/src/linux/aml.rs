//! The few AML (ACPI Machine Language) constructs the DSDT needs, encoded by hand after the
//! ACPI 6.5 specification, chapter 20 ("ACPI Machine Language Specification") and
//! section 6.4 (resource descriptors).
//!
//! Every function returns the bytes of one term; terms nest by concatenation. Nothing here
//! evaluates anything: it is a byte encoder with no failure modes for the sizes a DSDT
//! describing a handful of devices can reach.

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';

/// A 4-character name segment; shorter names are padded with `_` as ASL does.
/// Callers pass ASCII upper-case letters, digits and `_` (checked in debug builds).
pub fn name_seg(name: &str) -> [u8; 4] {
    debug_assert!(
        !name.is_empty()
            && name.len() <= 4
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit(),
        "bad AML name segment {name:?}"
    );
    let mut seg = [b'_'; 4];
    for (d, s) in seg.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    seg
}

/// PkgLength: the length of the package *including* the PkgLength bytes themselves, in one
/// to four bytes (the first byte's top two bits count the bytes that follow).
pub fn pkg_length(content_len: usize) -> Vec<u8> {
    let (extra, total) = if content_len + 1 < 0x40 {
        return vec![(content_len + 1) as u8];
    } else if content_len + 2 < 0x1000 {
        (1, content_len + 2)
    } else if content_len + 3 < 0x10_0000 {
        (2, content_len + 3)
    } else {
        debug_assert!(content_len + 4 < 0x1000_0000, "AML package too large");
        (3, content_len + 4)
    };
    let mut out = vec![((extra as u8) << 6) | (total & 0x0f) as u8];
    for i in 0..extra {
        out.push((total >> (4 + 8 * i)) as u8);
    }
    out
}

/// `op PkgLength body`.
fn with_pkg_length(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// An integer constant in its shortest encoding.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, v as u8],
        0x100..=0xffff => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[QWORD_PREFIX][..], &v.to_le_bytes()].concat(),
    }
}

/// A string constant (ASCII, no NUL inside).
pub fn string(s: &str) -> Vec<u8> {
    let mut out = vec![STRING_PREFIX];
    out.extend(s.bytes());
    out.push(0);
    out
}

/// `EisaId("PNP0501")`: three letters and four hex digits compressed into a DWORD.
/// Callers pass a well-formed ID (checked in debug builds; a bad one encodes as garbage).
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    debug_assert!(
        b.len() == 7 && b[..3].iter().all(u8::is_ascii_uppercase),
        "bad EISA id {id:?}"
    );
    let letter = |i: usize| u32::from(b.get(i).copied().unwrap_or(b'@').wrapping_sub(0x40) & 0x1f);
    let digit = |i: usize| {
        b.get(i)
            .and_then(|c| char::from(*c).to_digit(16))
            .unwrap_or(0)
    };
    let v = (letter(0) << 26)
        | (letter(1) << 21)
        | (letter(2) << 16)
        | (digit(3) << 12)
        | (digit(4) << 8)
        | (digit(5) << 4)
        | digit(6);
    // The compressed ID is stored big-endian.
    integer(u64::from(v.swap_bytes()))
}

/// `Name(NAME, value)`.
pub fn name(n: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend(name_seg(n));
    out.extend_from_slice(value);
    out
}

/// `Scope(\NAME) { body }` for a name directly under the root, such as `_SB_`.
pub fn root_scope(n: &str, body: &[u8]) -> Vec<u8> {
    let mut content = vec![ROOT_CHAR];
    content.extend(name_seg(n));
    content.extend_from_slice(body);
    with_pkg_length(&[SCOPE_OP], &content)
}

/// `Device(NAME) { body }`.
pub fn device(n: &str, body: &[u8]) -> Vec<u8> {
    let mut content = name_seg(n).to_vec();
    content.extend_from_slice(body);
    with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &content)
}

/// `Package() { elements }` (at most 255 elements).
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    debug_assert!(elements.len() <= 255);
    let mut content = vec![elements.len() as u8];
    for e in elements {
        content.extend_from_slice(e);
    }
    with_pkg_length(&[PACKAGE_OP], &content)
}

/// `Buffer() { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut content = integer(bytes.len() as u64);
    content.extend_from_slice(bytes);
    with_pkg_length(&[BUFFER_OP], &content)
}

/// `ResourceTemplate() { descriptors }`: a buffer of resource descriptors closed by an
/// End Tag whose checksum byte is 0 ("treat as valid").
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes: Vec<u8> = descriptors.concat();
    bytes.extend([0x79, 0x00]);
    buffer(&bytes)
}

/// `Memory32Fixed(ReadWrite, base, length)`.
pub fn memory32_fixed(base: u32, length: u32) -> Vec<u8> {
    let mut d = vec![0x86, 9, 0, 1];
    d.extend(base.to_le_bytes());
    d.extend(length.to_le_bytes());
    d
}

/// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`: an extended
/// interrupt descriptor with one interrupt.
pub fn interrupt_edge_high(gsi: u32) -> Vec<u8> {
    const CONSUMER: u8 = 1 << 0;
    const EDGE: u8 = 1 << 1;
    let mut d = vec![0x89, 6, 0, CONSUMER | EDGE, 1];
    d.extend(gsi.to_le_bytes());
    d
}

/// `IO(Decode16, base, base, 1, length)`: a fixed range of I/O ports.
pub fn io_ports(base: u16, length: u8) -> Vec<u8> {
    let mut d = vec![0x47, 1];
    d.extend(base.to_le_bytes());
    d.extend(base.to_le_bytes());
    d.extend([1, length]);
    d
}

/// `IRQNoFlags() { irq }` (an ISA IRQ, 0-15: edge, active high).
pub fn irq_no_flags(irq: u8) -> Vec<u8> {
    let mut d = vec![0x22];
    d.extend((1u16 << (irq & 15)).to_le_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_encodes_its_own_size() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(0x3e), vec![0x3f]);
        // 0x3f content bytes + 2 length bytes = 0x41 = 0b0100_0001: low nibble 1, then 0x04.
        assert_eq!(pkg_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]);
        // 0xffe + 3 = 0x1001.
        assert_eq!(pkg_length(0xffe), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn integers_take_their_shortest_form() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(integer(0xd000_0000), vec![0x0c, 0, 0, 0, 0xd0]);
        assert_eq!(integer(1 << 32)[0], 0x0e);
    }

    #[test]
    fn eisa_id_matches_what_iasl_produces() {
        // iasl compiles EisaId("PNP0501") to 0x0105D041 and EisaId("PNP0A03") to 0x030AD041.
        assert_eq!(eisa_id("PNP0501"), vec![0x0c, 0x41, 0xd0, 0x05, 0x01]);
        assert_eq!(eisa_id("PNP0A03"), vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]);
    }

    #[test]
    fn name_segments_are_padded() {
        assert_eq!(&name_seg("_SB"), b"_SB_");
        assert_eq!(&name_seg("COM1"), b"COM1");
    }

    #[test]
    fn resource_template_ends_with_an_end_tag() {
        let t = resource_template(&[irq_no_flags(4)]);
        // BufferOp, PkgLength (itself + 7), BytePrefix 5, IRQNoFlags (3 bytes), End Tag (2).
        assert_eq!(t, vec![0x11, 8, 0x0a, 5, 0x22, 0x10, 0x00, 0x79, 0x00]);
    }
}
