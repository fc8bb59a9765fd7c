//! Management: adding and removing exports (QEMU's `safe` / `hard` modes and errors),
//! the deleted-export announcements, `max_connections`, `stop`, and the export list.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::nbd::client::NbdClient;
use crate::nbd::server::{ExportInfo, NbdError, RemoveMode};

fn info(name: &str, connections: usize, shutting_down: bool) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: None,
        writable: true,
        connections,
        shutting_down,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_export_errors() {
    let (e, _) = export("a", MemDevice::new(MIB), true);
    let t = TestServer::start(NbdServerConfig::default(), vec![e]).await;
    let s = &t.server;
    let (dup, _) = export("a", MemDevice::new(MIB), false);
    let err = s.add_export(dup).unwrap_err();
    assert_eq!(err, NbdError::DuplicateExport("a".into()));
    assert_eq!(err.to_string(), "NBD server already has export named 'a'");
    let (ro, _) = export("b", MemDevice::new(MIB).read_only(), true);
    assert_eq!(
        s.add_export(ro).unwrap_err().to_string(),
        "Cannot export read-only node as writable"
    );
    let long = "x".repeat(4097);
    let (e, _) = export(&long, MemDevice::new(MIB), false);
    assert_eq!(
        s.add_export(e).unwrap_err(),
        NbdError::NameTooLong(long.clone())
    );
    let (mut e, _) = export("c", MemDevice::new(MIB), false);
    e.description = Some(long);
    assert!(matches!(
        s.add_export(e),
        Err(NbdError::DescriptionTooLong(_))
    ));
    let err = s.remove_export("zz", RemoveMode::Safe).unwrap_err();
    assert_eq!(err.to_string(), "Export 'zz' is not found");
    assert_eq!(s.exports(), [info("a", 0, false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_safe_refuses_while_in_use_and_hard_disconnects() {
    let (a, _) = export("a", MemDevice::new(MIB), true);
    let (b, _) = export("b", MemDevice::new(MIB), true);
    let mut t = TestServer::start(NbdServerConfig::default(), vec![a, b]).await;

    // Without clients, a safe removal is immediate and announced before it returns.
    t.server.remove_export("b", RemoveMode::Safe).unwrap();
    assert_eq!(t.deleted.try_recv().unwrap(), "b");
    assert_eq!(t.server.exports(), [info("a", 0, false)]);

    let client = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    let other = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    assert_eq!(t.server.exports(), [info("a", 2, false)]);
    // A client only negotiating does not count as using the export.
    let _negotiating = Raw::hello(&t.sock).await;

    let err = t.server.remove_export("a", RemoveMode::Safe).unwrap_err();
    assert_eq!(err.to_string(), "export 'a' still in use");
    assert_eq!(
        err.hint(),
        Some("Use mode='hard' to force client disconnect\n")
    );
    let mut buf = vec![0u8; 4096];
    client.read(&mut buf, 0).await.unwrap();

    t.server.remove_export("a", RemoveMode::Hard).unwrap();
    let gone = within(5, t.deleted.recv()).await.unwrap();
    assert_eq!(gone, "a");
    assert!(t.server.exports().is_empty());
    for c in [&client, &other] {
        let e = within(5, c.read(&mut buf, 0)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
    assert_eq!(
        t.server.remove_export("a", RemoveMode::Hard).unwrap_err(),
        NbdError::NotFound("a".into())
    );
    // The name is free again.
    let (a2, _) = export("a", MemDevice::new(2 * MIB), false);
    t.server.add_export(a2).unwrap();
    let c = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    assert_eq!(c.info().size, 2 * MIB);
    assert!(t.deleted.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_removal_completes_when_running_requests_have() {
    let mut dev = MemDevice::new(MIB);
    dev.slow_read = Some((0, Duration::from_millis(600)));
    dev.fill(0, &[1u8; 4096]); // data, so that the read reaches the device
    let (e, dev) = export("a", dev, true);
    let mut t = TestServer::start(NbdServerConfig::default(), vec![e]).await;
    let client = Arc::new(
        NbdClient::connect(t.unix_stream().await, "a")
            .await
            .unwrap(),
    );
    let c = client.clone();
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        c.read(&mut buf, 0).await
    });
    within(5, async {
        while dev.reads_started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    t.server.remove_export("a", RemoveMode::Hard).unwrap();
    // Shutting down: listed as such, not available to new clients, not removable twice.
    assert_eq!(t.server.exports(), [info("a", 1, true)]);
    assert_eq!(
        t.server
            .remove_export("a", RemoveMode::Hard)
            .unwrap_err()
            .to_string(),
        "Export 'a' is already shutting down"
    );
    let mut r = Raw::hello(&t.sock).await;
    r.expect_reply(OPT_GO, &info_request("a", &[]), REP_ERR_UNKNOWN)
        .await;
    r.option(OPT_LIST, &[]).await;
    assert_eq!(
        r.option_reply().await.1,
        REP_ACK,
        "a shutting-down export is listed"
    );
    let (dup, _) = export("a", MemDevice::new(MIB), false);
    assert!(matches!(
        t.server.add_export(dup),
        Err(NbdError::DuplicateExport(_))
    ));

    // Gone only once the device read has finished.
    assert_eq!(within(5, t.deleted.recv()).await.unwrap(), "a");
    assert_eq!(dev.reads_done.load(Ordering::SeqCst), 1);
    assert!(t0.elapsed() >= Duration::from_millis(550));
    assert!(t.server.exports().is_empty());
    // The client got no reply: the connection was closed under it.
    assert!(within(5, reader).await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_the_extra_ones_at_once() {
    let (e, _) = export("a", MemDevice::new(MIB), false);
    let config = NbdServerConfig {
        max_connections: 1,
        ..Default::default()
    };
    let t = TestServer::start(config, vec![e]).await;
    let first = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    assert_eq!(first.info().flags & TFLAG_CAN_MULTI_CONN, 0);

    let mut extra = t.unix_stream().await;
    let mut b = [0u8; 18];
    let n = within(2, extra.read(&mut b)).await.unwrap_or(0);
    assert_eq!(n, 0, "the connection over the limit was not closed");
    assert!(
        NbdClient::connect(t.unix_stream().await, "a")
            .await
            .is_err()
    );

    first.disconnect().await.unwrap();
    drop(first);
    t.wait_no_connections().await;
    let again = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    again.read(&mut buf, 0).await.unwrap();

    // Without a limit of 1, multi-conn is advertised.
    let (e, _) = export("b", MemDevice::new(MIB), false);
    let t2 = TestServer::start(NbdServerConfig::default(), vec![e]).await;
    let c = NbdClient::connect(t2.unix_stream().await, "b")
        .await
        .unwrap();
    assert_ne!(c.info().flags & TFLAG_CAN_MULTI_CONN, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_disconnects_everyone_and_removes_every_export() {
    let (a, _) = export("a", MemDevice::new(MIB), true);
    let (b, _) = export("b", MemDevice::new(MIB), true);
    let mut t = TestServer::start(NbdServerConfig::default(), vec![a, b]).await;
    let client = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    let mut negotiating = Raw::hello(&t.sock).await;

    within(5, t.server.stop()).await;
    assert_eq!(t.server.connection_count(), 0);
    assert!(t.server.is_stopped());
    let mut gone = vec![
        within(5, t.deleted.recv()).await.unwrap(),
        within(5, t.deleted.recv()).await.unwrap(),
    ];
    gone.sort();
    assert_eq!(gone, ["a", "b"]);
    assert!(t.server.exports().is_empty());
    for h in t.serving.drain(..) {
        within(5, h).await.unwrap().unwrap();
    }
    let mut buf = [0u8; 512];
    assert!(client.read(&mut buf, 0).await.is_err());
    assert!(negotiating.closed_within(2).await);
    assert!(
        tokio::net::UnixStream::connect(&t.sock).await.is_err(),
        "still listening"
    );
    let (c, _) = export("c", MemDevice::new(MIB), true);
    assert_eq!(t.server.add_export(c).unwrap_err(), NbdError::NotRunning);
    // Serving again after a stop returns at once.
    let l = std::os::unix::net::UnixListener::bind(t.dir.join("again.sock")).unwrap();
    within(2, t.server.serve(NbdListener::Unix(l)))
        .await
        .unwrap();
}
