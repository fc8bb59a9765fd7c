//! QEMU's request-object errors (QMP reference §1.4), argument errors, malformed input and
//! input limits, on a raw socket; and the server keeps serving everyone afterwards.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{RawQmp, Splitvmm};

fn error_of(reply: &Value) -> (&str, &str) {
    let e = &reply["error"];
    (
        e["class"].as_str().unwrap_or("<none>"),
        e["desc"].as_str().unwrap_or("<none>"),
    )
}

#[test]
fn negotiation_mode_refuses_commands_and_needs_qmp_capabilities_once() {
    let vm = Splitvmm::start(&[]);
    let mut c = RawQmp::connect(&vm.qmp);
    let r = c.cmd(r#"{"execute": "query-version", "id": 1}"#);
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(r["id"], 1);
    let r = c.cmd(r#"{"execute": "no-such", "id": 2}"#);
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 3}"#);
    assert_eq!(
        error_of(&r),
        ("GenericError", "Capability oob not available")
    );
    let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 4}"#);
    assert_eq!(
        error_of(&r),
        (
            "GenericError",
            "Invalid parameter type for 'enable', expected: array"
        )
    );
    let r = c.cmd(r#"{"execute": "qmp_capabilities", "id": 5}"#);
    assert_eq!(r, json!({"return": {}, "id": 5}));
    let r = c.cmd(r#"{"execute": "qmp_capabilities", "id": 6}"#);
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
}

#[test]
fn request_object_and_argument_errors_have_qemus_class_and_text() {
    let vm = Splitvmm::start(&[]);
    let mut c = vm.raw_qmp();
    let cases: &[(&str, Option<Value>, &str, &str)] = &[
        (
            r#"{"execute": "query-version", "id": "a", "arguments": []}"#,
            Some(json!("a")),
            "GenericError",
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute": 42, "id": 7}"#,
            Some(json!(7)),
            "GenericError",
            "QMP input member 'execute' must be a string",
        ),
        (
            r#"{"id": [1, {"x": null}]}"#,
            Some(json!([1, {"x": null}])),
            "GenericError",
            "QMP input lacks member 'execute'",
        ),
        (
            r#"{"execute": "query-version", "foo": 1, "id": 8}"#,
            Some(json!(8)),
            "GenericError",
            "QMP input member 'foo' is unexpected",
        ),
        (
            r#"{"exec-oob": "query-version", "id": 9}"#,
            Some(json!(9)),
            "GenericError",
            "QMP input member 'exec-oob' is unexpected",
        ),
        (
            r#"{"execute": "no-such-command", "id": 10}"#,
            Some(json!(10)),
            "CommandNotFound",
            "The command no-such-command has not been found",
        ),
        (
            r#"{"execute": "query-status", "arguments": {"x": 1}, "id": 11}"#,
            Some(json!(11)),
            "GenericError",
            "Parameter 'x' is unexpected",
        ),
        (
            r#"[1, 2]"#,
            None,
            "GenericError",
            "QMP input must be a JSON object",
        ),
        (
            r#""just a string""#,
            None,
            "GenericError",
            "QMP input must be a JSON object",
        ),
        (
            r#"{"execute": }"#,
            None,
            "GenericError",
            "JSON parse error, expecting value",
        ),
        ("@", None, "GenericError", "JSON parse error, stray '@'"),
        (
            r#"{"execute": tru}"#,
            None,
            "GenericError",
            "JSON parse error, invalid keyword 'tru'",
        ),
    ];
    for (input, id, class, desc) in cases {
        let r = c.cmd(input);
        assert_eq!(error_of(&r), (*class, *desc), "input {input}: {r}");
        assert_eq!(r.get("id"), id.as_ref(), "id echo for {input}: {r}");
    }
    // Single quotes are QMP's extension, and messages need no separator.
    c.send(b"{'execute': 'query-name', 'id': 'sq'}{\"execute\": \"query-name\", \"id\": 12}");
    assert_eq!(c.reply(), json!({"return": {}, "id": "sq"}));
    assert_eq!(c.reply(), json!({"return": {}, "id": 12}));
}

#[test]
fn output_is_one_crlf_line_per_message_and_ascii() {
    let vm = Splitvmm::start(&[]);
    let mut c = vm.raw_qmp();
    c.send("{\"execute\": \"query-version\", \"id\": \"é😀\"}".as_bytes());
    let line = c.read_raw_line();
    assert!(
        line.ends_with("}\r\n") && !line[..line.len() - 2].contains('\n'),
        "{line:?}"
    );
    assert!(line.is_ascii(), "{line:?}");
    assert!(line.contains(r#""id": "\u00E9\uD83D\uDE00""#), "{line:?}");
}

#[test]
fn huge_and_deep_inputs_get_an_answer_and_the_server_keeps_serving() {
    let vm = Splitvmm::start(&[]);
    let mut bystander = vm.raw_qmp();
    let mut c = vm.raw_qmp();
    // 10 MB in one message: answered (a result here), never a crash.
    let big = format!(
        r#"{{"execute": "query-name", "id": "{}"}}"#,
        "a".repeat(10 << 20)
    );
    let r = c.cmd(&big);
    assert_eq!(r["return"], json!({}));
    assert_eq!(r["id"].as_str().map(str::len), Some(10 << 20));
    // Nesting far past the limit: one error, then the stream resynchronises.
    let deep = format!(
        r#"{{"execute": "query-name", "id": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let r = c.cmd(&deep);
    assert_eq!(
        error_of(&r),
        ("GenericError", "JSON nesting depth limit exceeded")
    );
    let r = c.cmd(r#"{"execute": "query-name", "id": "after"}"#);
    assert_eq!(r, json!({"return": {}, "id": "after"}));
    // Over the size limit (64 MiB): refused without buffering it all, then recovers.
    let mut huge = Vec::from(&br#"{"execute": "query-name", "id": ""#[..]);
    huge.resize(huge.len() + (65 << 20), b'x');
    huge.extend_from_slice(br#""}"#);
    c.send(&huge);
    let r = c.reply();
    assert_eq!(error_of(&r).0, "GenericError", "{r}");
    assert!(error_of(&r).1.contains("limit exceeded"), "{r}");
    let r = c.cmd(r#"{"execute": "query-name", "id": "after-huge"}"#);
    assert_eq!(r, json!({"return": {}, "id": "after-huge"}));
    // The other client never noticed.
    let r = bystander.cmd(r#"{"execute": "query-version", "id": 1}"#);
    assert_eq!(r["id"], 1);
    assert!(r["return"]["qemu"].is_object());
}

#[test]
fn many_clients_at_once_and_events_reach_every_negotiated_one() {
    let vm = Splitvmm::start(&[]);
    let mut clients: Vec<RawQmp> = (0..8).map(|_| vm.raw_qmp()).collect();
    let mut unnegotiated = RawQmp::connect(&vm.qmp);
    let mut control = vm.raw_qmp();
    let r = control.cmd(r#"{"execute": "stop", "id": 1}"#);
    assert_eq!(r, json!({"return": {}, "id": 1}));
    for (i, c) in clients.iter_mut().enumerate() {
        let ev = c.read();
        assert_eq!(ev["event"], "STOP", "client {i}: {ev}");
        assert!(
            ev["timestamp"]["seconds"]
                .as_i64()
                .is_some_and(|s| s > 1_600_000_000),
            "{ev}"
        );
        assert!(
            ev["timestamp"]["microseconds"]
                .as_i64()
                .is_some_and(|u| (0..1_000_000).contains(&u)),
            "{ev}"
        );
    }
    // A client still negotiating gets no event: its next line is the reply it asked for.
    let r = unnegotiated.cmd(r#"{"execute": "qmp_capabilities", "id": "n"}"#);
    assert_eq!(r, json!({"return": {}, "id": "n"}));
    unnegotiated.send(br#"{"execute": "query-name", "id": "q"}"#);
    let r = unnegotiated.read();
    assert_eq!(
        r,
        json!({"return": {}, "id": "q"}),
        "no event may precede this reply"
    );
}

#[test]
fn tcp_listener_serves_qmp_too() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let qmp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let mut vm = Splitvmm::start(&["--qmp", &qmp]);
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect tcp");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rd = std::io::BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut rd, &mut line).expect("greeting");
    assert!(
        line.starts_with(r#"{"QMP": {"version": {"qemu": {"#),
        "{line}"
    );
    std::io::Write::write_all(
        &mut w,
        br#"{"execute":"qmp_capabilities"}{"execute":"quit","id":1}"#,
    )
    .expect("send");
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut rd, &mut l).expect("read") == 0 {
            break;
        }
        lines.push(serde_json::from_str::<Value>(&l).expect("json"));
    }
    assert!(lines.contains(&json!({"return": {}, "id": 1})), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "SHUTDOWN" && l["data"]["reason"] == "host-qmp-quit"),
        "{lines:?}"
    );
    assert!(vm.wait_exit(Duration::from_secs(15)).success());
}
