//! monitor ↔ block-proc: the block configuration, QMP requests that block-proc answers,
//! and (later) its events.
//!
//! ```text
//! monitor                              block-proc
//!   Hello ──────────────────────────────►
//!   ◄────────────────────────────── Hello
//!   BlockCall{id, Configure} ───────────►   open drives, enter the jail
//!   ◄──────────── BlockMessage::Reply{id}
//!   BlockCall{id, QueryBlock} ──────────►
//!   ◄──────────── BlockMessage::Reply{id, Block([..])}
//!   BlockCall{id, Qmp{command, arguments}} [+ fds] ─►
//!   ◄──────────── BlockMessage::Event{name, data}   (any time)
//!   ◄──────────── BlockMessage::ReplyPart{id, part}  (0 or more, for long JSON)
//!   ◄──────────── BlockMessage::Reply{id, Json(return)}
//!   BlockCall{id, Shutdown} ────────────►   flush, close, reply, exit
//! ```
//!
//! Replies carry QMP errors, so block-proc words them where it knows what went wrong.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{CallId, Message, QmpError};

/// A request to block-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockCall {
    pub id: CallId,
    pub request: BlockRequest,
}

impl Message for BlockCall {
    fn fd_count(&self) -> usize {
        match &self.request {
            BlockRequest::Qmp { fds, .. } => usize::from(*fds),
            _ => 0,
        }
    }
}

/// What the monitor asks of block-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlockRequest {
    /// First request: the configuration from the command line. block-proc opens the
    /// drives, then enters its jail before it answers.
    Configure(BlockConfig),
    /// `query-block`.
    QueryBlock,
    /// A QMP command block-proc executes (blockdev-*, nbd-*, block-export-*, ...). The
    /// monitor has checked the arguments against the command's schema; block-proc decodes
    /// them into its typed structures. Descriptors the monitor made for the command (an NBD
    /// listening socket, an NBD client connection) travel with it, `fds` of them.
    Qmp {
        command: String,
        arguments: String,
        fds: u8,
    },
    /// Close everything and exit.
    Shutdown,
}

/// block-proc's start-up configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockConfig {
    pub drives: Vec<DriveConfig>,
    /// Directories images may be opened under (`--image-dir`, and each drive's directory).
    pub image_dirs: Vec<PathBuf>,
    /// Whether to enter the jail (`--sandbox on`).
    pub sandbox: bool,
    /// `--incoming`: open the drives without their locks, which the migration source
    /// holds until the switch-over.
    pub incoming: bool,
}

/// Image formats. Never probed: the user names the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The driver name QMP uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// What to do on an I/O error (`werror=`, `rerror=`; QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnError {
    Report,
    Ignore,
    Enospc,
    Stop,
}

impl OnError {
    /// Whether a drive with these policies keeps an I/O status (QEMU's
    /// `blk_iostatus_is_enabled`: `werror` `stop` or `enospc`, or `rerror` `stop`). Only
    /// such drives show `io-status` in `query-block` and `nospace` in `BLOCK_IO_ERROR`.
    pub fn keeps_io_status(werror: OnError, rerror: OnError) -> bool {
        matches!(werror, OnError::Stop | OnError::Enospc) || rerror == OnError::Stop
    }
}

/// One `--drive`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriveConfig {
    pub id: String,
    pub file: PathBuf,
    pub format: ImageFormat,
    pub read_only: bool,
    pub werror: OnError,
    pub rerror: OnError,
}

/// block-proc to monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlockMessage {
    Reply {
        id: CallId,
        result: Result<BlockReply, QmpError>,
    },
    /// A QMP event to emit (e.g. `BLOCK_EXPORT_DELETED`); `data` is a JSON object, if any.
    Event { name: String, data: Option<String> },
    /// The beginning of a [`BlockReply::Json`] too long for one frame: the parts of one
    /// call come in order, and its `Reply` carries the rest. See [`JSON_PART`].
    ReplyPart { id: CallId, part: String },
}

/// The most bytes of JSON text one [`BlockMessage::ReplyPart`] (or a `Json` reply) carries,
/// well inside [`crate::MAX_FRAME`].
pub const JSON_PART: usize = 48 * 1024;

/// Most bytes of JSON a reply may have in all (QMP's own input limit).
pub const MAX_JSON_REPLY: usize = 64 << 20;

/// Splits JSON text into pieces of at most [`JSON_PART`] bytes, at character boundaries.
pub fn json_parts(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.len() > JSON_PART {
        let mut cut = JSON_PART;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        parts.push(head);
        rest = tail;
    }
    parts.push(rest);
    parts
}

impl Message for BlockMessage {}

/// Successful answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlockReply {
    Done,
    Block(Vec<BlockInfo>),
    /// A QMP command's return value, as JSON.
    Json(String),
}

/// QAPI `BlockInfo`. Optional members are `None` when absent; they travel as such because
/// the codec is not self-describing, and the monitor drops them from its JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockInfo {
    pub device: String,
    pub qdev: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub removable: bool,
    pub locked: bool,
    pub inserted: Option<BlockDeviceInfo>,
    #[serde(rename = "io-status")]
    pub io_status: Option<IoStatus>,
}

/// QAPI `BlockDeviceIoStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

/// QAPI `BlockDeviceInfo` (its field names mix `_` and `-` as QEMU's do).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    pub file: String,
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    pub ro: bool,
    pub drv: String,
    pub backing_file: Option<String>,
    pub backing_file_depth: u32,
    pub encrypted: bool,
    pub detect_zeroes: String,
    pub bps: u64,
    pub bps_rd: u64,
    pub bps_wr: u64,
    pub iops: u64,
    pub iops_rd: u64,
    pub iops_wr: u64,
    pub image: ImageInfo,
    pub cache: BlockdevCacheInfo,
    pub write_threshold: u64,
}

/// QAPI `ImageInfo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size")]
    pub actual_size: Option<u64>,
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: Option<bool>,
    #[serde(rename = "cluster-size")]
    pub cluster_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    pub full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    pub backing_filename_format: Option<String>,
    #[serde(rename = "format-specific")]
    pub format_specific: Option<ImageInfoSpecific>,
    #[serde(rename = "backing-image")]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// QAPI `ImageInfoSpecific`: a union on `type` with its members under `data`
/// (`{"type": "qcow2", "data": {...}}`). Of the formats splitvmm opens only qcow2 has such
/// members, so this is a plain struct (`type` is always "qcow2"): bincode cannot decode
/// serde's tagged enums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfoSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: ImageInfoSpecificQcow2,
}

/// QAPI `ImageInfoSpecificQCow2`. v2 images (`compat` "0.10") have none of the optional
/// members but `data-file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfoSpecificQcow2 {
    pub compat: String,
    #[serde(rename = "data-file")]
    pub data_file: Option<String>,
    #[serde(rename = "data-file-raw")]
    pub data_file_raw: Option<bool>,
    #[serde(rename = "extended-l2")]
    pub extended_l2: Option<bool>,
    #[serde(rename = "lazy-refcounts")]
    pub lazy_refcounts: Option<bool>,
    pub corrupt: Option<bool>,
    #[serde(rename = "refcount-bits")]
    pub refcount_bits: u64,
    #[serde(rename = "compression-type")]
    pub compression_type: String,
}

/// QAPI `BlockdevCacheInfo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockdevCacheInfo {
    pub writeback: bool,
    pub direct: bool,
    #[serde(rename = "no-flush")]
    pub no_flush: bool,
}

/// The `driver=nbd` definitions in `blockdev-add` arguments, with their paths (`""` for
/// the root, `"file"`, `"backing.file"`, ...), in the order the monitor connects them and
/// sends their sockets along with the command: a definition before the ones nested in it,
/// `file` before `backing`. block-proc takes each node's socket by its path.
pub fn blockdev_nbd_nodes(
    args: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(String, &serde_json::Map<String, serde_json::Value>)> {
    fn walk<'a>(
        def: &'a serde_json::Map<String, serde_json::Value>,
        path: String,
        out: &mut Vec<(String, &'a serde_json::Map<String, serde_json::Value>)>,
    ) {
        if def.get("driver").and_then(serde_json::Value::as_str) == Some("nbd") {
            out.push((path.clone(), def));
        }
        for child in BLOCKDEV_CHILDREN {
            if let Some(serde_json::Value::Object(nested)) = def.get(*child) {
                walk(nested, child_path(&path, child), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(args, String::new(), &mut out);
    out
}

/// Most levels of definitions nested in one another in one `blockdev-add` (QEMU has no
/// limit; this one keeps every recursion over them shallow).
pub const MAX_BLOCKDEV_NESTING: usize = 64;

/// How many levels of definitions `args` nests (1: no nested definition), counted
/// without recursion.
pub fn blockdev_nesting(args: &serde_json::Map<String, serde_json::Value>) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(args, 1)];
    while let Some((def, level)) = stack.pop() {
        deepest = deepest.max(level);
        for child in BLOCKDEV_CHILDREN {
            if let Some(serde_json::Value::Object(nested)) = def.get(*child) {
                stack.push((nested, level + 1));
            }
        }
    }
    deepest
}

/// The members of a `blockdev-add` definition that may hold nested definitions.
pub const BLOCKDEV_CHILDREN: &[&str] = &["file", "backing", "image"];

/// The path of `child` under the definition at `parent` (see [`blockdev_nbd_nodes`]).
pub fn child_path(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// QAPI `BlkdebugEvent`, in QEMU 10's order (the monitor's schema and block-proc's
/// `blkdebug` driver both use it).
pub const BLKDEBUG_EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// QAPI `BlkdebugIOType`.
pub const BLKDEBUG_IO_TYPES: &[&str] = &[
    "read",
    "write",
    "write-zeroes",
    "discard",
    "flush",
    "block-status",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_parts_split_long_text_at_character_boundaries() {
        assert_eq!(json_parts(""), vec![""]);
        assert_eq!(json_parts("{}"), vec!["{}"]);
        // Three-byte characters straddling every boundary.
        let text = "€".repeat(JSON_PART);
        let parts = json_parts(&text);
        assert!(parts.len() >= 3);
        assert!(parts.iter().all(|p| p.len() <= JSON_PART && !p.is_empty()));
        assert_eq!(parts.concat(), text);
    }
}
