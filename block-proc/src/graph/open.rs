//! `blockdev-add`: a `BlockdevOptions` definition (checked against the schema by the
//! monitor) made into nodes, children first, with QEMU's defaults, inheritance, order of
//! checks and error texts (measured against `qemu-storage-daemon` 10.0.2).
//!
//! For one definition, in order:
//!
//! 1. the root must have a `node-name`; `force-share` needs `read-only`;
//! 2. a format node's (`raw`, `qcow2`) `file` child: a node name or device id, or a
//!    nested definition opened first (and inserted into the graph, as QEMU does);
//! 3. `detect-zeroes=unmap` needs `discard=unmap`; options splitvmm does not implement
//!    are refused here, rather than ignored;
//! 4. the node name: well-formed, not a device id, not taken, at most 31 characters; a
//!    nested node without one gets a generated `#blockNNN` name;
//! 5. the driver opens the node: `file` opens the image file (under the allowed
//!    directories, without locks: its users' claims take them); `raw` checks its window
//!    and claims its child; `qcow2` claims its file (locks, read-only, conflicts), reads
//!    the header, then opens its backing: the node the header names (a `raw`/`qcow2` node
//!    over a `file` node, read-only, generated names), a node name or nested definition
//!    (`"Could not open backing file: ..."`), or none for `null`; `nbd` runs the NBD
//!    handshake over the socket the monitor connected for it; `blkdebug` (a protocol driver,
//!    named before its child, as in QEMU) opens its `image` child, then reads its rules.
//!
//! Nested definitions inherit `read-only`, `auto-read-only`, `discard`, `cache.*` and
//! `force-share` from their parent when they do not set them; a backing definition is
//! read-only unless it says otherwise. On failure every node this command made leaves the
//! graph again.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use ipc::QmpError;
use ipc::block::ImageFormat;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::perm::Claim;
use super::{
    BlockNode, DetectZeroes, Driver, Graph, Kind, MAX_BACKING_CHAIN, MAX_GRAPH_DEPTH,
    MAX_NODE_NAME, NodeOptions, Role, User, blkdebug,
};
use crate::block::header::Header;
use crate::block::lock::{LockMode, Perms};
use crate::block::node::OpenedFile;
use crate::block::node::path_combine;
use crate::block::{Backing, Error as BlockError, Node, OpenOptions};
use crate::device::BlockDevice;
use crate::nbd::NbdClient;

/// The options common to every driver (`BlockdevOptions`' base members).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Common {
    driver: String,
    node_name: Option<String>,
    discard: Option<String>,
    cache: Option<Cache>,
    active: Option<bool>,
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    force_share: Option<bool>,
    detect_zeroes: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "kebab-case")]
struct Cache {
    direct: Option<bool>,
    no_flush: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileOptions {
    filename: String,
    pr_manager: Option<String>,
    locking: Option<String>,
    aio: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawOptions {
    offset: Option<i64>,
    size: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Options {
    lazy_refcounts: Option<bool>,
    discard_no_unref: Option<bool>,
    encrypt: Option<Value>,
    data_file: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NbdOptions {
    server: Map<String, Value>,
    export: Option<String>,
    tls_creds: Option<String>,
    x_dirty_bitmap: Option<String>,
    reconnect_delay: Option<u32>,
}

/// What a nested definition takes from its parent when it does not say.
#[derive(Debug, Clone, Copy, Default)]
struct Inherited {
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    discard: Option<bool>,
    cache: Cache,
    force_share: Option<bool>,
}

/// A definition's options after inheritance and defaults.
#[derive(Debug, Clone, Copy)]
struct Effective {
    read_only: bool,
    auto_read_only: bool,
    discard: bool,
    cache: Cache,
    force_share: bool,
}

impl Effective {
    /// For a `file` child: everything.
    fn for_file(&self) -> Inherited {
        Inherited {
            read_only: Some(self.read_only),
            auto_read_only: Some(self.auto_read_only),
            discard: Some(self.discard),
            cache: self.cache,
            force_share: Some(self.force_share),
        }
    }

    /// For a `backing` child: read-only (and not auto) unless it says otherwise; the cache
    /// mode and force-share.
    fn for_backing(&self) -> Inherited {
        Inherited {
            read_only: Some(true),
            auto_read_only: Some(false),
            discard: None,
            cache: self.cache,
            force_share: Some(self.force_share),
        }
    }
}

fn err(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

fn decode<T: serde::de::DeserializeOwned>(def: &Map<String, Value>) -> Result<T, QmpError> {
    serde_json::from_value(Value::Object(def.clone())).map_err(|e| {
        err(format!(
            "blockdev-add: arguments the schema let through do not decode: {e}"
        ))
    })
}

/// Makes `blockdev-add`'s nodes.
#[derive(Debug)]
pub struct Adder<'a> {
    graph: &'a Mutex<Graph>,
    dirs: &'a [PathBuf],
    /// The monitor's NBD connections, by definition path.
    fds: HashMap<String, OwnedFd>,
    /// Nodes made so far, oldest first.
    made: Vec<String>,
}

type BoxFut<'a> = Pin<Box<dyn Future<Output = Result<Arc<BlockNode>, QmpError>> + Send + 'a>>;

fn lock(graph: &Mutex<Graph>) -> std::sync::MutexGuard<'_, Graph> {
    graph.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a definition sits: its path among the command's definitions (for its NBD
/// socket), or none for a backing file named by an image header.
#[derive(Debug, Clone)]
struct Place {
    path: Option<String>,
    root: bool,
    /// Resolved image files of the header-named backing chain above (loop detection).
    chain: Vec<PathBuf>,
}

impl Place {
    fn child(&self, name: &str) -> Self {
        Self {
            path: self.path.as_ref().map(|p| ipc::block::child_path(p, name)),
            root: false,
            chain: Vec::new(),
        }
    }
}

impl<'a> Adder<'a> {
    /// An adder over `graph`, with the sockets the monitor connected (in the order of
    /// [`ipc::block::blockdev_nbd_nodes`]).
    pub fn new(
        graph: &'a Mutex<Graph>,
        dirs: &'a [PathBuf],
        args: &Map<String, Value>,
        fds: Vec<OwnedFd>,
    ) -> Self {
        let paths = ipc::block::blockdev_nbd_nodes(args)
            .into_iter()
            .map(|(p, _)| p);
        Self {
            graph,
            dirs,
            fds: paths.zip(fds).collect(),
            made: Vec::new(),
        }
    }

    /// Opens the definition `args` and everything in it. On failure, the nodes made so far
    /// leave the graph (and are closed) before the error is returned.
    pub async fn add(mut self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let root = Place {
            path: Some(String::new()),
            root: true,
            chain: Vec::new(),
        };
        match self.open(args, root, Inherited::default()).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let gone = lock(self.graph).remove_all(&self.made);
                for node in gone {
                    node.close().await;
                }
                Err(e)
            }
        }
    }

    fn open<'b>(
        &'b mut self,
        def: &'b Map<String, Value>,
        place: Place,
        inh: Inherited,
    ) -> BoxFut<'b> {
        Box::pin(self.open_inner(def, place, inh))
    }

    async fn open_inner(
        &mut self,
        def: &Map<String, Value>,
        place: Place,
        inh: Inherited,
    ) -> Result<Arc<BlockNode>, QmpError> {
        let c: Common = decode(def)?;
        if place.root && c.node_name.is_none() {
            return Err(err("'node-name' must be specified for the root node"));
        }
        let cache = Cache {
            direct: c.cache.and_then(|x| x.direct).or(inh.cache.direct),
            no_flush: c.cache.and_then(|x| x.no_flush).or(inh.cache.no_flush),
        };
        let eff = Effective {
            read_only: c.read_only.or(inh.read_only).unwrap_or(false),
            auto_read_only: c.auto_read_only.or(inh.auto_read_only).unwrap_or(false),
            discard: c
                .discard
                .as_deref()
                .map(|d| d == "unmap")
                .or(inh.discard)
                .unwrap_or(false),
            cache,
            force_share: c.force_share.or(inh.force_share).unwrap_or(false),
        };
        if eff.force_share && !eff.read_only {
            return Err(err("force-share=on can only be used with read-only images"));
        }
        let driver = match c.driver.as_str() {
            "file" => Driver::File,
            "raw" => Driver::Raw,
            "qcow2" => Driver::Qcow2,
            "nbd" => Driver::Nbd,
            "blkdebug" => Driver::Blkdebug,
            other => {
                return Err(err(format!(
                    "Driver '{other}' is not supported by splitvmm (it has file, raw, qcow2, \
                     nbd and blkdebug)"
                )));
            }
        };
        // A format node opens its file child before anything else about itself.
        let file_child = match driver {
            Driver::Raw | Driver::Qcow2 => {
                let r = def.get("file").unwrap_or(&Value::Null);
                Some(self.child(r, &place, "file", eff.for_file()).await?)
            }
            _ => None,
        };
        let detect_zeroes = match c.detect_zeroes.as_deref() {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        };
        if detect_zeroes == DetectZeroes::Unmap && !eff.discard {
            return Err(err(
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap",
            ));
        }
        if eff.cache.direct == Some(true) {
            return Err(err(
                "cache.direct=on is not supported: splitvmm does no O_DIRECT I/O",
            ));
        }
        if c.active == Some(false) {
            return Err(err(
                "active=off is not supported: splitvmm has no inactive nodes",
            ));
        }
        let name = match &c.node_name {
            Some(n) => {
                self.check_name(n)?;
                n.clone()
            }
            None => lock(self.graph).auto_name(),
        };
        // The name is the node's from now on (QEMU names a node before opening its backing).
        lock(self.graph).reserve(name.clone());
        self.made.push(name.clone());
        let options = NodeOptions {
            discard: eff.discard,
            detect_zeroes,
            no_flush: eff.cache.no_flush.unwrap_or(false),
        };
        let node = match driver {
            Driver::File => self.open_file(def, name, &eff, options).await?,
            Driver::Raw => {
                let child = file_child.ok_or_else(|| err("raw: no file"))?;
                Self::open_raw(def, name, child, &eff, options)?
            }
            Driver::Qcow2 => {
                let child = file_child.ok_or_else(|| err("qcow2: no file"))?;
                self.open_qcow2(def, name, child, &place, &eff, options)
                    .await?
            }
            Driver::Nbd => self.open_nbd(def, name, &place, &eff, options).await?,
            Driver::Blkdebug => {
                // A protocol driver: it opens its image once it has its name.
                let r = def.get("image").unwrap_or(&Value::Null);
                let child = self.child(r, &place, "image", eff.for_file()).await?;
                Self::open_blkdebug(def, name, child, &eff, options)?
            }
        };
        if node.depth() > MAX_GRAPH_DEPTH {
            return Err(err(format!(
                "Node '{}' would stack {} nodes above an image; splitvmm allows at most \
                 {MAX_GRAPH_DEPTH}",
                node.name(),
                node.depth()
            )));
        }
        lock(self.graph).insert(node.clone(), place.root);
        Ok(node)
    }

    /// A child given as a node name or device id, or a nested definition.
    async fn child(
        &mut self,
        r: &Value,
        place: &Place,
        role: &str,
        inh: Inherited,
    ) -> Result<Arc<BlockNode>, QmpError> {
        match r {
            Value::String(s) => lock(self.graph).lookup(Some(s), Some(s)),
            Value::Object(def) => self.open(def, place.child(role), inh).await,
            _ => Err(err(format!(
                "Invalid parameter type for '{role}', expected: BlockdevRef"
            ))),
        }
    }

    /// QEMU's `bdrv_assign_node_name` checks.
    fn check_name(&self, name: &str) -> Result<(), QmpError> {
        if !ipc::common::id_wellformed(name) {
            return Err(err(format!("Invalid node-name: '{name}'")));
        }
        let g = lock(self.graph);
        if g.is_device(name) {
            return Err(err(format!(
                "node-name={name} is conflicting with a device id"
            )));
        }
        if g.name_taken(name) {
            return Err(err(format!("Duplicate nodes with node-name='{name}'")));
        }
        if name.len() > MAX_NODE_NAME {
            return Err(err("Node name too long"));
        }
        Ok(())
    }

    async fn open_file(
        &mut self,
        def: &Map<String, Value>,
        name: String,
        eff: &Effective,
        options: NodeOptions,
    ) -> Result<Arc<BlockNode>, QmpError> {
        let o: FileOptions = decode(def)?;
        if let Some(id) = &o.pr_manager {
            return Err(err(format!(
                "No persistent reservation manager with id '{id}'"
            )));
        }
        if o.aio.as_deref() == Some("native") && eff.cache.direct != Some(true) {
            return Err(err(
                "aio=native was specified, but it requires cache.direct=on, which was not \
                 specified.",
            ));
        }
        let locking = o.locking.as_deref() != Some("off");
        let open = |ro: bool| {
            Node::open(
                OpenOptions::new(o.filename.clone(), ImageFormat::Raw, self.dirs)
                    .read_only(ro)
                    .lock(LockMode::NONE)
                    .backing(Backing::None),
            )
        };
        let mut read_only = eff.read_only;
        let image = match open(read_only).await {
            // auto-read-only: a file that cannot be written is opened read-only.
            Err(BlockError::Open {
                errno: Some(libc::EACCES | libc::EPERM | libc::EROFS),
                ..
            }) if eff.auto_read_only && !read_only => {
                read_only = true;
                open(true).await
            }
            r => r,
        }
        .map_err(|e| err(e.to_string()))?;
        let desc = json!({"driver": "file", "filename": o.filename});
        Ok(BlockNode::new(
            name,
            Driver::File,
            Kind::File { image, locking },
            read_only,
            options,
            o.filename,
            desc,
        ))
    }

    fn open_raw(
        def: &Map<String, Value>,
        name: String,
        child: Arc<BlockNode>,
        eff: &Effective,
        options: NodeOptions,
    ) -> Result<Arc<BlockNode>, QmpError> {
        let o: RawOptions = decode(def)?;
        let unsigned = |v: Option<i64>, what: &str| -> Result<Option<u64>, QmpError> {
            v.map(|n| {
                u64::try_from(n).map_err(|_| {
                    err(format!(
                        "Value '{n}' is out of range for parameter '{what}'"
                    ))
                })
            })
            .transpose()
        };
        let offset = unsigned(o.offset, "offset")?.unwrap_or(0);
        let size = unsigned(o.size, "size")?;
        let real = child.size();
        if offset > real {
            return Err(err(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )));
        }
        if let Some(size) = size {
            if real - offset < size {
                return Err(err(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal \
                     to the  actual size of the containing file ({real})"
                )));
            }
            if !size.is_multiple_of(512) {
                return Err(err("Specified size is not multiple of 512"));
            }
        }
        // A raw node passes its users' claims on: with none yet, it takes nothing.
        let claim = Claim::new(&child, User::Node(name.clone()), Role::File, LockMode::NONE)?;
        let windowed = o.offset.is_some() || o.size.is_some();
        let mut desc = Map::new();
        desc.insert("driver".into(), json!("raw"));
        desc.insert("file".into(), child.desc().clone());
        if let Some(off) = o.offset {
            desc.insert("offset".into(), json!(off));
        }
        if let Some(sz) = o.size {
            desc.insert("size".into(), json!(sz));
        }
        let desc = Value::Object(desc);
        // A child QEMU can only describe as `json:` makes its raw parent `json:` too.
        let filename = if windowed || child.filename().starts_with("json:") {
            format!("json:{}", qemu_json(&desc))
        } else {
            child.filename().to_string()
        };
        Ok(BlockNode::new(
            name,
            Driver::Raw,
            Kind::Raw {
                file: claim,
                offset,
                size,
            },
            eff.read_only,
            options,
            filename,
            desc,
        ))
    }

    fn open_blkdebug(
        def: &Map<String, Value>,
        name: String,
        child: Arc<BlockNode>,
        eff: &Effective,
        options: NodeOptions,
    ) -> Result<Arc<BlockNode>, QmpError> {
        let o: blkdebug::Options = decode(def)?;
        let rules = blkdebug::Blkdebug::new(&o)?;
        // A filter: its users' claims are its claim on its image.
        let claim = Claim::new(
            &child,
            User::Node(name.clone()),
            Role::Image,
            LockMode::NONE,
        )?;
        let desc = blkdebug::desc(&o, &child.desc());
        let filename = format!("json:{}", qemu_json(&desc));
        Ok(BlockNode::new(
            name,
            Driver::Blkdebug,
            Kind::Blkdebug {
                image: claim,
                rules,
            },
            eff.read_only,
            options,
            filename,
            desc,
        ))
    }

    async fn open_qcow2(
        &mut self,
        def: &Map<String, Value>,
        name: String,
        child: Arc<BlockNode>,
        place: &Place,
        eff: &Effective,
        options: NodeOptions,
    ) -> Result<Arc<BlockNode>, QmpError> {
        let o: Qcow2Options = decode(def)?;
        if o.encrypt.is_some() {
            return Err(err("qcow2 encryption is not supported by splitvmm"));
        }
        if o.data_file.is_some() {
            return Err(err(
                "data-file is not supported by splitvmm (an image's own external data file is)",
            ));
        }
        if o.lazy_refcounts == Some(true) {
            return Err(err("lazy-refcounts=on is not supported by splitvmm"));
        }
        if o.discard_no_unref == Some(true) {
            return Err(err("discard-no-unref=on is not supported by splitvmm"));
        }
        let Some(image_file) = child.file_image() else {
            return Err(err(format!(
                "qcow2 needs an image file as its 'file' child (a 'file' node, or a 'raw' node \
                 over one), not the '{}' node '{}'",
                child.driver().as_str(),
                child.name()
            )));
        };
        // auto-read-only: over a file that could only be opened read-only, be read-only.
        let read_only = eff.read_only || (eff.auto_read_only && child.is_read_only());
        // QEMU's qcow2 takes consistent read, and write and resize when writable, sharing
        // neither write nor resize even when read-only; with force-share it shares all.
        let mut mode = if read_only {
            LockMode::READ_ONLY
        } else {
            LockMode::READ_WRITE
        };
        if eff.force_share {
            mode.shared = Perms::ALL;
        }
        let file_claim = Claim::new(&child, User::Node(name.clone()), Role::File, mode)?;
        let header =
            Header::read(image_file.os_file()).map_err(|e| err(ipc::common::os_error_text(&e)))?;
        let filename = child.filename().to_string();
        let backing_ref = def.get("backing");
        let backing = match backing_ref {
            None => {
                self.header_backing(&header, &filename, image_file.path(), place, eff)
                    .await?
            }
            Some(Value::Null) => None,
            Some(r) => {
                if let Value::Object(d) = r
                    && d.get("driver").and_then(Value::as_str) == Some("file")
                {
                    // What QEMU 10 answers for a protocol node defined as a backing file.
                    return Err(err(
                        "Could not open backing file: Can't specify 'file' and 'filename' \
                         options at the same time",
                    ));
                }
                let b = self
                    .child(r, place, "backing", eff.for_backing())
                    .await
                    .map_err(|e| err(format!("Could not open backing file: {}", e.desc)))?;
                Some(b)
            }
        };
        if let Some(b) = &backing
            && b.backing_depth() + 1 > MAX_BACKING_CHAIN - 1
        {
            return Err(err(format!(
                "The backing chain of '{filename}' would be longer than {MAX_BACKING_CHAIN} \
                 images, the most splitvmm opens"
            )));
        }
        let backing_image = match &backing {
            None => None,
            Some(b) => Some(match b.blkdebug_image(self.dirs).await {
                Some(r) => r.map_err(|e| err(format!("Could not open backing file: {e}")))?,
                None => b.image().ok_or_else(|| {
                    err(format!(
                        "Could not open backing file: the '{}' node '{}' cannot back a qcow2 \
                     image in splitvmm",
                        b.driver().as_str(),
                        b.name()
                    ))
                })?,
            }),
        };
        let backing_claim = match &backing {
            None => None,
            Some(b) => Some(Claim::new(
                b,
                User::Node(name.clone()),
                Role::Backing,
                LockMode::READ_ONLY,
            )?),
        };
        let dup = image_file
            .os_file()
            .try_clone()
            .map_err(|e| err(format!("Could not open '{filename}': {e}")))?;
        let opts = OpenOptions::new(filename.clone(), ImageFormat::Qcow2, self.dirs)
            .read_only(read_only)
            .opened(OpenedFile {
                file: dup,
                resolved: image_file.path().to_path_buf(),
            })
            .backing(match backing_image {
                Some(img) => Backing::Node(img),
                None => Backing::None,
            });
        let image = Node::open(opts).await.map_err(|e| err(e.to_string()))?;
        // QEMU names the node json:{...} when its backing is not the header's (by the
        // header's own string, as QEMU compares them).
        let overridden = match (backing_ref, &backing) {
            (None, _) => false,
            (Some(_), None) => header.backing_file.is_some(),
            (Some(_), Some(b)) => header.backing_file.as_deref() != Some(b.filename().as_str()),
        };
        let mut desc = Map::new();
        if overridden {
            desc.insert(
                "backing".into(),
                backing.as_ref().map_or(Value::Null, |b| b.desc().clone()),
            );
        }
        desc.insert("driver".into(), json!("qcow2"));
        desc.insert("file".into(), child.desc().clone());
        let desc = Value::Object(desc);
        let node_filename = if overridden {
            format!("json:{}", qemu_json(&desc))
        } else {
            filename
        };
        Ok(BlockNode::new(
            name,
            Driver::Qcow2,
            Kind::Qcow2 {
                image,
                file: file_claim,
                backing: std::sync::Mutex::new(backing_claim),
            },
            read_only,
            options,
            node_filename,
            desc,
        ))
    }

    /// The backing file a qcow2 header names, as nodes: a `file` node and a format node
    /// over it, read-only, with generated names. Like `--drive`, the header must say the
    /// backing format (images are never probed), and the file must lie under the allowed
    /// directories.
    async fn header_backing(
        &mut self,
        header: &Header,
        filename: &str,
        resolved: &Path,
        place: &Place,
        eff: &Effective,
    ) -> Result<Option<Arc<BlockNode>>, QmpError> {
        let Some(name) = &header.backing_file else {
            return Ok(None);
        };
        let backing_err = |e: BlockError| err(BlockError::Backing(Box::new(e)).to_string());
        let format = header.backing_format().ok_or_else(|| {
            backing_err(BlockError::NoBackingFormat {
                image: filename.to_string(),
                backing: name.clone(),
            })
        })?;
        if !matches!(format.as_str(), "raw" | "qcow2" | "file") {
            return Err(backing_err(BlockError::UnknownFormat(format)));
        }
        let full = path_combine(filename, name);
        if place.chain.len() + 1 >= MAX_BACKING_CHAIN as usize {
            return Err(err(format!(
                "Could not open backing file: the backing chain of '{filename}' is longer \
                 than {MAX_BACKING_CHAIN} images, the most splitvmm opens"
            )));
        }
        let mut chain = place.chain.clone();
        chain.push(resolved.to_path_buf());
        if let Ok(r) = std::fs::canonicalize(&full)
            && chain.contains(&r)
        {
            return Err(backing_err(BlockError::Loop {
                image: filename.to_string(),
                backing: full,
            }));
        }
        let file = json!({"driver": "file", "filename": full});
        let def = if format == "file" {
            file
        } else {
            json!({"driver": format, "file": file})
        };
        let Value::Object(def) = def else {
            return Err(err("backing definition"));
        };
        let at = Place {
            path: None,
            root: false,
            chain,
        };
        let node = self
            .open(&def, at, eff.for_backing())
            .await
            .map_err(|e| err(format!("Could not open backing file: {}", e.desc)))?;
        Ok(Some(node))
    }

    async fn open_nbd(
        &mut self,
        def: &Map<String, Value>,
        name: String,
        place: &Place,
        eff: &Effective,
        options: NodeOptions,
    ) -> Result<Arc<BlockNode>, QmpError> {
        let o: NbdOptions = decode(def)?;
        if let Some(id) = &o.tls_creds {
            return Err(err(format!("No TLS credentials with id '{id}'")));
        }
        if o.x_dirty_bitmap.is_some() {
            return Err(err("x-dirty-bitmap is not supported by splitvmm"));
        }
        if o.reconnect_delay.is_some_and(|d| d > 0) {
            return Err(err(
                "reconnect-delay is not supported: splitvmm's NBD client does not reconnect",
            ));
        }
        let fd = place
            .path
            .as_ref()
            .and_then(|p| self.fds.remove(p))
            .ok_or_else(|| err("blockdev-add: the monitor sent no connection for this NBD node"))?;
        nbd_node(
            fd,
            &o.server,
            o.export.as_deref(),
            name,
            (eff.read_only, eff.auto_read_only),
            options,
        )
        .await
    }
}

/// A `raw` node over all of `child`, as QEMU opens a protocol node given `format: raw`
/// (drive-mirror's NBD targets).
pub fn raw_node(
    name: String,
    child: &Arc<BlockNode>,
    options: NodeOptions,
) -> Result<Arc<BlockNode>, QmpError> {
    // A raw node passes its users' claims on: with none yet, it takes nothing.
    let claim = Claim::new(child, User::Node(name.clone()), Role::File, LockMode::NONE)?;
    let desc = json!({"driver": "raw", "file": child.desc().clone()});
    Ok(BlockNode::new(
        name,
        Driver::Raw,
        Kind::Raw {
            file: claim,
            offset: 0,
            size: None,
        },
        child.is_read_only(),
        options,
        child.filename().to_string(),
        desc,
    ))
}

/// An `nbd` node over a socket the monitor connected to `server` (a flat QAPI
/// `SocketAddress`): runs the handshake for `export`. `(read_only, auto_read_only)`: how
/// the node asks to be opened; a read-only export becomes a read-only node only with
/// `auto-read-only`.
pub async fn nbd_node(
    fd: OwnedFd,
    server: &Map<String, Value>,
    export: Option<&str>,
    name: String,
    (read_only, auto_read_only): (bool, bool),
    options: NodeOptions,
) -> Result<Arc<BlockNode>, QmpError> {
    let client = NbdClient::connect_fd(fd, export.unwrap_or_default())
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                err("Requested export not available")
            } else {
                err(ipc::common::os_error_text(&e))
            }
        })?;
    let mut read_only = read_only;
    if client.read_only() && !read_only {
        if auto_read_only {
            read_only = true;
        } else {
            return Err(err("Could not open image: Permission denied"));
        }
    }
    let filename = ipc::nbd_uri::nbd_filename(server, export);
    let mut desc = Map::new();
    desc.insert("driver".into(), json!("nbd"));
    if let Some(e) = export {
        desc.insert("export".into(), json!(e));
    }
    desc.insert("server".into(), Value::Object(server.clone()));
    Ok(BlockNode::new(
        name,
        Driver::Nbd,
        Kind::Nbd {
            client: Arc::new(client),
        },
        read_only,
        options,
        filename,
        Value::Object(desc),
    ))
}

/// QEMU's QDict hash of a key (`tdb_hash`), modulo its 512 buckets: a QDict iterates its
/// buckets in order, so this decides the order of members in a `json:` filename.
fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AF_u32.wrapping_mul(key.len() as u32);
    for (i, c) in key.bytes().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243_u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// The members of `m` in the order a QDict made by inserting them in `m`'s order iterates
/// them: by hash bucket, within a bucket the last inserted first.
pub(super) fn qdict_order(m: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut members: Vec<(usize, &String, &Value)> =
        m.iter().enumerate().map(|(i, (k, v))| (i, k, v)).collect();
    members.sort_by_key(|(i, k, _)| (qdict_bucket(k), std::cmp::Reverse(*i)));
    members.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// JSON as QEMU prints it in `json:` filenames: members in QDict order (see
/// [`qdict_order`]), `", "` and `": "` between items.
pub(super) fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = qdict_order(m)
                .into_iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), qemu_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::qemu_json;
    use serde_json::json;

    /// Orders qemu-storage-daemon 10.0.2 printed these filenames in.
    #[test]
    fn json_filenames_are_ordered_and_spaced_as_qemu_prints_them() {
        let raw = json!({"driver": "raw", "file": {"driver": "file", "filename": "/a"},
                         "offset": 512, "size": 4096});
        assert_eq!(
            qemu_json(&raw),
            r#"{"offset": 512, "driver": "raw", "size": 4096, "file": {"driver": "file", "filename": "/a"}}"#
        );
        let v = json!({"backing": null, "driver": "qcow2",
                       "file": {"driver": "file", "filename": "/tmp/bd/top.qcow2"}});
        assert_eq!(
            qemu_json(&v),
            r#"{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "/tmp/bd/top.qcow2"}}"#
        );
    }
}
