//! virtio-blk over virtio-mmio (modern, version 2): [`mmio`] is the register window and
//! device state a vCPU reaches, [`blk`] turns descriptor chains into block-proc requests,
//! and [`features`] names the feature bits. Queue processing itself runs on the I/O
//! thread (`io_thread.rs`).

pub mod blk;
pub mod mmio;

/// Feature bits (virtio 1.2 §2.2, §5.2.3, §6).
pub mod features {
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
    pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
    pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
}
