//! A drive's backing chain, as the chain-changing commands see it: external snapshots
//! (`blockdev-snapshot-sync`, which puts a new qcow2 overlay on top of a running drive) and
//! the lookups that `block-stream` and `block-commit` share (which drive a node is the
//! active layer of, the images of its chain, QEMU's `bdrv_find_backing_image`, the graph
//! names the op blockers check).
//!
//! A drive's chain is a chain of image [`Node`]s: the drive's node in the graph holds the
//! active image, each image holds its backing. A snapshot keeps the old active image in
//! the graph under its node name (now read-only), so later jobs can name it (`base-node`).

use std::sync::Arc;

use ipc::QmpError;
use ipc::block::ImageFormat;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::block::create::create_qcow2;
use crate::block::gate::DirGate;
use crate::block::node::path_combine;
use crate::block::{Backing, Node, OpenOptions};
use crate::commands::State;
use crate::device::BlockDevice;
use crate::drives::Backend;
use crate::graph::BlockNode;

/// The drive a job works on: the device, what its guest requests go through, and its
/// active image.
pub(crate) struct DriveChain {
    pub device: String,
    pub backend: Arc<Backend>,
    pub node: Arc<BlockNode>,
    pub top: Arc<Node>,
}

impl DriveChain {
    /// The images below the active one, top-down.
    pub fn backing_chain(&self) -> Vec<Arc<Node>> {
        let mut out = Vec::new();
        let mut cur = self.top.backing();
        while let Some(n) = cur {
            cur = n.backing();
            out.push(n);
        }
        out
    }

    /// Whether `image` is the active image or one below it.
    pub fn contains(&self, image: &Arc<Node>) -> bool {
        Arc::ptr_eq(&self.top, image) || self.backing_chain().iter().any(|n| Arc::ptr_eq(n, image))
    }
}

/// QEMU's `bdrv_find_backing_image`: the image below `top` that `name` designates, by the
/// backing file name its overlay's header records, or by the file it resolves to (relative
/// to the overlay's directory).
pub(crate) fn find_backing_image(top: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    let mut cur = top.clone();
    while let Some(b) = cur.backing() {
        let recorded = cur.info().backing_filename;
        if recorded.as_deref() == Some(name) || b.filename() == name {
            return Some(b);
        }
        let full = path_combine(cur.filename(), name);
        if std::fs::canonicalize(&full).is_ok_and(|p| p == b.path()) {
            return Some(b);
        }
        cur = b;
    }
    None
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSnapshotSync {
    device: Option<String>,
    node_name: Option<String>,
    snapshot_file: String,
    snapshot_node_name: Option<String>,
    format: Option<String>,
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct BlockdevSnapshot {
    node: String,
    overlay: String,
}

impl State {
    /// The drive whose active layer `node` is, or an error naming `what` cannot work on
    /// other nodes.
    pub(crate) fn drive_chain(
        &self,
        node: &Arc<BlockNode>,
        what: &str,
    ) -> Result<DriveChain, QmpError> {
        let device = self.graph().device_of(node.name());
        let found = device.and_then(|d| {
            let drive = self.drives.drives.iter().find(|x| x.config.id == d)?;
            Some((d, drive.backend.clone()))
        });
        let (Some((device, backend)), Some(top)) = (found, node.image()) else {
            return Err(QmpError::generic(format!(
                "{what}: only the active layer of a --drive is supported here, not node '{}'",
                node.name()
            )));
        };
        Ok(DriveChain {
            device,
            backend,
            node: node.clone(),
            top,
        })
    }

    /// The drive whose backing chain `image` is in (below its active layer).
    pub(crate) fn drive_chain_below(&self, image: &Arc<Node>) -> Option<DriveChain> {
        self.drives.drives.iter().find_map(|d| {
            let node = d.backend.current();
            let top = node.image()?;
            let chain = DriveChain {
                device: d.config.id.clone(),
                backend: d.backend.clone(),
                node,
                top,
            };
            chain
                .backing_chain()
                .iter()
                .any(|n| Arc::ptr_eq(n, image))
                .then_some(chain)
        })
    }

    /// The graph name of a chain image, if the graph has one for it.
    pub(crate) fn image_name(&self, image: &Arc<Node>) -> Option<String> {
        self.graph()
            .node_of_image(image)
            .map(|n| n.name().to_string())
    }

    /// `blockdev-snapshot-sync` (`external_snapshot_action` and its commit), checks in
    /// QEMU's order: creates (or, with `mode=existing`, opens) the qcow2 overlay over the
    /// drive's active image, switches the drive to it with no guest request in flight, and
    /// reopens the old active image read-only as the overlay's backing.
    pub(crate) async fn blockdev_snapshot_sync(
        &self,
        a: BlockdevSnapshotSync,
    ) -> Result<Value, QmpError> {
        let old = self
            .graph()
            .lookup(a.device.as_deref(), a.node_name.as_deref())?;
        let chain = self.drive_chain(&old, "blockdev-snapshot-sync")?;
        let _quiesced = chain.backend.quiesce().await;
        let mut names = vec![chain.device.as_str(), old.name()];
        names.dedup();
        self.jobs.check_blocker(&names)?;
        if !chain.top.is_read_only() && chain.top.flush().await.is_err() {
            return Err(QmpError::generic("Input/output error"));
        }
        let format = a.format.as_deref().unwrap_or("qcow2");
        if a.node_name.is_some() && a.snapshot_node_name.is_none() {
            return Err(QmpError::generic("New overlay node-name missing"));
        }
        if let Some(n) = &a.snapshot_node_name {
            let g = self.graph();
            if g.name_taken(n) || g.is_device(n) {
                return Err(QmpError::generic("New overlay node-name already in use"));
            }
            if !ipc::common::id_wellformed(n) {
                return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
            }
        }
        match format {
            "qcow2" => {}
            "raw" | "file" => {
                return Err(QmpError::generic(format!(
                    "Backing file not supported for file format '{format}'"
                )));
            }
            other => {
                return Err(QmpError::generic(format!("Unknown file format '{other}'")));
            }
        }
        let existing = a.mode.as_deref() == Some("existing");
        if !existing {
            let path = std::path::Path::new(&a.snapshot_file);
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            DirGate::new(&self.image_dirs)
                .admit(&dir.display().to_string())
                .map_err(|_| {
                    QmpError::generic(format!(
                        "Could not create '{}': No such file or directory",
                        a.snapshot_file
                    ))
                })?;
            let backing = (chain.top.filename(), chain.top.format());
            create_qcow2(&a.snapshot_file, chain.top.size(), 65536, Some(backing))
                .await
                .map_err(|e| QmpError::generic(create_error(&a.snapshot_file, &e)))?;
        }
        // The old active image becomes read-only first, so the overlay reads through the
        // read-only instance; it goes back if the overlay cannot be opened.
        if let Err(e) = chain.top.reopen(true).await {
            tracing::warn!(
                "snapshot: reopening {} read-only: {e}",
                chain.top.filename()
            );
        }
        let opts = OpenOptions::new(
            a.snapshot_file.clone(),
            ImageFormat::Qcow2,
            &self.image_dirs,
        )
        .backing(Backing::Node(chain.top.clone()));
        let overlay = match Node::open(opts).await {
            Ok(n) => n,
            Err(e) => {
                if let Err(e) = chain.top.reopen(old.is_read_only()).await {
                    tracing::warn!("snapshot: reopening {}: {e}", chain.top.filename());
                }
                return Err(QmpError::generic(e.to_string()));
            }
        };
        let name = {
            let mut g = self.graph();
            let name = a
                .snapshot_node_name
                .clone()
                .unwrap_or_else(|| g.auto_name());
            g.reserve(name.clone());
            name
        };
        let read_only = overlay.is_read_only();
        let node = BlockNode::drive(name, overlay, read_only);
        let demoted = BlockNode::drive(old.name().to_string(), chain.top.clone(), true);
        self.graph()
            .snapshot_device(&chain.device, node.clone(), demoted)?;
        chain.backend.replace(node, &_quiesced);
        Ok(json!({}))
    }
}

impl State {
    /// `blockdev-snapshot`: `overlay`, a qcow2 node made by `blockdev-add` with `backing:
    /// null`, goes on top of the drive `node` (its image's backing becomes the drive's old
    /// active image, reopened read-only); the drive uses the overlay from then on. As in
    /// QEMU, the overlay's header is left as it is.
    pub(crate) async fn blockdev_snapshot(&self, a: BlockdevSnapshot) -> Result<Value, QmpError> {
        let old = self.graph().lookup(Some(&a.node), Some(&a.node))?;
        let chain = self.drive_chain(&old, "blockdev-snapshot")?;
        let quiesced = chain.backend.quiesce().await;
        let mut names = vec![chain.device.as_str(), old.name()];
        names.dedup();
        self.jobs.check_blocker(&names)?;
        if !chain.top.is_read_only() && chain.top.flush().await.is_err() {
            return Err(QmpError::generic("Input/output error"));
        }
        let overlay = self.graph().lookup(Some(&a.overlay), Some(&a.overlay))?;
        let in_use = {
            let g = self.graph();
            !g.parents(&overlay).is_empty() || g.device_of(overlay.name()).is_some()
        };
        if in_use || overlay.has_writer() {
            return Err(QmpError::generic("The overlay is already in use"));
        }
        if overlay.backing().is_some() {
            return Err(QmpError::generic("The overlay already has a backing image"));
        }
        let image = match (overlay.driver(), overlay.image()) {
            (crate::graph::Driver::Qcow2, Some(i)) if i.backing().is_none() => i,
            (crate::graph::Driver::Qcow2, Some(_)) => {
                return Err(QmpError::generic("The overlay already has a backing image"));
            }
            _ => {
                return Err(QmpError::generic(
                    "The overlay does not support backing images",
                ));
            }
        };
        if let Err(e) = chain.top.reopen(true).await {
            tracing::warn!(
                "snapshot: reopening {} read-only: {e}",
                chain.top.filename()
            );
        }
        if let Err(e) = image.set_backing(Some(chain.top.clone())).await {
            if let Err(e) = chain.top.reopen(old.is_read_only()).await {
                tracing::warn!("snapshot: reopening {}: {e}", chain.top.filename());
            }
            return Err(QmpError::generic(ipc::common::os_error_text(&e)));
        }
        let demoted = BlockNode::drive(old.name().to_string(), chain.top.clone(), true);
        self.graph()
            .snapshot_device(&chain.device, overlay.clone(), demoted)?;
        chain.backend.replace(overlay, &quiesced);
        Ok(json!({}))
    }
}

/// `bdrv_img_create`'s failure text for the overlay file.
fn create_error(file: &str, e: &crate::block::Error) -> String {
    match e {
        crate::block::Error::Open {
            reason,
            errno: Some(_),
            ..
        } => format!("Could not create '{file}': {reason}"),
        other => other.to_string(),
    }
}
