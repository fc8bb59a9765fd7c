//! The ACPI tables a stock kernel needs to find the CPUs, the interrupt controllers and the
//! virtio-mmio devices (Debian's kernels ignore `virtio_mmio.device=`; they find
//! `LNRO0005` devices in the DSDT):
//!
//! - RSDP (revision 2) → XSDT → FADT and MADT; the FADT points at the DSDT.
//! - FADT: hardware-reduced ACPI (no PM timer, no SCI, no legacy fixed hardware), an ACPI
//!   reset register aimed at the i8042 (`0xfe` to port `0x64`), a sleep control register for
//!   power-off (see [`super::layout::ACPI_SLEEP_CONTROL_PORT`]), and boot flags saying there
//!   is no VGA, no CMOS RTC and no MSI.
//! - MADT: one enabled local APIC per vCPU (APIC id = index), the IOAPIC at 0xfec00000 with
//!   GSI base 0, and LINT1 as NMI. No interrupt source overrides: KVM's default GSI routing
//!   is the identity (GSI n → IOAPIC pin n), which is what the kernel assumes without them.
//! - DSDT: under `\_SB`, COM1 (`PNP0501`, 0x3f8, IRQ 4) and one `LNRO0005` device per
//!   virtio-mmio transport with `Memory32Fixed` and an edge, active-high `Interrupt`;
//!   `\_S5_` for power-off.
//!
//! All tables are built into one blob laid out from a given base address, with correct
//! lengths and checksums.

use super::VirtioMmioDevice;
use super::aml;
use super::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, COM1_IRQ,
    COM1_PORT, IOAPIC_ADDR, LAPIC_ADDR,
};

const OEM_ID: [u8; 6] = *b"SPLITV";
const OEM_TABLE_ID: [u8; 8] = *b"SPLITVMM";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"SVMM";
const CREATOR_REVISION: u32 = 1;
const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const FADT_LEN: usize = 276;

/// One table in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub signature: [u8; 4],
    pub addr: u64,
    pub len: usize,
}

/// The tables, ready to be copied to guest memory at `base`.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Guest-physical address of `bytes[0]`.
    pub base: u64,
    /// The RSDP's address (it is first: `base`).
    pub rsdp_addr: u64,
    pub bytes: Vec<u8>,
    /// Where each table (not the RSDP) sits.
    pub tables: Vec<TableInfo>,
}

impl AcpiTables {
    /// The bytes of the table with this signature.
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        let t = self.tables.iter().find(|t| &t.signature == signature)?;
        let start = usize::try_from(t.addr - self.base).ok()?;
        self.bytes.get(start..start + t.len)
    }
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: header, then `body`, with length and checksum set.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend((len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend(OEM_REVISION.to_le_bytes());
    t.extend_from_slice(&CREATOR_ID);
    t.extend(CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for one byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const RESET_REG_SUP: u32 = 1 << 10;
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const PWR_BUTTON: u32 = 1 << 4; // no fixed-feature power button
    const SLP_BUTTON: u32 = 1 << 5; // no fixed-feature sleep button
    const VGA_NOT_PRESENT: u16 = 1 << 2;
    const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        let at = offset - HEADER_LEN;
        body[at..at + bytes.len()].copy_from_slice(bytes);
    };
    // The 32-bit DSDT pointer too, as the tables sit below 4 GiB; both agree.
    put(40, &(dsdt_addr as u32).to_le_bytes());
    put(
        109,
        &(VGA_NOT_PRESENT | MSI_NOT_SUPPORTED | CMOS_RTC_NOT_PRESENT).to_le_bytes(),
    );
    put(
        112,
        &(HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON | SLP_BUTTON).to_le_bytes(),
    );
    put(116, &gas_io_byte(ACPI_RESET_PORT));
    put(128, &[ACPI_RESET_VALUE]);
    put(131, &[0]); // FADT minor version: 6.0
    put(140, &dsdt_addr.to_le_bytes()); // X_DSDT
    put(244, &gas_io_byte(ACPI_SLEEP_CONTROL_PORT));
    put(256, &gas_io_byte(ACPI_SLEEP_STATUS_PORT));
    put(268, b"SPLITVMM"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

fn madt(vcpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1; // KVM's irqchip includes the 8259 pair
    let mut body = Vec::new();
    body.extend(LAPIC_ADDR.to_le_bytes());
    body.extend(PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, ACPI processor uid, APIC id, enabled.
        body.extend([0, 8, id, id]);
        body.extend(1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id 0 (KVM's register default), address, GSI base 0.
    body.extend([1, 12, 0, 0]);
    body.extend(IOAPIC_ADDR.to_le_bytes());
    body.extend(0u32.to_le_bytes());
    // Local APIC NMI: type 4, length 6, all processors (0xff), flags 0 (conforming), LINT1.
    body.extend([4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &body)
}

/// The DSDT's AML.
fn dsdt_aml(devices: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut sb = aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0501")),
            aml::name("_UID", &aml::integer(1)),
            aml::name(
                "_CRS",
                &aml::resource_template(&[
                    aml::io_ports(COM1_PORT, 8),
                    aml::irq_no_flags(COM1_IRQ),
                ]),
            ),
        ]
        .concat(),
    );
    for (i, d) in devices.iter().enumerate() {
        sb.extend(aml::device(
            &format!("VR{:02X}", i & 0xff),
            &[
                aml::name("_HID", &aml::string("LNRO0005")),
                aml::name("_UID", &aml::integer(i as u64)),
                aml::name(
                    "_CRS",
                    &aml::resource_template(&[
                        aml::memory32_fixed(d.base as u32, d.size as u32),
                        aml::interrupt_edge_high(d.irq),
                    ]),
                ),
            ]
            .concat(),
        ));
    }
    let mut out = aml::root_scope("_SB", &sb);
    // \_S5_: SLP_TYP 5 for soft-off (the value written to the sleep control register).
    out.extend(aml::name(
        "_S5_",
        &aml::package(&[
            aml::integer(5),
            aml::integer(0),
            aml::integer(0),
            aml::integer(0),
        ]),
    ));
    out
}

/// Builds every table for `vcpus` vCPUs and `devices`, laid out from `base` (16-byte
/// aligned). Callers have validated the inputs: 1-254 vCPUs, devices below 4 GiB.
pub fn build(base: u64, vcpus: u8, devices: &[VirtioMmioDevice]) -> AcpiTables {
    let align = |x: usize| x.next_multiple_of(16);
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(devices));
    let madt = madt(vcpus);

    // RSDP, XSDT (two entries), FADT, MADT, DSDT, each 16-byte aligned.
    let xsdt_off = align(RSDP_LEN);
    let fadt_off = align(xsdt_off + HEADER_LEN + 16);
    let madt_off = align(fadt_off + FADT_LEN);
    let dsdt_off = align(madt_off + madt.len());
    let at = |off: usize| base + off as u64;

    let fadt = fadt(at(dsdt_off));
    let xsdt_body = [at(fadt_off).to_le_bytes(), at(madt_off).to_le_bytes()].concat();
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(RSDP_LEN);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(&OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+, XSDT
    rsdp.extend(0u32.to_le_bytes()); // no RSDT
    rsdp.extend((RSDP_LEN as u32).to_le_bytes());
    rsdp.extend(at(xsdt_off).to_le_bytes());
    rsdp.push(0); // extended checksum, below
    rsdp.extend([0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut bytes = vec![0u8; dsdt_off + dsdt.len()];
    let mut tables = Vec::new();
    for (off, table) in [
        (0, &rsdp),
        (xsdt_off, &xsdt),
        (fadt_off, &fadt),
        (madt_off, &madt),
        (dsdt_off, &dsdt),
    ] {
        bytes[off..off + table.len()].copy_from_slice(table);
        if off != 0 {
            let mut signature = [0u8; 4];
            signature.copy_from_slice(&table[..4]);
            tables.push(TableInfo {
                signature,
                addr: at(off),
                len: table.len(),
            });
        }
    }
    AcpiTables {
        base,
        rsdp_addr: base,
        bytes,
        tables,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::layout::ACPI_START;
    use std::process::Command;

    fn devices(n: u32) -> Vec<VirtioMmioDevice> {
        (0..n)
            .map(|i| VirtioMmioDevice {
                base: 0xd000_0000 + u64::from(i) * 0x1000,
                size: 0x1000,
                irq: 5 + i,
            })
            .collect()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
    }

    #[test]
    fn every_table_sums_to_zero_and_has_its_length() {
        let t = build(ACPI_START, 2, &devices(3));
        let rsdp = &t.bytes[..RSDP_LEN];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(t.tables.len(), 4);
        for info in &t.tables {
            let table = t.table(&info.signature).expect("table present");
            assert_eq!(u32_at(table, 4) as usize, table.len(), "{info:?} length");
            assert_eq!(sum(table), 0, "{info:?} checksum");
            assert_eq!(info.addr % 16, 0, "{info:?} alignment");
        }
    }

    #[test]
    fn pointers_chain_from_rsdp_to_dsdt() {
        let t = build(ACPI_START, 1, &devices(1));
        let addr_of = |sig: &[u8; 4]| {
            t.tables
                .iter()
                .find(|i| &i.signature == sig)
                .map(|i| i.addr)
        };
        let xsdt_addr = u64_at(&t.bytes, 24);
        assert_eq!(Some(xsdt_addr), addr_of(b"XSDT"));
        let xsdt = t.table(b"XSDT").expect("XSDT");
        let entries: Vec<u64> = (HEADER_LEN..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(
            entries,
            vec![addr_of(b"FACP").unwrap_or(0), addr_of(b"APIC").unwrap_or(0)]
        );
        let fadt = t.table(b"FACP").expect("FADT");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(Some(u64_at(fadt, 140)), addr_of(b"DSDT"));
        assert_eq!(Some(u64::from(u32_at(fadt, 40))), addr_of(b"DSDT"));
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced ACPI");
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let t = build(ACPI_START, 4, &[]);
        let madt = t.table(b"APIC").expect("MADT");
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], usize::from(madt[off + 1]));
            assert!(
                len >= 2 && off + len <= madt.len(),
                "bad MADT entry at {off}"
            );
            match kind {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapics.push(u32_at(madt, off + 4)),
                _ => {}
            }
            off += len;
        }
        assert_eq!(lapics, (0..4).map(|i| (i, i, 1)).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![IOAPIC_ADDR]);
    }

    /// `iasl -d` disassembles every table without errors, and the DSDT shows the
    /// virtio-mmio devices with their resources. Skips (saying so) only outside CI when
    /// iasl (Debian's acpica-tools) is missing.
    #[test]
    fn iasl_disassembles_the_tables_and_finds_the_lnro0005_devices() {
        if Command::new("iasl").arg("-v").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "iasl is missing (acpica-tools), and CI is set"
            );
            eprintln!("SKIPPED iasl test: iasl (acpica-tools) is missing");
            return;
        }
        let devs = devices(3);
        let t = build(ACPI_START, 2, &devs);
        let dir = std::env::temp_dir().join(format!("splitvmm-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut dsl = std::collections::BTreeMap::new();
        for info in &t.tables {
            let sig = String::from_utf8_lossy(&info.signature).to_string();
            let file = dir.join(format!("{sig}.aml"));
            std::fs::write(&file, t.table(&info.signature).expect("table")).expect("write");
            let out = Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .current_dir(&dir)
                .output()
                .expect("run iasl");
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {sig} failed:\n{log}");
            assert!(
                !log.to_lowercase().contains("error") && !log.contains("Invalid"),
                "iasl -d {sig} complained:\n{log}"
            );
            let text = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).expect("dsl");
            assert!(
                !text.contains("**** ") && !text.contains("Invalid"),
                "{sig} disassembly has warnings:\n{text}"
            );
            dsl.insert(sig, text);
        }
        let _ = std::fs::remove_dir_all(&dir);

        let dsdt = &dsl["DSDT"];
        assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 3, "{dsdt}");
        for d in &devs {
            let mem = format!("0x{:08X},         // Address Base", d.base);
            assert!(
                dsdt.contains(&mem),
                "no Memory32Fixed at {:#x}:\n{dsdt}",
                d.base
            );
            let irq = format!("0x{:08X},", d.irq);
            assert!(dsdt.contains(&irq), "no Interrupt {}:\n{dsdt}", d.irq);
        }
        assert!(dsdt.contains("EisaId (\"PNP0501\")"), "{dsdt}");
        assert!(dsdt.contains("Name (_S5, Package"), "{dsdt}");
        assert!(
            dsdt.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"),
            "{dsdt}"
        );

        let madt = &dsl["APIC"];
        assert_eq!(
            madt.matches("Subtable Type : 00 [Processor Local APIC]")
                .count(),
            2,
            "{madt}"
        );
        assert!(madt.contains("Address : FEC00000"), "{madt}");
        let fadt = &dsl["FACP"];
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    }
}
