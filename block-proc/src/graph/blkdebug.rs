//! The `blkdebug` fault-injection node (QEMU's `block/blkdebug.c` behaviour, QAPI
//! `BlockdevOptionsBlkdebug`): a filter over its `image` child that fails chosen requests
//! with a chosen errno, so the error policies of jobs and devices are tested for real.
//!
//! What it holds and how it decides, as QEMU does:
//!
//! - `inject-error` rules (`event`, `state`, `iotype`, `errno`, `sector`, `once`,
//!   `immediately`) and `set-state` rules (`event`, `state`, `new_state`), in definition
//!   order. The node's state starts at 1; a rule's `state` of 0 (the default) matches any.
//! - An *event* happening to the node (see below) activates the `inject-error` rules for that
//!   event whose state matches (replacing the rules active before, if any matched), and the
//!   first matching `set-state` rule gives the state after the event. Rules on `none` are
//!   active from the start.
//! - Each request the node receives is checked against the active rules in order: the first
//!   whose `iotype` covers the request (default: read, write, write-zeroes, discard and
//!   flush) and whose `sector` lies inside it (default: any) decides. Its `errno` fails the
//!   request (nothing reaches the child); with `once` the rule is gone afterwards. A rule
//!   with errno 0 (or below) lets the request through. `immediately` changes only when
//!   QEMU reports the error (at once, or from a later coroutine turn), so it is accepted and
//!   has no effect here.
//!
//! Events come from the graph as in QEMU: a `raw` node above the blkdebug node announces
//! `read_aio` before each read and `write_aio` before each write, and `flush_to_os` then
//! `flush_to_disk` before a flush; the node announces `pwritev` (`pwritev_zero` for
//! write-zeroes) before its own writes and `pwritev_done` after them. Events that only
//! QEMU's qcow2 driver raises (`l2_load`, `cluster_alloc`, ...) never happen here, since
//! splitvmm's qcow2 nodes sit on image files, never on a blkdebug node. A qcow2 node's
//! backing may be a `raw` node over a blkdebug node: the qcow2 image then reads its backing
//! through a raw image of the file whose reads ask the rules first, `read_aio` before
//! each (`BlockNode::blkdebug_image`).
//!
//! Not implemented, refused with an error: `config` (the rules in a file), `align`,
//! `max-transfer`, the write-zero and discard limits, and `take-child-perms` /
//! `unshare-child-perms`.

use std::sync::Mutex;

use ipc::QmpError;
use ipc::block::{BLKDEBUG_EVENTS as EVENTS, BLKDEBUG_IO_TYPES as IO_TYPES};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The events the graph raises (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    ReadAio,
    WriteAio,
    FlushToOs,
    FlushToDisk,
    Pwritev,
    PwritevZero,
    PwritevDone,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Self::ReadAio => "read_aio",
            Self::WriteAio => "write_aio",
            Self::FlushToOs => "flush_to_os",
            Self::FlushToDisk => "flush_to_disk",
            Self::Pwritev => "pwritev",
            Self::PwritevZero => "pwritev_zero",
            Self::PwritevDone => "pwritev_done",
        }
    }
}

/// The kind of a request, for a rule's `iotype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Every type but block-status: a rule's default.
const DEFAULT_IO_MASK: u8 = 0b01_1111;

/// `BlkdebugInjectErrorOptions` as QMP gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectOptions {
    event: String,
    state: Option<i64>,
    iotype: Option<String>,
    errno: Option<i64>,
    sector: Option<i64>,
    once: Option<bool>,
    immediately: Option<bool>,
}

/// `BlkdebugSetStateOptions` as QMP gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStateOptions {
    event: String,
    state: Option<i64>,
    new_state: i64,
}

/// `BlockdevOptionsBlkdebug`'s own members (the child, `image`, is opened by the caller).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Options {
    config: Option<String>,
    align: Option<i64>,
    max_transfer: Option<i64>,
    opt_write_zero: Option<i64>,
    max_write_zero: Option<i64>,
    opt_discard: Option<i64>,
    max_discard: Option<i64>,
    #[serde(default)]
    inject_error: Vec<Value>,
    #[serde(default)]
    set_state: Vec<Value>,
    take_child_perms: Option<Vec<String>>,
    unshare_child_perms: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Inject {
    id: u64,
    event: usize,
    state: i64,
    mask: u8,
    errno: i32,
    /// Byte offset that must lie in a request, or any.
    offset: Option<u64>,
    /// A `sector` below -1: QEMU's offset wraps to a value no request reaches.
    never: bool,
    once: bool,
}

#[derive(Debug, Clone)]
struct SetState {
    event: usize,
    state: i64,
    new_state: i64,
}

#[derive(Debug)]
struct Rules {
    state: i64,
    inject: Vec<Inject>,
    set_state: Vec<SetState>,
    /// Ids of the active inject rules, in definition order.
    active: Vec<u64>,
}

/// A blkdebug node's rules and state. See the module documentation.
#[derive(Debug)]
pub struct Blkdebug {
    rules: Mutex<Rules>,
}

fn err(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

fn event_index(name: &str) -> Result<usize, QmpError> {
    EVENTS
        .iter()
        .position(|e| *e == name)
        .ok_or_else(|| err(format!("Invalid parameter '{name}'")))
}

impl Blkdebug {
    /// The rules of `o`, or why they cannot be had.
    pub fn new(o: &Options) -> Result<Self, QmpError> {
        if o.config.is_some() {
            return Err(err(
                "blkdebug: 'config' (rules in a file) is not supported by splitvmm; give \
                 'inject-error' and 'set-state'",
            ));
        }
        let limits = [
            ("align", o.align),
            ("max-transfer", o.max_transfer),
            ("opt-write-zero", o.opt_write_zero),
            ("max-write-zero", o.max_write_zero),
            ("opt-discard", o.opt_discard),
            ("max-discard", o.max_discard),
        ];
        if let Some((name, _)) = limits.iter().find(|(_, v)| v.is_some_and(|v| v != 0)) {
            return Err(err(format!(
                "blkdebug: '{name}' is not supported by splitvmm"
            )));
        }
        if o.take_child_perms.as_ref().is_some_and(|v| !v.is_empty())
            || o.unshare_child_perms
                .as_ref()
                .is_some_and(|v| !v.is_empty())
        {
            return Err(err(
                "blkdebug: 'take-child-perms' and 'unshare-child-perms' are not supported by \
                 splitvmm",
            ));
        }
        let mut inject = Vec::new();
        for (i, v) in o.inject_error.iter().enumerate() {
            let r: InjectOptions = serde_json::from_value(v.clone())
                .map_err(|e| err(format!("blkdebug: inject-error.{i}: {e}")))?;
            let mask = match &r.iotype {
                None => DEFAULT_IO_MASK,
                Some(t) => {
                    let n = IO_TYPES
                        .iter()
                        .position(|x| x == t)
                        .ok_or_else(|| err(format!("Invalid parameter '{t}'")))?;
                    1 << n
                }
            };
            let sector = r.sector.unwrap_or(-1);
            inject.push(Inject {
                id: i as u64,
                event: event_index(&r.event)?,
                state: r.state.unwrap_or(0),
                mask,
                errno: i32::try_from(r.errno.unwrap_or(i64::from(libc::EIO))).unwrap_or(0),
                offset: u64::try_from(sector).ok().map(|s| s.saturating_mul(512)),
                never: sector < -1,
                once: r.once.unwrap_or(false),
            });
            let _ = r.immediately;
        }
        let mut set_state = Vec::new();
        for (i, v) in o.set_state.iter().enumerate() {
            let r: SetStateOptions = serde_json::from_value(v.clone())
                .map_err(|e| err(format!("blkdebug: set-state.{i}: {e}")))?;
            set_state.push(SetState {
                event: event_index(&r.event)?,
                state: r.state.unwrap_or(0),
                new_state: r.new_state,
            });
        }
        let none = event_index("none")?;
        let active = inject
            .iter()
            .filter(|r| r.event == none)
            .map(|r| r.id)
            .collect();
        Ok(Self {
            rules: Mutex::new(Rules {
                state: 1,
                inject,
                set_state,
                active,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        // Every change is a plain assignment: a panic leaves no half state.
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `blkdebug_debug_event`: `event` happened to the node.
    pub fn event(&self, event: Event) {
        let Ok(ev) = event_index(event.name()) else {
            return;
        };
        let mut r = self.lock();
        let state = r.state;
        let matches = |rule_event: usize, rule_state: i64| {
            rule_event == ev && (rule_state == 0 || rule_state == state)
        };
        let hit: Vec<u64> = r
            .inject
            .iter()
            .filter(|i| matches(i.event, i.state))
            .map(|i| i.id)
            .collect();
        if !hit.is_empty() {
            r.active = hit;
        }
        if let Some(s) = r.set_state.iter().find(|s| matches(s.event, s.state)) {
            r.state = s.new_state;
        }
    }

    /// `rule_check`: the errno a request of `kind` on `[offset, offset + bytes)` fails
    /// with, if any.
    pub fn check(&self, kind: IoType, offset: u64, bytes: u64) -> Option<i32> {
        let mut r = self.lock();
        let end = offset.saturating_add(bytes);
        let rule = r
            .active
            .iter()
            .filter_map(|id| r.inject.iter().find(|i| i.id == *id))
            .find(|i| {
                i.mask & kind.bit() != 0
                    && !i.never
                    && i.offset.is_none_or(|o| o >= offset && o < end)
            })?
            .clone();
        if rule.errno <= 0 {
            return None;
        }
        if rule.once {
            r.active.retain(|id| *id != rule.id);
            r.inject.retain(|i| i.id != rule.id);
        }
        Some(rule.errno)
    }
}

/// The node's `full_open_options` as QEMU flattens them (`inject-error.0.event`...), for
/// its `json:` filename. QEMU flattens each rule in its dictionary's order, then copies
/// the flat options once more in that dictionary's order; the insertion order decides
/// the order in the filename of two keys that share a bucket.
pub fn desc(o: &Options, image: &Value) -> Value {
    let mut m = Map::new();
    m.insert("driver".into(), json!("blkdebug"));
    m.insert("image".into(), image.clone());
    for (list, rules) in [
        ("inject-error", &o.inject_error),
        ("set-state", &o.set_state),
    ] {
        for (i, rule) in rules.iter().enumerate() {
            if let Value::Object(r) = rule {
                for (k, v) in super::open::qdict_order(r) {
                    m.insert(format!("{list}.{i}.{k}"), v.clone());
                }
            }
        }
    }
    Value::Object(
        super::open::qdict_order(&m)
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: Value) -> Blkdebug {
        let o: Options = serde_json::from_value(v).expect("options");
        Blkdebug::new(&o).expect("rules")
    }

    /// iotests 041's TestReadErrors configuration: the rule arms on a read_aio in state 1,
    /// fires once on the first read covering sector 2048, and never again.
    #[test]
    fn armed_by_its_event_fires_once_on_its_sector() {
        let b = rules(json!({
            "inject-error": [{"event": "read_aio", "state": 1, "errno": 5, "sector": 2048,
                              "once": true, "immediately": false}],
            "set-state": [{"event": "read_aio", "state": 1, "new_state": 2},
                          {"event": "read_aio", "state": 2, "new_state": 1}],
        }));
        assert_eq!(b.check(IoType::Read, 1 << 20, 512), None, "not armed yet");
        b.event(Event::ReadAio);
        assert_eq!(b.lock().state, 2);
        assert_eq!(b.check(IoType::Read, 0, 65536), None, "outside the sector");
        b.event(Event::ReadAio);
        assert_eq!(b.lock().state, 1);
        assert_eq!(b.check(IoType::Read, 1 << 20, 512), Some(5));
        assert_eq!(b.check(IoType::Read, 1 << 20, 512), None, "once");
        b.event(Event::ReadAio);
        assert_eq!(b.check(IoType::Read, 1 << 20, 512), None, "gone for good");
    }

    #[test]
    fn none_rules_are_active_from_the_start_and_iotype_filters() {
        let b = rules(json!({"inject-error": [{"event": "none", "iotype": "write",
                                                "errno": 28}]}));
        assert_eq!(b.check(IoType::Read, 0, 512), None);
        assert_eq!(b.check(IoType::Write, 0, 512), Some(28));
        assert_eq!(b.check(IoType::Write, 4096, 512), Some(28), "not once");
        assert_eq!(b.check(IoType::BlockStatus, 0, 512), None);
    }

    #[test]
    fn defaults_and_odd_values() {
        let b = rules(json!({"inject-error": [{"event": "pwritev"}]}));
        assert_eq!(b.check(IoType::Write, 0, 512), None);
        b.event(Event::ReadAio);
        assert_eq!(
            b.check(IoType::Write, 0, 512),
            None,
            "another event arms nothing"
        );
        b.event(Event::Pwritev);
        assert_eq!(
            b.check(IoType::Flush, 0, 0),
            Some(libc::EIO),
            "EIO, any type"
        );
        let b = rules(json!({"inject-error": [{"event": "none", "errno": 0},
                                               {"event": "none", "errno": 5}]}));
        assert_eq!(
            b.check(IoType::Read, 0, 512),
            None,
            "the first rule decides"
        );
        let b = rules(json!({"inject-error": [{"event": "none", "sector": -5}]}));
        assert_eq!(b.check(IoType::Read, 0, u64::MAX), None);
        for bad in [
            json!({"config": "/x"}),
            json!({"align": 4096}),
            json!({"inject-error": [{"event": "nope"}]}),
        ] {
            let o: Options = serde_json::from_value(bad).expect("options");
            assert!(Blkdebug::new(&o).is_err());
        }
    }
}
