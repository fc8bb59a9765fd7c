//! Permissions between the users of a node and the node, a small copy of QEMU's model
//! (`block.c`: `bdrv_parent_perms_conflict`, `bdrv_node_refresh_perm`): every user (a
//! parent node through its `file` or `backing` child, or an unnamed block device such as
//! an NBD export) holds a [`Claim`] on the node, a [`LockMode`] saying which permissions it
//! takes and which it lets others take. A new or changed claim is refused, in QEMU's
//! order and words, when
//!
//! 1. it conflicts with another claim on the node ("Permission conflict on node ...");
//! 2. the claims together want to write a read-only node ("Block node is read-only");
//! 3. a `file` node cannot take the OFD locks of all its claims together (another
//!    process holds the image: `Failed to get "write" lock`), or a `raw` node's child
//!    refuses the claims passed on to it (a raw node is a filter: its users' claims are its
//!    claim on its child).
//!
//! So a `file` node nobody uses holds no lock, as in QEMU, and gets exactly the locks its
//! users need. Format nodes claim their `file` child the way QEMU's qcow2 driver does
//! (read/write: consistent-read, write and resize, sharing neither write nor resize);
//! that includes write from the start, where QEMU adds it only with the first writer.
//! Dropping a claim gives its permissions back (and the locks nobody needs any more).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ipc::QmpError;

use super::{BlockNode, Kind};
use crate::block::lock::{self, LockMode, Perms};

/// The role a user has towards a node (QEMU's child name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    File,
    Backing,
    /// A blkdebug node's child.
    Image,
    /// A block device (an export, a command's temporary user).
    Root,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Backing => "backing",
            Self::Image => "image",
            Self::Root => "root",
        }
    }
}

/// Who holds a claim, as QEMU names it in permission errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// A node, through its child of some role.
    Node(String),
    /// A block device without a name: an export, `block_resize`'s temporary user.
    Device,
}

impl User {
    fn describe(&self) -> String {
        match self {
            Self::Node(name) => format!("node '{name}'"),
            Self::Device => "an unnamed block device".to_string(),
        }
    }
}

/// One claim on a node.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    id: u64,
    user: User,
    role: Role,
    mode: LockMode,
}

/// The claims on a node, newest first (QEMU's parent list order, which decides which
/// conflict is reported).
#[derive(Debug, Default)]
pub(super) struct Claims(Mutex<Vec<Entry>>);

impl Claims {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        // The list is replaced whole or not at all; a panic leaves no half state.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The permissions all claims take together, and what they all share.
    pub(super) fn total(&self) -> LockMode {
        total(&self.lock())
    }

    /// Whether some claim takes permission to write.
    pub(super) fn writing(&self) -> bool {
        self.total().perm.contains(Perms::WRITE)
    }
}

fn total(entries: &[Entry]) -> LockMode {
    entries
        .iter()
        .fold(LockMode::NONE, |acc, e| acc.union(e.mode))
}

/// A user's hold on a node; dropping it releases the permissions.
#[derive(Debug)]
pub struct Claim {
    node: Arc<BlockNode>,
    id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Claim {
    /// Claims `mode` on `node` for `user` in `role`, or says why not (QEMU's words).
    pub fn new(
        node: &Arc<BlockNode>,
        user: User,
        role: Role,
        mode: LockMode,
    ) -> Result<Self, QmpError> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        node.change_claims(|list| {
            list.insert(
                0,
                Entry {
                    id,
                    user,
                    role,
                    mode,
                },
            )
        })?;
        Ok(Self {
            node: node.clone(),
            id,
        })
    }

    /// The node claimed.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }

    /// Changes what the claim takes; on failure it stays as it was.
    pub fn update(&self, mode: LockMode) -> Result<(), QmpError> {
        self.node.change_claims(|list| {
            if let Some(e) = list.iter_mut().find(|e| e.id == self.id) {
                e.mode = mode;
            }
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let id = self.id;
        // Giving permissions back cannot conflict; a lock byte that fails to unlock goes
        // away with the file.
        if let Err(e) = self.node.change_claims(|list| list.retain(|e| e.id != id)) {
            tracing::warn!("releasing a claim on {}: {}", self.node.name(), e.desc);
        }
    }
}

/// QEMU's `bdrv_parent_perms_conflict`: `b` needs what `a` does not share.
fn conflict(node: &str, entries: &[Entry]) -> Result<(), QmpError> {
    for a in entries {
        for b in entries {
            if a.id == b.id {
                continue;
            }
            let clash = b.mode.perm.without(a.mode.shared);
            if !clash.is_empty() {
                return Err(QmpError::generic(format!(
                    "Permission conflict on node '{node}': permissions '{}' are both required \
                     by {} (uses node '{node}' as '{}' child) and unshared by {} (uses node \
                     '{node}' as '{}' child).",
                    clash.names(),
                    b.user.describe(),
                    b.role.as_str(),
                    a.user.describe(),
                    a.role.as_str(),
                )));
            }
        }
    }
    Ok(())
}

impl BlockNode {
    /// Applies `change` to the node's claims if the result is allowed (see the module
    /// documentation), and passes the new total on: to the OFD locks of a `file` node, to
    /// the child of a `raw` or `blkdebug` node.
    pub(super) fn change_claims(
        &self,
        change: impl FnOnce(&mut Vec<Entry>),
    ) -> Result<(), QmpError> {
        let mut list = self.claims.lock();
        let before = total(&list);
        let mut next = list.clone();
        change(&mut next);
        conflict(self.name(), &next)?;
        let after = total(&next);
        if self.is_read_only()
            && after
                .perm
                .intersects(Perms::WRITE.with(Perms::WRITE_UNCHANGED))
        {
            return Err(QmpError::generic("Block node is read-only"));
        }
        if after != before {
            match &self.kind {
                Kind::File {
                    image,
                    locking: true,
                } => {
                    lock::change(image.os_file(), before, after)
                        .map_err(|e| QmpError::generic(e.to_string()))?;
                }
                Kind::Raw { file, .. } | Kind::Blkdebug { image: file, .. } => {
                    file.update(after)?;
                }
                _ => {}
            }
        }
        *list = next;
        Ok(())
    }
}
