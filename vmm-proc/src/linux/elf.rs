//! A check of an ELF `vmlinux` before `linux-loader` copies it: a 64-bit little-endian
//! x86-64 executable whose loadable segments lie inside the file and inside the RAM the
//! guest has for a kernel. The image is external input, so the check reads only what the
//! headers point at, with bounds checks, and says which rule an image broke.

use std::io::{Read, Seek, SeekFrom};

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
/// Linux's vmlinux has a handful of program headers; more is not a kernel.
const MAX_PHDRS: u16 = 64;
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// Why an ELF image cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading the ELF image: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a 64-bit little-endian x86-64 ELF executable ({0})")]
    NotX86_64(&'static str),
    #[error("{0} program headers (at most {MAX_PHDRS} are accepted)")]
    TooManyPhdrs(u16),
    #[error("segment {index}: {what}")]
    BadSegment { index: usize, what: String },
    #[error("no loadable segment")]
    NoSegments,
}

/// What the headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub entry: u64,
    /// Guest-physical range the loadable segments cover, memory sizes included.
    pub start: u64,
    pub end: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

/// Checks the image and that every loadable segment lands in `[ram_start, ram_end)`.
pub fn inspect<F: Read + Seek>(
    image: &mut F,
    file_size: u64,
    ram_start: u64,
    ram_end: u64,
) -> Result<ElfInfo, ElfError> {
    let mut ehdr = [0u8; EHDR_LEN];
    image.seek(SeekFrom::Start(0))?;
    image.read_exact(&mut ehdr)?;
    if &ehdr[..4] != b"\x7fELF" {
        return Err(ElfError::NotX86_64("no ELF magic"));
    }
    if ehdr[4] != 2 {
        return Err(ElfError::NotX86_64("not ELFCLASS64"));
    }
    if ehdr[5] != 1 {
        return Err(ElfError::NotX86_64("not little-endian"));
    }
    if u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(ElfError::NotX86_64("machine is not x86-64"));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    if usize::from(u16_at(&ehdr, 54)) != PHDR_LEN {
        return Err(ElfError::NotX86_64("program header size is not 56"));
    }
    let phnum = u16_at(&ehdr, 56);
    if phnum > MAX_PHDRS {
        return Err(ElfError::TooManyPhdrs(phnum));
    }
    let table_end = phoff
        .checked_add(u64::from(phnum) * PHDR_LEN as u64)
        .filter(|e| *e <= file_size);
    if phoff < EHDR_LEN as u64 || table_end.is_none() {
        return Err(ElfError::NotX86_64("program headers outside the file"));
    }
    let mut table = vec![0u8; usize::from(phnum) * PHDR_LEN];
    image.seek(SeekFrom::Start(phoff))?;
    image.read_exact(&mut table)?;

    let (mut start, mut end) = (u64::MAX, 0u64);
    for (index, ph) in table.chunks_exact(PHDR_LEN).enumerate() {
        let bad = |what: String| ElfError::BadSegment { index, what };
        let (kind, offset) = (u32_at(ph, 0), u64_at(ph, 8));
        let (paddr, filesz, memsz) = (u64_at(ph, 24), u64_at(ph, 32), u64_at(ph, 40));
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(bad(format!(
                "file size {filesz:#x} > memory size {memsz:#x}"
            )));
        }
        if offset.checked_add(filesz).is_none_or(|e| e > file_size) {
            return Err(bad(format!(
                "{filesz:#x} bytes at offset {offset:#x} run past the end of the file"
            )));
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad(format!("address {paddr:#x} + {memsz:#x} overflows")))?;
        if paddr < ram_start || seg_end > ram_end {
            return Err(bad(format!(
                "{paddr:#x}..{seg_end:#x} is outside the kernel's RAM {ram_start:#x}..{ram_end:#x}"
            )));
        }
        start = start.min(paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(ElfError::NoSegments);
    }
    Ok(ElfInfo { entry, start, end })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal x86-64 vmlinux: one PT_LOAD of `code` at physical `paddr`, entry at
    /// `paddr`, and if `pvh_entry` is given, a PT_NOTE with a XEN_ELFNOTE_PHYS32_ENTRY.
    pub(crate) fn fake_vmlinux(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let code_off = 0x1000u64;
        let mut img = vec![0u8; code_off as usize];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = 2;
        img[5] = 1;
        img[6] = 1;
        img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        img[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        img[24..32].copy_from_slice(&paddr.to_le_bytes());
        img[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        img[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        img[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        img[56..58].copy_from_slice(&phnum.to_le_bytes());
        let ph = 64;
        img[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        img[ph + 8..ph + 16].copy_from_slice(&code_off.to_le_bytes());
        img[ph + 16..ph + 24].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes());
        img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        img[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        img[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
        if let Some(e) = pvh_entry {
            // The note: namesz 4 ("Xen\0"), descsz 4, type 18, then the 32-bit entry.
            let note_off = 0x200usize;
            let mut note = Vec::new();
            note.extend(4u32.to_le_bytes());
            note.extend(4u32.to_le_bytes());
            note.extend(18u32.to_le_bytes());
            note.extend(b"Xen\0");
            note.extend(e.to_le_bytes());
            img[note_off..note_off + note.len()].copy_from_slice(&note);
            let ph = 64 + PHDR_LEN;
            img[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            img[ph + 8..ph + 16].copy_from_slice(&(note_off as u64).to_le_bytes());
            img[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
            img[ph + 40..ph + 48].copy_from_slice(&(note.len() as u64).to_le_bytes());
        }
        img.extend_from_slice(code);
        img
    }

    fn inspect_bytes(img: &[u8]) -> Result<ElfInfo, ElfError> {
        inspect(
            &mut Cursor::new(img),
            img.len() as u64,
            0x10_0000,
            0x1000_0000,
        )
    }

    #[test]
    fn a_valid_image_reports_its_range() {
        let info = inspect_bytes(&fake_vmlinux(0x100_0000, &[0x90; 100], None)).expect("valid");
        assert_eq!(info.entry, 0x100_0000);
        assert_eq!(
            (info.start, info.end),
            (0x100_0000, 0x100_0000 + 100 + 0x1000)
        );
    }

    #[test]
    fn bad_images_say_why() {
        let e = inspect_bytes(b"short").expect_err("too short");
        assert!(matches!(e, ElfError::Io(_)), "{e}");
        let mut img = fake_vmlinux(0x100_0000, &[0x90; 100], None);
        img[4] = 1;
        assert!(
            inspect_bytes(&img)
                .expect_err("32-bit")
                .to_string()
                .contains("ELFCLASS64")
        );
        let img = fake_vmlinux(0x1000, &[0x90; 100], None);
        let e = inspect_bytes(&img).expect_err("below 1 MiB");
        assert!(e.to_string().contains("outside the kernel's RAM"), "{e}");
        let mut img = fake_vmlinux(0x100_0000, &[0x90; 100], None);
        img[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = inspect_bytes(&img).expect_err("offset past the end");
        assert!(e.to_string().contains("past the end"), "{e}");
        let mut img = fake_vmlinux(0x100_0000, &[0x90; 100], None);
        img[56..58].copy_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(
            inspect_bytes(&img),
            Err(ElfError::TooManyPhdrs(1000))
        ));
    }
}
