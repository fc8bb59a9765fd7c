//! The guest image: a static ELF64 x86_64 executable as docs/guest-abi.md describes it
//! (`PT_LOAD` segments placed at their `p_paddr`, identity-linked, no interpreter), checked
//! before anything touches guest memory, and kept so `system_reset` can load it again.
//!
//! Linux kernels (a bzImage, or an ELF `vmlinux`, recognised by its `Linux` ELF note) are
//! not for this loader: [`is_linux_kernel`] tells them apart from a file's headers, and
//! they go to the Linux loader (`crate::linux`, through `crate::kernel`).

use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::GUEST_LOW_END;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// More program headers than any sane static image has.
const MAX_PHDRS: usize = 64;

/// Why an image cannot be booted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("a Linux kernel, not an image with the workload guest's ABI")]
    Linux,
    #[error("not a static ELF64 x86_64 executable: {0}")]
    NotElf(&'static str),
    #[error("bad ELF image: {0}")]
    Bad(String),
}

/// One `PT_LOAD` segment: its file bytes, then zeros up to `mem_size`.
#[derive(Debug, Clone)]
pub struct Segment {
    pub paddr: u64,
    pub data: Vec<u8>,
    pub mem_size: u64,
}

/// A checked image, ready to load any number of times.
#[derive(Debug, Clone)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// A program header, as read.
struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    file_size: u64,
    mem_size: u64,
}

/// Whether `bytes` is a Linux bzImage (the `HdrS` boot-protocol magic at 0x202).
fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// Whether a `PT_NOTE` segment holds a note named `Linux` (every `vmlinux` has one).
fn has_linux_note(notes: &[u8]) -> bool {
    let mut at = 0usize;
    while let (Some(namesz), Some(descsz)) = (u32_at(notes, at), u32_at(notes, at + 4)) {
        let name_start = at + 12;
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name = notes.get(name_start..name_start.saturating_add(namesz));
        if name.is_some_and(|n| n.strip_suffix(b"\0").unwrap_or(n) == b"Linux") {
            return true;
        }
        let next = name_start
            .checked_add(namesz.next_multiple_of(4))
            .and_then(|n| n.checked_add(descsz.next_multiple_of(4)));
        match next {
            Some(n) if n > at => at = n,
            _ => break,
        }
    }
    false
}

/// The most bytes of notes [`is_linux_kernel`] reads from one `PT_NOTE` segment (a
/// vmlinux has a few hundred).
const MAX_NOTES: u64 = 64 << 10;

/// Whether the image `f` holds is a Linux kernel: a bzImage, or an ELF with a `Linux` note
/// (every `vmlinux`). Reads the headers and the note segments only, not the whole image
/// (a vmlinux is tens of MiB). A malformed image is not Linux: the workload loader then
/// says what is wrong with it.
pub fn is_linux_kernel<R: Read + Seek>(f: &mut R) -> std::io::Result<bool> {
    let mut read_at = |offset: u64, len: u64| -> std::io::Result<Vec<u8>> {
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        f.by_ref().take(len).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let head = read_at(0, 0x206)?;
    if is_bzimage(&head) {
        return Ok(true);
    }
    if !head.starts_with(b"\x7fELF") || head.get(4..6) != Some(&[2, 1]) {
        return Ok(false);
    }
    let (Some(phoff), Some(PHDR_SIZE_U16), Some(phnum)) =
        (u64_at(&head, 32), u16_at(&head, 54), u16_at(&head, 56))
    else {
        return Ok(false);
    };
    if usize::from(phnum) > MAX_PHDRS {
        return Ok(false);
    }
    let phdrs = read_at(phoff, u64::from(phnum) * PHDR_SIZE as u64)?;
    for h in phdrs.chunks_exact(PHDR_SIZE) {
        if u32_at(h, 0) != Some(PT_NOTE) {
            continue;
        }
        let (Some(offset), Some(size)) = (u64_at(h, 8), u64_at(h, 32)) else {
            continue;
        };
        if has_linux_note(&read_at(offset, size.min(MAX_NOTES))?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// [`PHDR_SIZE`] as the `e_phentsize` field holds it.
const PHDR_SIZE_U16: u16 = PHDR_SIZE as u16;

impl Image {
    /// Checks `bytes` and extracts what loading needs. Every segment must fit in
    /// `[GUEST_LOW_END, ram_size)`, be linked at its physical address, and the entry point
    /// must lie in a segment.
    pub fn parse(bytes: &[u8], ram_size: u64) -> Result<Self, LoadError> {
        if is_bzimage(bytes) {
            return Err(LoadError::Linux);
        }
        let ident = bytes.get(..16).ok_or(LoadError::NotElf("too short"))?;
        if &ident[..4] != b"\x7fELF" {
            return Err(LoadError::NotElf("no ELF magic"));
        }
        if ident[4] != 2 || ident[5] != 1 {
            return Err(LoadError::NotElf("not 64-bit little-endian"));
        }
        if bytes.len() < EHDR_SIZE {
            return Err(LoadError::NotElf("truncated header"));
        }
        let bad = |what: &str| LoadError::Bad(what.to_string());
        let field = |v: Option<u64>| v.ok_or_else(|| bad("truncated header"));
        if u16_at(bytes, 16) != Some(2) {
            return Err(LoadError::NotElf("not an executable (ET_EXEC)"));
        }
        if u16_at(bytes, 18) != Some(62) {
            return Err(LoadError::NotElf("not x86_64"));
        }
        let entry = field(u64_at(bytes, 24))?;
        let phoff = field(u64_at(bytes, 32))?;
        let phentsize = field(u16_at(bytes, 54).map(u64::from))?;
        let phnum = field(u16_at(bytes, 56).map(u64::from))?;
        if phentsize != PHDR_SIZE as u64 {
            return Err(bad("unexpected program header size"));
        }
        if phnum == 0 || phnum > MAX_PHDRS as u64 {
            return Err(bad("no or too many program headers"));
        }
        let mut phdrs = Vec::new();
        for i in 0..phnum {
            let at = i
                .checked_mul(PHDR_SIZE as u64)
                .and_then(|o| o.checked_add(phoff))
                .and_then(|o| usize::try_from(o).ok())
                .ok_or_else(|| bad("program headers out of range"))?;
            let h = bytes
                .get(at..at.saturating_add(PHDR_SIZE))
                .filter(|h| h.len() == PHDR_SIZE)
                .ok_or_else(|| bad("program headers past the end of the file"))?;
            phdrs.push(Phdr {
                kind: field(u32_at(h, 0).map(u64::from))? as u32,
                offset: field(u64_at(h, 8))?,
                vaddr: field(u64_at(h, 16))?,
                paddr: field(u64_at(h, 24))?,
                file_size: field(u64_at(h, 32))?,
                mem_size: field(u64_at(h, 40))?,
            });
        }
        let file_range = |p: &Phdr| -> Result<&[u8], LoadError> {
            let start = usize::try_from(p.offset).map_err(|_| bad("segment offset"))?;
            let len = usize::try_from(p.file_size).map_err(|_| bad("segment size"))?;
            start
                .checked_add(len)
                .and_then(|end| bytes.get(start..end))
                .ok_or_else(|| bad("segment data past the end of the file"))
        };
        for p in phdrs.iter().filter(|p| p.kind == PT_NOTE) {
            if has_linux_note(file_range(p)?) {
                return Err(LoadError::Linux);
            }
        }
        if phdrs
            .iter()
            .any(|p| p.kind == PT_INTERP || p.kind == PT_DYNAMIC)
        {
            return Err(LoadError::NotElf(
                "dynamically linked (has an interpreter or a dynamic section)",
            ));
        }
        let mut segments: Vec<Segment> = Vec::new();
        for p in phdrs.iter().filter(|p| p.kind == PT_LOAD && p.mem_size > 0) {
            if p.vaddr != p.paddr {
                return Err(LoadError::Bad(format!(
                    "segment at {:#x} is linked at virtual {:#x}: the ABI wants virtual = physical",
                    p.paddr, p.vaddr
                )));
            }
            if p.file_size > p.mem_size {
                return Err(bad("segment file size exceeds its memory size"));
            }
            let end = p.paddr.checked_add(p.mem_size);
            if p.paddr < GUEST_LOW_END || end.is_none_or(|e| e > ram_size) {
                return Err(LoadError::Bad(format!(
                    "segment {:#x}+{:#x} does not fit in guest RAM [{GUEST_LOW_END:#x}, {ram_size:#x})",
                    p.paddr, p.mem_size
                )));
            }
            let overlaps = segments
                .iter()
                .any(|s| p.paddr < s.paddr + s.mem_size && s.paddr < p.paddr + p.mem_size);
            if overlaps {
                return Err(bad("segments overlap"));
            }
            segments.push(Segment {
                paddr: p.paddr,
                data: file_range(p)?.to_vec(),
                mem_size: p.mem_size,
            });
        }
        if segments.is_empty() {
            return Err(bad("nothing to load (no PT_LOAD segment)"));
        }
        if !segments
            .iter()
            .any(|s| entry >= s.paddr && entry < s.paddr + s.mem_size)
        {
            return Err(LoadError::Bad(format!(
                "entry point {entry:#x} lies in no segment"
            )));
        }
        Ok(Self { entry, segments })
    }

    /// Copies the segments into guest memory and zeroes their tails.
    pub fn load<M: GuestMemory>(&self, mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
        for s in &self.segments {
            mem.write_slice(&s.data, GuestAddress(s.paddr))?;
            let tail = s.mem_size - s.data.len() as u64;
            let start = s.paddr + s.data.len() as u64;
            // Zero in pieces so a large bss needs no large buffer.
            let zeros = [0u8; 4096];
            let mut done = 0;
            while done < tail {
                let n = (tail - done).min(zeros.len() as u64) as usize;
                mem.write_slice(&zeros[..n], GuestAddress(start + done))?;
                done += n as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::testing::{static_elf, static_elf_with_note};
    use vm_memory::GuestMemoryMmap;

    const RAM: u64 = 4 << 20;

    #[test]
    fn a_static_image_loads_at_its_physical_addresses() {
        let code = [0xe6, 0xe9, 0xf3, 0x90, 0xeb, 0xfc];
        let elf = static_elf(0x10_0002, &[(0x10_0000, &code, 0x2000)]);
        let image = Image::parse(&elf, RAM).expect("parse");
        assert_eq!(image.entry, 0x10_0002);
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("mem");
        mem.write_obj(0xffu8, GuestAddress(0x10_1000))
            .expect("dirty");
        image.load(&mem).expect("load");
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(back, code);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x10_1000)).expect("read"),
            0
        );
    }

    #[test]
    fn hostile_or_foreign_images_are_refused() {
        let code = [0x90; 16];
        let ok = static_elf(0x10_0000, &[(0x10_0000, &code, 16)]);
        assert!(Image::parse(&ok, RAM).is_ok());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "too short"),
            (b"MZ\x90\x00".repeat(8), "ELF magic"),
            (ok[..40].to_vec(), "truncated"),
            (
                static_elf(0x10_0000, &[(0x1000, &code, 16)]),
                "does not fit",
            ),
            (static_elf(RAM - 8, &[(RAM - 8, &code, 16)]), "does not fit"),
            (
                static_elf(u64::MAX - 4, &[(u64::MAX - 4, &code, 16)]),
                "does not fit",
            ),
            (
                static_elf(0x20_0000, &[(0x10_0000, &code, 16)]),
                "entry point",
            ),
            (
                static_elf(0x10_0000, &[(0x10_0000, &code, 16), (0x10_0008, &code, 16)]),
                "overlap",
            ),
        ];
        for (bytes, needle) in cases {
            let err = Image::parse(&bytes, RAM).expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // Header fields pointing anywhere: program headers past the end, huge counts.
        let mut bad = ok.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Image::parse(&bad, RAM).is_err());
        let mut bad = ok.clone();
        bad[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(Image::parse(&bad, RAM).is_err());
        // A segment whose file range lies past the end of the file.
        let mut bad = ok.clone();
        bad[64 + 8..64 + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(Image::parse(&bad, RAM).is_err());
    }

    #[test]
    fn linux_kernels_are_recognised_and_refused() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            Image::parse(&bz, RAM).expect_err("bzImage"),
            LoadError::Linux
        );
        // An ELF with a "Linux" note, like every vmlinux.
        let mut note = Vec::new();
        note.extend_from_slice(&6u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&0x100u32.to_le_bytes());
        note.extend_from_slice(b"Linux\0\0\0");
        note.extend_from_slice(&[1, 2, 3, 4]);
        let elf = static_elf_with_note(0x10_0000, &[(0x10_0000, &[0x90], 1)], &note);
        assert_eq!(
            Image::parse(&elf, RAM).expect_err("vmlinux"),
            LoadError::Linux
        );
        // The same from a file, reading only headers and notes.
        let linux = |b: &[u8]| is_linux_kernel(&mut std::io::Cursor::new(b)).expect("read");
        assert!(linux(&bz) && linux(&elf));
        let mut other = note.clone();
        other[12..17].copy_from_slice(b"Xinux");
        let workload = static_elf(0x10_0000, &[(0x10_0000, &[0x90], 1)]);
        let foreign = static_elf_with_note(0x10_0000, &[(0x10_0000, &[0x90], 1)], &other);
        assert!(!linux(&workload) && !linux(&foreign));
        // Malformed headers are "not Linux", never a panic.
        for cut in [0, 3, 20, 63, 64, 100, elf.len() - note.len() + 14] {
            assert!(!linux(&elf[..cut]), "{cut}");
        }
        let mut bad = elf.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!linux(&bad));
        let mut bad = elf.clone();
        bad[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(!linux(&bad));
    }
}

/// ELF images made from machine code: the smallest static executables the loader accepts,
/// for tests that boot hand-assembled guests.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    /// A static ELF64 x86_64 executable entered at `entry`, with one `PT_LOAD` segment per
    /// `(address, bytes, memory size)` (bytes past the data are zero).
    pub fn static_elf(entry: u64, segments: &[(u64, &[u8], u64)]) -> Vec<u8> {
        elf(entry, segments, None)
    }

    /// [`static_elf`] with a `PT_NOTE` segment holding `notes`.
    pub fn static_elf_with_note(
        entry: u64,
        segments: &[(u64, &[u8], u64)],
        notes: &[u8],
    ) -> Vec<u8> {
        elf(entry, segments, Some(notes))
    }

    fn elf(entry: u64, segments: &[(u64, &[u8], u64)], notes: Option<&[u8]>) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let phnum = segments.len() + usize::from(notes.is_some());
        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF");
        out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&entry.to_le_bytes());
        out.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        out.extend_from_slice(&(EHDR as u16).to_le_bytes());
        out.extend_from_slice(&(PHDR as u16).to_le_bytes());
        out.extend_from_slice(&(phnum as u16).to_le_bytes());
        out.extend_from_slice(&[0; 6]); // no section headers
        let mut data_at = (EHDR + PHDR * phnum) as u64;
        let mut phdr = |out: &mut Vec<u8>, kind: u32, addr: u64, len: u64, mem: u64| {
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&7u32.to_le_bytes()); // rwx
            out.extend_from_slice(&data_at.to_le_bytes());
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&mem.to_le_bytes());
            out.extend_from_slice(&16u64.to_le_bytes());
            data_at += len;
        };
        for &(addr, bytes, mem) in segments {
            phdr(&mut out, 1, addr, bytes.len() as u64, mem);
        }
        if let Some(n) = notes {
            phdr(&mut out, 4, 0, n.len() as u64, n.len() as u64);
        }
        for &(_, bytes, _) in segments {
            out.extend_from_slice(bytes);
        }
        if let Some(n) = notes {
            out.extend_from_slice(n);
        }
        out
    }
}
