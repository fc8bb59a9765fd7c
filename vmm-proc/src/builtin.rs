//! The guests embedded in vmm-proc (`--kernel builtin:NAME`), and [`static_elf`], which
//! wraps machine code in the smallest ELF image the loader accepts (used for the built-in
//! placeholder and by tests to boot hand-assembled guests).
//!
//! `workload` is a placeholder until the workload guest (`guest/`) lands: it writes the
//! boot-timer port, then idles at CPL3 in a `pause` loop.

use crate::loader::LoadError;

/// Where built-in images are linked (docs/guest-abi.md: 1 MiB and up).
const LINK_BASE: u64 = 0x10_0000;

/// The placeholder workload: `out 0xe9, al` (boot timer), then `1: pause; jmp 1b`.
const IDLE: &[u8] = &[0xe6, 0xe9, 0xf3, 0x90, 0xeb, 0xfc];

/// The ELF image of built-in guest `name`.
pub fn image(name: &str) -> Result<Vec<u8>, LoadError> {
    match name {
        "workload" => Ok(static_elf(
            LINK_BASE,
            &[(LINK_BASE, IDLE, IDLE.len() as u64)],
        )),
        _ => Err(LoadError::Bad(format!("no built-in guest '{name}'"))),
    }
}

/// A static ELF64 x86_64 executable entered at `entry`, with one `PT_LOAD` segment per
/// `(address, bytes, memory size)` (bytes past the data are zero).
pub fn static_elf(entry: u64, segments: &[(u64, &[u8], u64)]) -> Vec<u8> {
    elf(entry, segments, None)
}

/// [`static_elf`] with a `PT_NOTE` segment holding `notes`.
#[cfg(test)]
pub fn static_elf_with_note(entry: u64, segments: &[(u64, &[u8], u64)], notes: &[u8]) -> Vec<u8> {
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
    let mut phdr = |out: &mut Vec<u8>, kind: u32, flags: u32, addr: u64, len: u64, mem: u64| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&data_at.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&mem.to_le_bytes());
        out.extend_from_slice(&16u64.to_le_bytes());
        data_at += len;
    };
    for &(addr, bytes, mem) in segments {
        phdr(&mut out, 1, 7, addr, bytes.len() as u64, mem);
    }
    if let Some(n) = notes {
        phdr(&mut out, 4, 4, 0, n.len() as u64, n.len() as u64);
    }
    for &(_, bytes, _) in segments {
        out.extend_from_slice(bytes);
    }
    if let Some(n) = notes {
        out.extend_from_slice(n);
    }
    out
}
