//! QMP commands about the guest that combine two processes' answers:
//! - `query-blockstats` takes the drives (and their node names) from block-proc and the
//!   guest disks' counters from vmm-proc, which does the accounting as QEMU's virtio-blk
//!   does;
//! - `query-cpus-fast` takes the vCPU threads' host ids from the launcher (vmm-proc's own
//!   pid namespace hides them from it, and the jailed monitor cannot read `/proc`).

use ipc::QmpError;
use ipc::block::{BlockReply, BlockRequest};
use ipc::vmm::{DiskStats, VmmReply, VmmRequest};
use serde_json::{Map, Value, json};

use ipc::launcher::ChildKind;

use crate::qmp::schema::{ArgType, Member};
use crate::state::Monitor;

/// `query-blockstats`'s arguments, in schema order.
pub const QUERY_BLOCKSTATS: &[Member] = &[Member::optional("query-nodes", ArgType::Bool)];

/// `query-blockstats`: one `BlockStats` per drive, or per image node with `query-nodes`
/// (whose counters, as in QEMU, are zero but for `wr_highest_offset`: nodes have no
/// device accounting).
pub async fn query_blockstats(
    monitor: &Monitor,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let query_nodes = args.get("query-nodes").and_then(Value::as_bool) == Some(true);
    let drives = match monitor.block.call(BlockRequest::QueryBlock, &[]).await? {
        BlockReply::Block(info) => info,
        other => {
            return Err(QmpError::generic(format!(
                "block-proc: unexpected reply {other:?}"
            )));
        }
    };
    let counters = match &monitor.vmm {
        Some(vmm) => match vmm.call(VmmRequest::QueryBlockStats, &[]).await? {
            VmmReply::BlockStats(s) => s,
            other => {
                return Err(QmpError::generic(format!(
                    "vmm-proc: unexpected reply {other:?}"
                )));
            }
        },
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for d in drives {
        let node = d.inserted.as_ref().and_then(|i| i.node_name.clone());
        let found = counters.iter().find(|c| c.id == d.device);
        let stats = match (found, query_nodes) {
            (Some(c), false) => c.clone(),
            (Some(c), true) => DiskStats {
                wr_highest_offset: c.wr_highest_offset,
                ..Default::default()
            },
            (None, _) => DiskStats::default(),
        };
        let mut entry = Map::new();
        if !query_nodes {
            entry.insert("device".into(), d.device.clone().into());
        }
        if let Some(n) = node {
            entry.insert("node-name".into(), n.into());
        } else if query_nodes {
            continue;
        }
        entry.insert("stats".into(), stats_json(&stats));
        out.push(Value::Object(entry));
    }
    Ok(Value::Array(out))
}

/// QAPI `BlockDeviceStats`, members in schema order (splitvmm has no zoned devices, no
/// request merging and no timed statistics: those are zero or empty).
fn stats_json(s: &DiskStats) -> Value {
    let mut v = json!({
        "rd_bytes": s.rd.bytes,
        "wr_bytes": s.wr.bytes,
        "zone_append_bytes": 0,
        "unmap_bytes": s.unmap.bytes,
        "rd_operations": s.rd.operations,
        "wr_operations": s.wr.operations,
        "zone_append_operations": 0,
        "flush_operations": s.flush.operations,
        "unmap_operations": s.unmap.operations,
        "rd_total_time_ns": s.rd.total_time_ns,
        "wr_total_time_ns": s.wr.total_time_ns,
        "zone_append_total_time_ns": 0,
        "flush_total_time_ns": s.flush.total_time_ns,
        "unmap_total_time_ns": s.unmap.total_time_ns,
        "wr_highest_offset": s.wr_highest_offset,
        "rd_merged": 0,
        "wr_merged": 0,
        "zone_append_merged": 0,
        "unmap_merged": 0,
    });
    if let (Some(idle), Some(m)) = (s.idle_ns, v.as_object_mut()) {
        m.insert("idle_time_ns".into(), idle.into());
    }
    if let Some(m) = v.as_object_mut() {
        for (k, n) in [
            ("failed_rd_operations", s.rd.failed),
            ("failed_wr_operations", s.wr.failed),
            ("failed_zone_append_operations", 0),
            ("failed_flush_operations", s.flush.failed),
            ("failed_unmap_operations", s.unmap.failed),
            ("invalid_rd_operations", s.rd.invalid),
            ("invalid_wr_operations", s.wr.invalid),
            ("invalid_zone_append_operations", 0),
            ("invalid_flush_operations", s.flush.invalid),
            ("invalid_unmap_operations", s.unmap.invalid),
        ] {
            m.insert(k.into(), n.into());
        }
        m.insert("account_invalid".into(), true.into());
        m.insert("account_failed".into(), true.into());
        m.insert("timed_stats".into(), json!([]));
    }
    v
}

/// `query-cpus-fast`: QEMU's `CpuInfoFast` per vCPU, with the default topology QEMU uses
/// for `-smp N` (one socket of N cores); `[]` without a guest.
pub async fn query_cpus_fast(monitor: &Monitor) -> Result<Value, QmpError> {
    if monitor.cpus == 0 {
        return Ok(json!([]));
    }
    let threads = match &monitor.threads {
        Some(q) => q.threads(ChildKind::Vmm).await?,
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for i in 0..monitor.cpus {
        let name = format!("vcpu{i}");
        let tid = threads
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| QmpError::generic(format!("vCPU {i} has no thread")))?;
        out.push(json!({
            "cpu-index": i,
            "qom-path": format!("/machine/unattached/device[{i}]"),
            "thread-id": tid,
            "props": { "socket-id": 0, "core-id": i, "thread-id": 0 },
            "target": "x86_64",
        }));
    }
    Ok(Value::Array(out))
}
