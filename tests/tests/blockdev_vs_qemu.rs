//! Differential tests: the same `blockdev-add` / `blockdev-del` sequences (and the export
//! and NBD commands around them) go to the real `qemu-storage-daemon` and to splitvmm, one
//! after the other on the same files; every reply must have the same error class and text,
//! or succeed in both. `query-named-block-nodes` must list the same nodes with the same
//! contents, apart from what QEMU makes random (the number in a generated `#block` name)
//! and what QEMU 10 added after the 9.2 dialect splitvmm speaks (`active`).

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tests::{
    RawQmp, Splitvmm, StorageDaemon, TempDir, qemu_img_create, qemu_img_overlay, qemu_io, qemu_nbd,
};

/// One command of a script.
type Step = (&'static str, Value);

/// What a reply says, for comparison: the error's class and text, or "ok" (with the
/// return value of the queries, normalized).
fn outcome(reply: &Value, command: &str) -> Value {
    match reply.get("error") {
        Some(e) => json!({"class": e["class"], "desc": e["desc"]}),
        None if command.starts_with("query-") => normalize(&reply["return"]),
        None => json!("ok"),
    }
}

/// Generated names lose their number (QEMU adds two random digits), `active` goes.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "active")
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::String(s) if s.starts_with("#block") => json!("#block"),
        other => other.clone(),
    }
}

fn play(qmp: &mut RawQmp, script: &[Step]) -> Vec<Value> {
    script
        .iter()
        .map(|(cmd, args)| {
            let reply = qmp.exec(cmd, args.clone());
            // Give an export's removal time to finish before the next command.
            if *cmd == "block-export-del" && reply.get("return").is_some() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            // A cancelled job (or a started stream) ends after the reply: wait until it
            // is gone.
            if matches!(*cmd, "block-job-cancel" | "block-stream") && reply.get("return").is_some()
            {
                for _ in 0..1000 {
                    if qmp.exec("query-jobs", json!({}))["return"] == json!([]) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            outcome(&reply, cmd)
        })
        .collect()
}

/// Plays `script` on qemu-storage-daemon, then on splitvmm (allowed into `dir`), and
/// reports every step where they differ.
fn compare(dir: &TempDir, script: &[Step]) {
    compare_from(dir, || {}, script);
}

/// [`compare`], with `setup` run before each server's turn (for scripts that change the
/// images).
fn compare_from(dir: &TempDir, setup: impl Fn(), script: &[Step]) {
    let theirs = {
        setup();
        let qsd = StorageDaemon::start(&dir.join("qsd.sock"));
        let mut qmp = qsd.raw_qmp();
        play(&mut qmp, script)
    };
    let ours = {
        setup();
        let image_dir = dir.path().display().to_string();
        let vm = Splitvmm::start(&["--image-dir", &image_dir]);
        let mut qmp = vm.raw_qmp();
        play(&mut qmp, script)
    };
    let diffs: Vec<String> = script
        .iter()
        .zip(theirs.iter().zip(&ours))
        .filter(|(_, (a, b))| a != b)
        .map(|((cmd, args), (a, b))| {
            format!("{cmd} {args}\n  qemu-storage-daemon: {a}\n  splitvmm:            {b}")
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} replies differ:\n{}",
        diffs.len(),
        script.len(),
        diffs.join("\n")
    );
}

fn file(path: &Path) -> Value {
    json!({"driver": "file", "filename": path})
}

fn with(mut def: Value, extra: Value) -> Value {
    if let (Value::Object(d), Value::Object(e)) = (&mut def, extra) {
        d.extend(e);
    }
    def
}

const ADD: &str = "blockdev-add";
const DEL: &str = "blockdev-del";

/// base.raw ← mid.qcow2 ← top.qcow2 (relative backing names), a raw and a qcow2 image.
fn images(dir: &TempDir) {
    qemu_img_create("raw", &dir.join("base.raw"), "1M");
    qemu_io(
        "raw",
        &dir.join("base.raw").display().to_string(),
        &["write -P 0x11 0 1M"],
    );
    qemu_img_overlay(dir.join("mid.qcow2"), "base.raw", "raw", None);
    qemu_img_overlay(dir.join("top.qcow2"), "mid.qcow2", "qcow2", None);
    qemu_img_create("raw", &dir.join("a.raw"), "1M");
    qemu_img_create("qcow2", &dir.join("a.qcow2"), "1M");
    std::fs::write(dir.join("empty"), b"").expect("empty file");
}

#[test]
fn node_names_drivers_files_and_backing_errors_match_qemu() {
    let dir = TempDir::new("diff-names");
    images(&dir);
    let a_raw = file(&dir.join("a.raw"));
    let a_qcow = file(&dir.join("a.qcow2"));
    let top = file(&dir.join("top.qcow2"));
    let named = |n: &str| with(a_raw.clone(), json!({"node-name": n}));
    let script: Vec<Step> = vec![
        (ADD, json!({})),
        (ADD, json!({"driver": "file"})),
        (ADD, json!({"driver": "nope"})),
        (ADD, a_raw.clone()),
        (ADD, json!({"driver": "file", "node-name": "f1"})),
        (ADD, named("1f")),
        (ADD, named("#f")),
        (ADD, named("")),
        (ADD, named("a-name-that-is-thirty-two-chars")),
        (ADD, named("a-name-that-is-thirty-two-chars!")),
        (ADD, named(&"a".repeat(32))),
        (ADD, named(&"a".repeat(31))),
        (
            ADD,
            with(file(&dir.join("nonexist")), json!({"node-name": "f1"})),
        ),
        (
            ADD,
            with(file(&dir.join("empty")), json!({"node-name": "e"})),
        ),
        (ADD, named("f1")),
        (ADD, named("f1")),
        (
            ADD,
            json!({"driver": "raw", "node-name": "r1", "file": "nosuch"}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "r1", "file": "f1"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q1", "file": "f1"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q1", "file": a_raw}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "qe", "file": "e"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q2", "file": a_qcow}),
        ),
        // The same image again in the same process: QEMU's locks are per open file.
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q3", "file": a_qcow}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q3", "read-only": true, "file": a_qcow}),
        ),
        (ADD, json!({"driver": "raw", "node-name": "x", "file": 1})),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "x", "file": "f1", "backing": 1}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "file"}}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "nope"}}),
        ),
        (DEL, json!({"node-name": "nosuch"})),
        (DEL, json!({"node-name": "f1"})),
        (DEL, json!({"node-name": "r1"})),
        (DEL, json!({"node-name": "f1"})),
        (DEL, json!({"node-name": "q2"})),
        // The header's backing chain, as generated nodes.
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top}),
        ),
        ("query-named-block-nodes", json!({})),
        (DEL, json!({"node-name": "top"})),
        // Errors in children, in QEMU's order.
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": file(Path::new("/nonexist"))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "1x", "file": file(Path::new("/nonexist"))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "1x", "file": "nosuch"}),
        ),
        (
            ADD,
            json!({"driver": "file", "node-name": "1x", "filename": "/nonexist"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "1x", "file": a_raw}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": with(top.clone(), json!({"node-name": "1y"}))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": with(top.clone(), json!({"node-name": "top"}))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": with(top.clone(), json!({"bogus": 1}))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top,
                     "backing": {"driver": "qcow2", "file": file(&dir.join("nonexist"))}}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top, "backing": "nosuch"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top, "backing": a_raw}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top,
                     "backing": {"driver": "qcow2", "file": a_raw}}),
        ),
        // Backing null, by name, nested: and how they are named.
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top, "backing": null}),
        ),
        ("query-named-block-nodes", json!({})),
        (DEL, json!({"node-name": "top"})),
        (
            ADD,
            json!({"driver": "raw", "node-name": "base", "read-only": true,
                     "file": with(file(&dir.join("base.raw")), json!({"node-name": "bf"}))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top, "backing": "base"}),
        ),
        ("query-named-block-nodes", json!({})),
        (DEL, json!({"node-name": "base"})),
        (DEL, json!({"node-name": "bf"})),
        (DEL, json!({"node-name": "top"})),
        (DEL, json!({"node-name": "base"})),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "file": top,
                     "backing": {"driver": "qcow2", "node-name": "mid",
                                 "file": with(file(&dir.join("mid.qcow2")), json!({"node-name": "mf"})),
                                 "backing": null}}),
        ),
        ("query-named-block-nodes", json!({})),
        (DEL, json!({"node-name": "mid"})),
        (DEL, json!({"node-name": "mf"})),
        (DEL, json!({"node-name": "top"})),
        ("query-named-block-nodes", json!({})),
    ];
    compare(&dir, &script);
}

#[test]
fn exports_options_permissions_and_windows_match_qemu() {
    let dir = TempDir::new("diff-opts");
    images(&dir);
    let sock = dir.join("nbd.sock");
    let a_raw = file(&dir.join("a.raw"));
    let opt = |n: &str, extra: Value| with(a_raw.clone(), with(json!({"node-name": n}), extra));
    let export = |id: &str, node: &str, writable: bool| {
        (
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "writable": writable}),
        )
    };
    let script: Vec<Step> = vec![
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        ),
        (ADD, opt("f", json!({}))),
        (ADD, json!({"driver": "raw", "node-name": "r", "file": "f"})),
        export("e", "r", false),
        (DEL, json!({"node-name": "r"})),
        (DEL, json!({"node-name": "f"})),
        export("e2", "f", false),
        (DEL, json!({"node-name": "f"})),
        ("block-export-del", json!({"id": "e"})),
        ("block-export-del", json!({"id": "e2"})),
        (DEL, json!({"node-name": "r"})),
        (DEL, json!({"node-name": "f"})),
        // Read-only nodes and what may be stacked on them.
        (ADD, opt("fro", json!({"read-only": true}))),
        (
            ADD,
            json!({"driver": "raw", "node-name": "r1", "file": "fro"}),
        ),
        export("e3", "r1", true),
        export("e3", "fro", true),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q1",
                     "file": with(file(&dir.join("top.qcow2")), json!({"read-only": true}))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q1", "read-only": true,
                     "file": file(&dir.join("top.qcow2"))}),
        ),
        (DEL, json!({"node-name": "q1"})),
        // Options.
        (ADD, opt("o1", json!({"discard": "unmap"}))),
        (ADD, opt("o2", json!({"detect-zeroes": "unmap"}))),
        (ADD, opt("o3", json!({"detect-zeroes": "on"}))),
        (
            ADD,
            opt("o4", json!({"detect-zeroes": "unmap", "discard": "unmap"})),
        ),
        (ADD, opt("o5", json!({"force-share": true}))),
        (
            ADD,
            opt("o6", json!({"force-share": true, "read-only": true})),
        ),
        (ADD, opt("o8", json!({"cache": {"no-flush": true}}))),
        (ADD, opt("o9", json!({"aio": "native"}))),
        (ADD, opt("o10", json!({"aio": "io_uring"}))),
        (ADD, opt("o11", json!({"locking": "off"}))),
        (
            ADD,
            opt(
                "o12",
                json!({"locking": "on", "aio-max-batch": 8, "drop-cache": false}),
            ),
        ),
        (ADD, opt("o13", json!({"auto-read-only": true}))),
        (ADD, opt("o14", json!({"pr-manager": "x"}))),
        (
            ADD,
            json!({"driver": "raw", "node-name": "o15", "file": a_raw, "offset": 512, "size": 4096}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "o16", "file": a_raw, "offset": -1}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "o17", "file": a_raw, "size": 100}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "o18", "file": a_raw,
                     "offset": 1048576 - 512, "size": 1024}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "o19", "file": a_raw, "offset": 2097152}),
        ),
        ("query-named-block-nodes", json!({})),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "dup", "file": file(&dir.join("top.qcow2")),
                     "read-only": true, "force-share": true, "detect-zeroes": "unmap"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q", "file": "o1", "force-share": true}),
        ),
        // Users of one file node that do not get along.
        (
            ADD,
            with(file(&dir.join("a.qcow2")), json!({"node-name": "cf"})),
        ),
        export("c1", "cf", true),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "cq", "file": "cf"}),
        ),
        ("block-export-del", json!({"id": "c1"})),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "cq", "file": "cf"}),
        ),
        export("c2", "cf", true),
        export("c3", "cf", false),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "cq2", "file": "cf"}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "cq3", "file": "cf", "read-only": true}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "cr", "file": "cf"}),
        ),
        export("c4", "cr", true),
        export("c5", "cr", false),
        export("c6", "cq", true),
        (DEL, json!({"node-name": "cf"})),
        // block_resize takes the resize permission for a moment.
        ("block_resize", json!({"node-name": "cf", "size": 4194304})),
        ("block_resize", json!({"node-name": "cq", "size": 2097152})),
        ("block_resize", json!({"node-name": "cq", "size": -1})),
        ("block_resize", json!({"node-name": "nosuch", "size": 512})),
        ("query-named-block-nodes", json!({"flat": true})),
        (DEL, json!({"node-name": "cq"})),
        ("query-block-exports", json!({})),
    ];
    compare(&dir, &script);
}

#[test]
fn nbd_nodes_and_locks_held_by_another_process_match_qemu() {
    let dir = TempDir::new("diff-nbd");
    images(&dir);
    let qn = dir.join("qn.sock");
    let _server = qemu_nbd(&dir.join("base.raw"), "raw", "exp", &qn, false);
    let nbd = |n: &str, export: Option<&str>| {
        let mut d =
            json!({"driver": "nbd", "node-name": n, "server": {"type": "unix", "path": qn}});
        if let Some(e) = export {
            d["export"] = json!(e);
        }
        d
    };
    let script: Vec<Step> = vec![
        (ADD, nbd("n", Some("exp"))),
        (ADD, nbd("n2", Some("nope"))),
        (ADD, nbd("n3", None)),
        (
            ADD,
            json!({"driver": "nbd", "node-name": "n4", "server": {"type": "fd", "str": "foo"}}),
        ),
        (ADD, with(nbd("n5", Some("exp")), json!({"tls-creds": "c"}))),
        (
            ADD,
            json!({"driver": "raw", "node-name": "rn",
                     "file": {"driver": "nbd", "export": "exp", "server": {"type": "unix", "path": qn}}}),
        ),
        (
            ADD,
            json!({"driver": "nbd", "node-name": "x",
                     "server": {"type": "unix", "path": dir.join("nosock")}}),
        ),
        (
            ADD,
            json!({"driver": "nbd", "node-name": "x",
                     "server": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
        ),
        ("query-named-block-nodes", json!({})),
        (DEL, json!({"node-name": "rn"})),
        (DEL, json!({"node-name": "n"})),
        ("query-named-block-nodes", json!({})),
    ];
    compare(&dir, &script);

    // Images another process holds (qemu-nbd read/write, then read-only).
    let l_qcow = dir.join("l.qcow2");
    let l_raw = dir.join("l.raw");
    qemu_img_create("qcow2", &l_qcow, "1M");
    qemu_img_create("raw", &l_raw, "1M");
    let qcow2_node = |ro: bool| {
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "q", "read-only": ro, "file": file(&l_qcow)}),
        )
    };
    let del: Step = (DEL, json!({"node-name": "q"}));
    {
        let _holder = qemu_nbd(&l_qcow, "qcow2", "h", &dir.join("h.sock"), false);
        compare(
            &dir,
            &[
                qcow2_node(false),
                qcow2_node(true),
                (
                    ADD,
                    json!({"driver": "file", "node-name": "q", "filename": l_qcow}),
                ),
                del.clone(),
            ],
        );
    }
    {
        let _holder = qemu_nbd(&l_qcow, "qcow2", "h", &dir.join("h.sock"), true);
        compare(&dir, &[qcow2_node(false), qcow2_node(true), del.clone()]);
    }
    {
        let _holder = qemu_nbd(&l_raw, "raw", "h", &dir.join("h.sock"), false);
        let raw_node = json!({"driver": "raw", "node-name": "q", "file": file(&l_raw)});
        let sock = dir.join("nbd.sock");
        compare(
            &dir,
            &[
                (ADD, raw_node.clone()),
                del.clone(),
                (ADD, with(raw_node.clone(), json!({"read-only": true}))),
                del,
                (
                    "nbd-server-start",
                    json!({"addr": {"type": "unix", "data": {"path": sock}}}),
                ),
                // Exported writable while qemu-nbd has it open: the lock bytes decide.
                (ADD, raw_node),
                (
                    "block-export-add",
                    json!({"type": "nbd", "id": "q", "node-name": "q", "writable": true}),
                ),
                // ...unless the file node takes no locks.
                (
                    ADD,
                    json!({"driver": "raw", "node-name": "unlocked",
                             "file": with(file(&l_raw), json!({"locking": "off"}))}),
                ),
                (
                    "block-export-add",
                    json!({"type": "nbd", "id": "u", "node-name": "unlocked",
                                            "writable": true}),
                ),
                ("query-block-exports", json!({})),
            ],
        );
    }
}

/// `drive-mirror` to NBD names (every form, bad ones, unreachable servers, a missing
/// export, creation over NBD), `blockdev-mirror`'s errors and `block-job-change` on a
/// missing job: the same errors as qemu-storage-daemon's. The source is a blockdev-add
/// node (the daemon has no drives), so the jobs that start need a job id; each is
/// force-cancelled at once.
#[test]
fn mirror_targets_and_errors_match_qemu() {
    let dir = TempDir::new("diff-mirror");
    images(&dir);
    let qn = dir.join("qn.sock");
    let export = dir.join("export.raw");
    qemu_img_create("raw", &export, "1M");
    let _server = qemu_nbd(&export, "raw", "exp", &qn, false);
    let missing = dir.join("missing.sock").display().to_string();
    let qn = qn.display().to_string();
    let src = (
        ADD,
        json!({"driver": "raw", "node-name": "src", "file": file(&dir.join("base.raw"))}),
    );
    let tgt = (
        ADD,
        json!({"driver": "qcow2", "node-name": "tgt", "file": file(&dir.join("top.qcow2"))}),
    );
    let ro = (
        ADD,
        json!({"driver": "raw", "node-name": "ro", "read-only": true,
               "file": {"driver": "file", "filename": dir.join("base.raw"), "read-only": true}}),
    );
    let mirror = |target: &str, existing: bool, format: Option<&str>| -> Step {
        let mut a = json!({"device": "src", "job-id": "j", "target": target, "sync": "full"});
        if existing {
            a["mode"] = json!("existing");
        }
        if let Some(f) = format {
            a["format"] = json!(f);
        }
        ("drive-mirror", a)
    };
    let cancel: Step = ("block-job-cancel", json!({"device": "j", "force": true}));
    let child = (
        ADD,
        json!({"driver": "file", "node-name": "fchild", "filename": dir.join("mid.qcow2")}),
    );
    let parent = (
        ADD,
        json!({"driver": "raw", "node-name": "over", "file": "fchild"}),
    );
    let mut script: Vec<Step> = vec![src, tgt, ro, child, parent];
    // A source must be a root node.
    script.push((
        "drive-mirror",
        json!({"device": "fchild", "job-id": "j", "target": "nbd:", "sync": "full"}),
    ));
    script.push((
        "blockdev-mirror",
        json!({"device": "fchild", "job-id": "j", "target": "tgt", "sync": "full"}),
    ));
    for (target, existing) in [
        (format!("nbd:unix:{missing}"), true),
        (format!("nbd:unix:{missing}"), false),
        (format!("nbd+unix:///exp?socket={missing}"), true),
        ("nbd+unix:///x".into(), true),
        (format!("nbd+unix:///exp?socket={qn}&foo=1"), true),
        ("nbd://".into(), true),
        ("nbd://127.0.0.1:99999/e".into(), true),
        ("nbd://127.0.0.1:1/e".into(), true),
        ("nbd+tcp://127.0.0.1:1/e".into(), true),
        ("nbd:127.0.0.1:1:exportname=e".into(), true),
        ("nbd:127.0.0.1".into(), true),
        ("nbd:[::1]".into(), true),
        ("nbd:".into(), true),
        (format!("nbd:unix:{qn}:exportname="), true),
        (format!("nbd:unix:{qn}:exportname=nope"), true),
        (format!("nbd:unix:{qn}:exportname=nope"), false),
        ("nbd+foo://x".into(), true),
        ("foo:bar".into(), false),
    ] {
        script.push(mirror(&target, existing, Some("raw")));
    }
    // Mirrors that start: over each form of name, and with the format probed.
    for (target, format) in [
        (format!("nbd+unix:///exp?socket={qn}"), Some("raw")),
        (format!("nbd:unix:{qn}:exportname=exp"), Some("nbd")),
        (format!("nbd+unix:///exp?socket={qn}"), None),
    ] {
        script.push(mirror(&target, true, format));
        script.push(cancel.clone());
    }
    script.push(mirror(
        &format!("nbd+unix:///exp?socket={qn}"),
        false,
        Some("raw"),
    ));
    script.push(cancel.clone());
    let bm = |extra: Value| -> Step {
        (
            "blockdev-mirror",
            with(
                json!({"device": "src", "target": "tgt", "sync": "full"}),
                extra,
            ),
        )
    };
    // While a mirror runs (throttled), its source and its target are the job's.
    let t2 = dir.join("t2.raw");
    qemu_img_create("raw", &t2, "1M");
    script.extend([
        (
            ADD,
            json!({"driver": "raw", "node-name": "t2", "file": file(&t2)}),
        ),
        bm(json!({"target": "t2", "job-id": "bj", "speed": 1})),
        bm(json!({"device": "t2", "target": "tgt", "job-id": "k"})),
        bm(json!({"device": "tgt", "target": "t2", "job-id": "k"})),
        (
            "drive-mirror",
            json!({"device": "t2", "job-id": "k", "target": "nbd:", "sync": "full"}),
        ),
        ("block_resize", json!({"node-name": "t2", "size": 2 << 20})),
        ("blockdev-del", json!({"node-name": "t2"})),
        ("blockdev-del", json!({"node-name": "src"})),
        ("block-job-cancel", json!({"device": "bj", "force": true})),
        ("blockdev-del", json!({"node-name": "t2"})),
    ]);
    script.extend([
        bm(json!({"target": "nope"})),
        bm(json!({"device": "nope"})),
        bm(json!({"target": "src", "job-id": "j"})),
        bm(json!({"target": "ro", "job-id": "j"})),
        bm(json!({"job-id": "j", "granularity": 3})),
        bm(json!({"job-id": "j", "granularity": 3000})),
        bm(json!({"job-id": "j", "sync": "incremental", "buf-size": -1})),
        bm(json!({"job-id": "j", "target": "src", "buf-size": -1})),
        bm(json!({})),
        bm(json!({"job-id": "j", "speed": -1})),
        (
            "block-job-change",
            json!({"id": "nope", "type": "mirror", "copy-mode": "write-blocking"}),
        ),
        ("block-job-change", json!({"id": "nope", "type": "mirror"})),
    ]);
    compare(&dir, &script);
}

#[test]
fn blkdebug_nodes_match_qemu() {
    let dir = TempDir::new("diff-blkdebug");
    images(&dir);
    let a_raw = file(&dir.join("a.raw"));
    let rule = json!([{"event": "read_aio", "errno": 5, "sector": 2048, "once": true}]);
    let script: Vec<Step> = vec![
        (
            ADD,
            json!({"driver": "blkdebug", "node-name": "d1", "image": a_raw,
                   "inject-error": rule,
                   "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}]}),
        ),
        (
            ADD,
            json!({"driver": "raw", "node-name": "r1",
                   "file": {"driver": "blkdebug", "image": "d1"}}),
        ),
        (ADD, json!({"driver": "blkdebug", "node-name": "d2"})),
        (
            ADD,
            json!({"driver": "blkdebug", "node-name": "d2", "image": "nosuch"}),
        ),
        (
            ADD,
            json!({"driver": "blkdebug", "node-name": "d2", "image": a_raw,
                   "inject-error": [{"event": "nope"}]}),
        ),
        (
            ADD,
            json!({"driver": "blkdebug", "node-name": "d2", "image": a_raw,
                   "inject-error": [{"errno": 5}]}),
        ),
        (
            ADD,
            json!({"driver": "blkdebug", "node-name": "d2", "image": a_raw,
                   "set-state": [{"event": "none"}]}),
        ),
        (
            ADD,
            json!({"driver": "blkdebug", "node-name": "d2", "image": a_raw,
                   "inject-error": [{"event": "none", "iotype": "nope"}]}),
        ),
        ("query-named-block-nodes", json!({})),
        (DEL, json!({"node-name": "d1"})),
        (DEL, json!({"node-name": "r1"})),
        (DEL, json!({"node-name": "d1"})),
        ("query-named-block-nodes", json!({"flat": true})),
    ];
    compare(&dir, &script);
}

/// `block-stream` with a `blockdev-add` qcow2 node as `device`: the errors (no job id,
/// a base that is not in the chain), then a stream of top.qcow2 down to `base-node`: the
/// top node's backing becomes the base (in the graph and the header), the streamed node
/// can then be deleted.
#[test]
fn stream_on_blockdev_add_nodes_matches_qemu() {
    let dir = TempDir::new("diff-stream");
    let setup = || {
        for f in ["base.raw", "mid.qcow2", "top.qcow2"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        images(&dir);
        qemu_io(
            "qcow2",
            &dir.join("mid.qcow2").display().to_string(),
            &["write -P 0x22 64k 128k"],
        );
    };
    let script: Vec<Step> = vec![
        (
            ADD,
            json!({"driver": "raw", "node-name": "base", "read-only": true,
                   "file": file(&dir.join("base.raw"))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
                   "file": file(&dir.join("mid.qcow2"))}),
        ),
        (
            ADD,
            json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
                   "file": file(&dir.join("top.qcow2"))}),
        ),
        ("query-named-block-nodes", json!({"flat": true})),
        ("block-stream", json!({"device": "top"})),
        (
            "block-stream",
            json!({"device": "top", "job-id": "s", "base-node": "top"}),
        ),
        (
            "block-stream",
            json!({"device": "top", "job-id": "s", "base-node": "base"}),
        ),
        ("query-named-block-nodes", json!({"flat": true})),
        (DEL, json!({"node-name": "mid"})),
        (DEL, json!({"node-name": "top"})),
        (DEL, json!({"node-name": "base"})),
    ];
    compare_from(&dir, setup, &script);
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(dir.join("top.qcow2"))
        .output()
        .expect("qemu-img info");
    let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info json");
    assert_eq!(
        info["backing-filename"],
        json!(dir.join("base.raw")),
        "the header names the base"
    );
    // Not yet (QEMU streams into it): a node that another node reads through.
    setup();
    {
        let image_dir = dir.path().display().to_string();
        let vm = Splitvmm::start(&["--image-dir", &image_dir]);
        let mut qmp = vm.raw_qmp();
        for (cmd, args) in &script[..3] {
            assert_eq!(qmp.exec(cmd, args.clone())["return"], json!({}), "{cmd}");
        }
        let (class, desc) = qmp.err("block-stream", json!({"device": "mid", "job-id": "s"}));
        assert_eq!(class, "GenericError");
        assert_eq!(
            desc,
            "block-stream: streaming into node 'mid', which another node uses, is not supported"
        );
    }
}
