//! The `migration_stream` target: bytes a migration destination reads from its socket.
//!
//! The stream decoder (`vmm_proc::migration::stream`) reads the header and then sections
//! until `end`, walking page records and decoding the vCPU and device state the way the
//! destination does. Properties: no panic, nothing but clean errors; every section that
//! decodes (acknowledgements aside, whose reason is read lossily as UTF-8) re-encodes to
//! exactly the bytes it was read from; a page record's offset is page-aligned and a
//! normal page carries exactly one page.
//!
//! First byte: 0 (even) decodes the rest as it is; 1 (odd) first gives every section of
//! the rest its right checksum (the rest is then the header followed by `kind`, `length`,
//! `payload` without checksums), so mutations get past the checksum to the payloads.

use vmm_proc::migration::state::{DeviceState, VcpuState};
use vmm_proc::migration::stream::{self, PAGE, PageIter, Section};

/// Most sections looked at per input.
const MAX_SECTIONS: usize = 64;

/// Decodes `data` as a stream; `Ok(true)` when it reached `end`.
pub fn decode(data: &[u8]) -> Result<bool, String> {
    let mut rest = data;
    stream::read_header(&mut rest).map_err(|e| e.to_string())?;
    for _ in 0..MAX_SECTIONS {
        let before = rest;
        let section = stream::read_section(&mut rest).map_err(|e| e.to_string())?;
        let consumed = &before[..before.len() - rest.len()];
        if !matches!(section, Section::Ack(_)) {
            let mut again = Vec::new();
            stream::write_section(&mut again, &section).expect("a decoded section re-encodes");
            assert_eq!(again, consumed, "section does not re-encode to its bytes");
        }
        match section {
            Section::Pages(payload) => {
                for record in PageIter::new(&payload) {
                    let record = record.map_err(|e| e.to_string())?;
                    assert_eq!(record.offset % PAGE as u64, 0, "unaligned page record");
                    if let Some(d) = record.data {
                        assert_eq!(d.len(), PAGE, "a normal page of the wrong size");
                    }
                }
            }
            Section::Vcpu { state, .. } => {
                let _ = VcpuState::decode(&state);
            }
            Section::Devices(d) => {
                let _ = DeviceState::decode(&d);
            }
            Section::End => return Ok(true),
            Section::Config(_) | Section::Ack(_) => {}
        }
    }
    Ok(false)
}

/// Header and sections of `data` (sections without checksums) with their checksums.
pub fn with_checksums(data: &[u8]) -> Vec<u8> {
    let (head, mut rest) = data.split_at(data.len().min(12));
    let mut out = head.to_vec();
    while let Some((&kind, after)) = rest.split_first() {
        let Some((len, after)) = after.split_first_chunk::<4>() else {
            break;
        };
        let len = (u32::from_le_bytes(*len) as usize).min(after.len());
        let (payload, after) = after.split_at(len);
        let mut frame = vec![kind];
        frame.extend_from_slice(&(len as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        let crc = stream::Crc32::new().update(&frame).finish();
        out.extend_from_slice(&frame);
        out.extend_from_slice(&crc.to_le_bytes());
        rest = after;
    }
    out
}

/// The target: decoding may fail, never panic.
pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => {
            let _ = decode(&with_checksums(rest));
        }
        Some((_, rest)) => {
            let _ = decode(rest);
        }
        None => {}
    }
}
