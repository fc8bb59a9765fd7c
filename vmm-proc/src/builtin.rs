//! The guests embedded in vmm-proc (`--kernel builtin:NAME`): `workload`, the workload
//! guest built from `guest/` (docs/guest-abi.md).

use crate::loader::LoadError;

/// The ELF image of built-in guest `name`.
pub fn image(name: &str) -> Result<&'static [u8], LoadError> {
    match name {
        "workload" => Ok(guest::WORKLOAD_ELF),
        _ => Err(LoadError::Bad(format!("no built-in guest '{name}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::Image;

    #[test]
    fn the_workload_guest_is_a_bootable_image() {
        let elf = image("workload").expect("built in");
        let parsed = Image::parse(elf, 64 << 20).expect("the loader takes it");
        assert!(parsed.entry >= 0x10_0000);
        assert!(image("nope").is_err());
    }
}
