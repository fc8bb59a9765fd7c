//! The QMP commands block-proc executes, and the state they act on: the drives, the block
//! graph and the NBD server. The monitor has checked each command's arguments against its
//! schema; here they are decoded into typed structures and run. Results, errors and events
//! are QEMU's.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ipc::QmpError;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::block::lock::{LockMode, Perms};
use crate::drives::Drives;
use crate::graph::open::Adder;
use crate::graph::{Attached, BlockNode, Claim, Graph, Role, User};
use crate::jobs::Jobs;
use crate::nbd::{Export, NbdListener, NbdServer, NbdServerConfig, RemoveMode};
use crate::service::Outgoing;

/// NBD's limit on names and descriptions (`NBD_MAX_STRING_SIZE`).
const NBD_MAX_STRING: usize = 4096;

/// An export, by its QMP id.
#[derive(Debug, Clone)]
struct ExportEntry {
    /// The NBD export name.
    name: String,
    /// Its device, on the node it uses now (a mirror's completion moves it).
    device: Arc<Attached>,
    /// When it was added (QEMU lists exports newest first).
    seq: u64,
}

#[derive(Debug, Default)]
struct Nbd {
    server: Option<Arc<NbdServer<Attached>>>,
    exports: BTreeMap<String, ExportEntry>,
    /// The `seq` of the next export.
    next_seq: u64,
    /// Export names whose BLOCK_EXPORT_DELETED was already sent by the command that
    /// deleted them (so the server's later notice is not sent twice).
    reported: HashSet<String>,
}

/// What block-proc's commands act on.
#[derive(Debug)]
pub struct State {
    pub drives: Drives,
    /// Every block node: the drives' and `blockdev-add`'s.
    graph: Arc<Mutex<Graph>>,
    pub(crate) image_dirs: Vec<PathBuf>,
    nbd: Mutex<Nbd>,
    pub(crate) events: mpsc::UnboundedSender<Outgoing>,
    /// The block jobs.
    pub jobs: Arc<Jobs>,
}

/// Locks the graph (a poisoned lock still holds a consistent graph: every change to it
/// is a single step).
pub(crate) fn lock_graph(graph: &Mutex<Graph>) -> std::sync::MutexGuard<'_, Graph> {
    graph
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn args<T: DeserializeOwned>(command: &str, arguments: &str) -> Result<T, QmpError> {
    serde_json::from_str(arguments).map_err(|e| {
        QmpError::generic(format!(
            "{command}: arguments the schema let through do not decode: {e}"
        ))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NbdServerStart {
    max_connections: Option<u32>,
}

#[derive(Deserialize)]
struct NbdServerAdd {
    device: String,
    name: Option<String>,
    description: Option<String>,
    writable: Option<bool>,
    bitmap: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct BlockExportAdd {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    node_name: String,
    writable: Option<bool>,
    name: Option<String>,
    description: Option<String>,
    bitmaps: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct ExportRemove {
    #[serde(alias = "id")]
    name: String,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct BlockResize {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

#[derive(Deserialize)]
struct QueryNamedBlockNodes {
    flat: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct BlockdevDel {
    node_name: String,
}

impl State {
    pub fn new(drives: Drives, events: mpsc::UnboundedSender<Outgoing>) -> Self {
        let sink = events.clone();
        let jobs = Jobs::new(Arc::new(move |name: &str, data: Value| {
            let _ = sink.send(Outgoing::Event(name.to_string(), Some(data.to_string())));
        }));
        let graph = Graph::new(
            drives
                .drives
                .iter()
                .map(|d| (d.config.id.clone(), d.backend.current())),
        );
        Self {
            image_dirs: drives.image_dirs.clone(),
            drives,
            graph: Arc::new(Mutex::new(graph)),
            nbd: Mutex::default(),
            events,
            jobs,
        }
    }

    pub(crate) fn graph(&self) -> std::sync::MutexGuard<'_, Graph> {
        lock_graph(&self.graph)
    }

    /// The graph, for a job that changes it when it ends.
    pub(crate) fn graph_handle(&self) -> std::sync::Weak<Mutex<Graph>> {
        Arc::downgrade(&self.graph)
    }

    /// Every node, for closing at exit.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.graph().nodes()
    }

    fn nbd(&self) -> std::sync::MutexGuard<'_, Nbd> {
        self.nbd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, name: &str, data: Value) {
        let _ = self
            .events
            .send(Outgoing::Event(name.to_string(), Some(data.to_string())));
    }

    /// The node a device id or node name designates, with its node name.
    fn lookup(
        &self,
        device: Option<&str>,
        node_name: Option<&str>,
    ) -> Result<(String, Arc<BlockNode>), QmpError> {
        let node = self.graph().lookup(device, node_name)?;
        Ok((node.name().to_string(), node))
    }

    /// Runs `command` with its JSON `arguments` and the descriptors that came with it;
    /// returns the QMP return value as JSON text.
    pub async fn execute(
        self: &Arc<Self>,
        command: &str,
        arguments: &str,
        fds: Vec<OwnedFd>,
    ) -> Result<String, QmpError> {
        let ret = match command {
            "nbd-server-start" => self.nbd_server_start(args(command, arguments)?, fds)?,
            "nbd-server-stop" => self.nbd_server_stop().await?,
            "nbd-server-add" => self.nbd_server_add(args(command, arguments)?)?,
            "block-export-add" => self.block_export_add(args(command, arguments)?)?,
            "nbd-server-remove" | "block-export-del" => {
                self.export_remove(args(command, arguments)?)?
            }
            "query-block-exports" => self.query_block_exports(),
            "query-named-block-nodes" => {
                let a: QueryNamedBlockNodes = args(command, arguments)?;
                self.graph().query(a.flat.unwrap_or(false))
            }
            "block_resize" => self.block_resize(args(command, arguments)?).await?,
            "blockdev-add" => self.blockdev_add(arguments, fds).await?,
            "blockdev-del" => self.blockdev_del(args(command, arguments)?).await?,
            "drive-mirror" => self.drive_mirror(args(command, arguments)?, fds).await?,
            "blockdev-mirror" => self.blockdev_mirror(args(command, arguments)?).await?,
            "block-stream" | "block_stream" => self.block_stream(args(command, arguments)?).await?,
            "block-commit" => self.block_commit(args(command, arguments)?).await?,
            "blockdev-snapshot" => self.blockdev_snapshot(args(command, arguments)?).await?,
            "blockdev-snapshot-sync" => {
                self.blockdev_snapshot_sync(args(command, arguments)?)
                    .await?
            }
            c if crate::jobs::COMMANDS.contains(&c) => self.jobs.execute(command, arguments)?,
            _ => {
                return Err(QmpError::command_not_found(format!(
                    "The command {command} has not been found"
                )));
            }
        };
        Ok(ret.to_string())
    }

    fn nbd_server_start(
        self: &Arc<Self>,
        a: NbdServerStart,
        fds: Vec<OwnedFd>,
    ) -> Result<Value, QmpError> {
        if self.nbd().server.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| QmpError::generic("nbd-server-start: no listening socket"))?;
        let listener = NbdListener::from_fd(fd).map_err(|e| QmpError::generic(e.to_string()))?;
        let config = NbdServerConfig {
            max_connections: a.max_connections.unwrap_or(0),
            ..Default::default()
        };
        let (server, mut deleted) = NbdServer::new(config);
        self.nbd().server = Some(server.clone());
        let serving = server.clone();
        tokio::spawn(async move {
            if let Err(e) = serving.serve(listener).await {
                tracing::warn!("NBD server: {e}");
            }
        });
        // Exports that go away later (their last client left after a removal).
        let state = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(name) = deleted.recv().await {
                let Some(state) = state.upgrade() else { break };
                state.export_gone(&name);
            }
        });
        Ok(json!({}))
    }

    /// An export is really gone: forget it and say so (once).
    fn export_gone(&self, name: &str) {
        let id = {
            let mut nbd = self.nbd();
            if nbd.reported.remove(name) {
                return;
            }
            let id = nbd
                .exports
                .iter()
                .find(|(_, e)| e.name == name)
                .map(|(id, _)| id.clone());
            if let Some(id) = &id {
                nbd.exports.remove(id);
            }
            id
        };
        if let Some(id) = id {
            self.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        }
    }

    async fn nbd_server_stop(&self) -> Result<Value, QmpError> {
        let server = self
            .nbd()
            .server
            .take()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        server.stop().await;
        let exports = std::mem::take(&mut self.nbd().exports);
        let mut nbd = self.nbd();
        for (id, e) in exports {
            nbd.reported.insert(e.name);
            self.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        }
        Ok(json!({}))
    }

    fn add_export(
        &self,
        id: String,
        name: String,
        node: Arc<BlockNode>,
        writable: bool,
        description: Option<String>,
    ) -> Result<Value, QmpError> {
        let mut nbd = self.nbd();
        if nbd.exports.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let server = nbd
            .server
            .clone()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        if name.len() > NBD_MAX_STRING {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        if description
            .as_ref()
            .is_some_and(|d| d.len() > NBD_MAX_STRING)
        {
            return Err(QmpError::generic(format!(
                "description '{}' too long",
                description.unwrap_or_default()
            )));
        }
        // The export's permissions on the node (conflicts, read-only, image locks).
        let device = Attached::export(&node, writable)?;
        server
            .add_export(Export {
                name: name.clone(),
                description,
                device: device.clone(),
                writable,
            })
            .map_err(|e| QmpError::generic(e.to_string()))?;
        nbd.reported.remove(&name);
        let seq = nbd.next_seq;
        nbd.next_seq += 1;
        nbd.exports.insert(id, ExportEntry { name, device, seq });
        Ok(json!({}))
    }

    fn nbd_server_add(&self, a: NbdServerAdd) -> Result<Value, QmpError> {
        let (_, node) = self.lookup(Some(&a.device), Some(&a.device))?;
        let name = a.name.unwrap_or_else(|| a.device.clone());
        if !ipc::common::id_wellformed(&name) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if let Some(bitmap) = a.bitmap {
            return Err(QmpError::generic(format!("Bitmap '{bitmap}' is not found")));
        }
        // nbd-server-add makes a read-only node's export read-only without complaint.
        let writable = a.writable.unwrap_or(false) && !node.is_read_only();
        self.add_export(name.clone(), name, node, writable, a.description)
    }

    fn block_export_add(&self, a: BlockExportAdd) -> Result<Value, QmpError> {
        if a.kind != "nbd" {
            return Err(QmpError::generic(format!(
                "Block export type '{}' is not supported",
                a.kind
            )));
        }
        if !ipc::common::id_wellformed(&a.id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if self.nbd().exports.contains_key(&a.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                a.id
            )));
        }
        let (_, node) = self.lookup(None, Some(&a.node_name))?;
        let writable = a.writable.unwrap_or(false);
        if writable && node.is_read_only() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        if let Some(b) = a.bitmaps.as_ref().and_then(|b| b.first()) {
            return Err(QmpError::generic(format!(
                "Bitmap '{}' is not found",
                b.as_str().unwrap_or_default()
            )));
        }
        let name = a.name.unwrap_or_else(|| a.node_name.clone());
        self.add_export(a.id, name, node, writable, a.description)
    }

    fn export_remove(&self, a: ExportRemove) -> Result<Value, QmpError> {
        let mode = match a.mode.as_deref() {
            Some("hard") => RemoveMode::Hard,
            _ => RemoveMode::Safe,
        };
        let (server, entry) = {
            let nbd = self.nbd();
            let entry = nbd.exports.get(&a.name).cloned();
            (nbd.server.clone(), entry)
        };
        let (Some(server), Some(entry)) = (server, entry) else {
            return Err(QmpError::generic(format!(
                "Export '{}' is not found",
                a.name
            )));
        };
        server
            .remove_export(&entry.name, mode)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        // Gone at once (no client held it): report it before the command returns, as QEMU.
        if !server.exports().iter().any(|e| e.name == entry.name) {
            let mut nbd = self.nbd();
            nbd.exports.remove(&a.name);
            nbd.reported.insert(entry.name);
            self.emit("BLOCK_EXPORT_DELETED", json!({ "id": a.name }));
        }
        Ok(json!({}))
    }

    fn query_block_exports(&self) -> Value {
        let nbd = self.nbd();
        let live = nbd.server.as_ref().map(|s| s.exports()).unwrap_or_default();
        let mut exports: Vec<(&String, &ExportEntry)> = nbd.exports.iter().collect();
        exports.sort_by_key(|(_, e)| std::cmp::Reverse(e.seq));
        exports
            .into_iter()
            .map(|(id, e)| {
                let shutting_down = live.iter().find(|x| x.name == e.name).is_some_and(|x| x.shutting_down);
                json!({ "id": id, "type": "nbd", "node-name": e.device.node().name(), "shutting-down": shutting_down })
            })
            .collect()
    }

    async fn block_resize(&self, a: BlockResize) -> Result<Value, QmpError> {
        let (name, node) = self.lookup(a.device.as_deref(), a.node_name.as_deref())?;
        let device = self.graph().device_of(&name);
        self.jobs
            .check_blocker(&[device.as_deref().unwrap_or(&name)])?;
        let size = u64::try_from(a.size)
            .map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
        if node.is_read_only() {
            return Err(QmpError::generic("Cannot resize a read-only node"));
        }
        // A temporary user with the resize permission, as QEMU's command takes one.
        let _user = Claim::new(
            &node,
            User::Device,
            Role::Root,
            LockMode {
                perm: Perms::RESIZE,
                shared: Perms::ALL,
            },
        )?;
        node.resize(size)
            .await
            .map_err(|e| QmpError::generic(format!("Could not resize: {e}")))?;
        Ok(json!({}))
    }

    /// `blockdev-add`: the definition's nodes join the graph (see [`crate::graph::open`]),
    /// with the NBD connections the monitor made for its `driver=nbd` nodes.
    async fn blockdev_add(&self, arguments: &str, fds: Vec<OwnedFd>) -> Result<Value, QmpError> {
        let args: serde_json::Map<String, Value> = args("blockdev-add", arguments)?;
        Adder::new(&self.graph, &self.image_dirs, &args, fds)
            .add(&args)
            .await?;
        Ok(json!({}))
    }

    /// `blockdev-del`: QEMU's checks in QEMU's order, then the node and the children only it
    /// used leave the graph; they are flushed (or disconnected) and closed, which releases
    /// their claims, their locks and their files.
    async fn blockdev_del(&self, a: BlockdevDel) -> Result<Value, QmpError> {
        let name = a.node_name;
        let gone = {
            let mut graph = self.graph();
            if graph.find_node(&name).is_none() {
                return Err(QmpError::generic(format!(
                    "Failed to find node with node-name='{name}'"
                )));
            }
            // A block device uses it: a drive, or an export (until it is really gone).
            let exported: HashSet<String> = self
                .nbd()
                .exports
                .values()
                .map(|e| e.device.node().name().to_string())
                .collect();
            // A block device uses it: a drive, an export, a mirror job's target.
            if graph.is_drive_node(&name) || exported.contains(&name) || self.jobs.holds(&name) {
                return Err(QmpError::generic(format!("Node {name} is in use")));
            }
            // A job's source (QEMU's op blocker).
            self.jobs.check_blocker(&[&name])?;
            graph.delete(&name, &|n| exported.contains(n))?
        };
        for node in &gone {
            node.close().await;
        }
        for node in gone {
            if Arc::strong_count(&node) > 1 {
                tracing::warn!(
                    "node {} is still referenced after blockdev-del",
                    node.name()
                );
            }
        }
        Ok(json!({}))
    }
}
