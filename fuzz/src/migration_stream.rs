//! The `migration_stream` target: bytes a migration destination reads from its socket.
//!
//! The stream decoder (`vmm_proc::migration::stream`) reads the header and then sections
//! until `end`, walking page records and decoding the vCPU and device state the way the
//! destination does. Properties: no panic, nothing but clean errors; every section that
//! decodes (acknowledgements aside, whose reason is read lossily as UTF-8) re-encodes to
//! exactly the bytes it was read from; a page record's offset is page-aligned and a
//! normal page carries exactly one page.

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

/// The target: decoding may fail, never panic.
pub fn run(data: &[u8]) {
    let _ = decode(data);
}
