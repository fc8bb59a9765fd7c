//! The protocol through raw sockets: every option and command, the errors the
//! specification asks for, and hostile clients (after each of which another client must
//! still be served).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::nbd::server::{META_ID_BASE_ALLOCATION, transmission_flags};

fn described(
    name: &str,
    dev: MemDevice,
    writable: bool,
    desc: &str,
) -> (Export<MemDevice>, Arc<MemDevice>) {
    let (mut e, d) = export(name, dev, writable);
    e.description = Some(desc.to_owned());
    (e, d)
}

/// "ro": 1 MiB read-only, data in the first 64 KiB; "rw": 1 MiB writable, empty.
async fn two_exports(config: NbdServerConfig) -> (TestServer, Arc<MemDevice>, Arc<MemDevice>) {
    let ro = MemDevice::new(MIB).read_only();
    ro.fill(0, &pattern(64 * KIB as usize, 1));
    let (e1, ro) = described("ro", ro, false, "read-only test export");
    let (e2, rw) = export("rw", MemDevice::new(MIB), true);
    (TestServer::start(config, vec![e1, e2]).await, ro, rw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_options_replies_and_errors() {
    let (t, _ro, _rw) = two_exports(NbdServerConfig::default()).await;
    let mut r = Raw::hello(&t.sock).await;

    // No TLS: POLICY. Unknown options and extended headers: UNSUP, and parsing goes on.
    r.expect_reply(OPT_STARTTLS, &[], REP_ERR_POLICY).await;
    r.expect_reply(OPT_STARTTLS, b"x", REP_ERR_INVALID).await;
    r.expect_reply(OPT_EXTENDED_HEADERS, &[], REP_ERR_UNSUP)
        .await;
    r.expect_reply(99, b"some data to skip", REP_ERR_UNSUP)
        .await;
    r.expect_reply(OPT_PEEK_EXPORT, &[], REP_ERR_UNSUP).await;

    // LIST: one SERVER per export (name, then description), then ACK.
    r.expect_reply(OPT_LIST, b"junk", REP_ERR_INVALID).await;
    r.option(OPT_LIST, &[]).await;
    let mut listed = Vec::new();
    loop {
        let (o, t, d) = r.option_reply().await;
        assert_eq!(o, OPT_LIST);
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_SERVER);
        let mut rd = Reader::new(&d);
        let name = String::from_utf8(rd.string32().unwrap().to_vec()).unwrap();
        let desc = String::from_utf8(rd.bytes(rd.remaining()).unwrap().to_vec()).unwrap();
        listed.push((name, desc));
    }
    assert_eq!(
        listed,
        [
            ("ro".to_owned(), "read-only test export".to_owned()),
            ("rw".to_owned(), String::new())
        ]
    );

    // INFO: unknown export, malformed request, then every item.
    let d = r
        .expect_reply(OPT_INFO, &info_request("nope", &[]), REP_ERR_UNKNOWN)
        .await;
    assert_eq!(String::from_utf8_lossy(&d), "export 'nope' not present");
    let mut bad = info_request("ro", &[INFO_NAME]);
    bad.pop();
    r.expect_reply(OPT_INFO, &bad, REP_ERR_INVALID).await;
    let mut bad = info_request("ro", &[]);
    bad[3] = 200; // name length beyond the data
    r.expect_reply(OPT_INFO, &bad, REP_ERR_INVALID).await;
    r.option(
        OPT_INFO,
        &info_request("ro", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 1234]),
    )
    .await;
    let mut seen = HashSet::new();
    loop {
        let (o, t, d) = r.option_reply().await;
        assert_eq!(o, OPT_INFO);
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_INFO);
        let mut rd = Reader::new(&d);
        let item = rd.u16().unwrap();
        seen.insert(item);
        match item {
            INFO_EXPORT => {
                assert_eq!(d.len(), 12);
                assert_eq!(rd.u64(), Some(MIB));
                assert_eq!(rd.u16(), Some(transmission_flags(false, false, true)));
            }
            INFO_NAME => assert_eq!(rd.bytes(rd.remaining()), Some(&b"ro"[..])),
            INFO_DESCRIPTION => assert_eq!(
                rd.bytes(rd.remaining()),
                Some(&b"read-only test export"[..])
            ),
            INFO_BLOCK_SIZE => {
                assert_eq!(d.len(), 14);
                assert_eq!(
                    (rd.u32(), rd.u32(), rd.u32()),
                    (Some(1), Some(4096), Some(32 << 20))
                );
            }
            other => panic!("unexpected info {other}"),
        }
    }
    assert_eq!(
        seen,
        HashSet::from([INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
    );

    // Meta contexts need structured replies first.
    r.expect_reply(
        OPT_LIST_META_CONTEXT,
        &meta_request("ro", &[]),
        REP_ERR_INVALID,
    )
    .await;
    r.expect_reply(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID)
        .await;
    r.expect_reply(OPT_STRUCTURED_REPLY, &[], REP_ACK).await;
    r.expect_reply(OPT_STRUCTURED_REPLY, &[], REP_ERR_INVALID)
        .await;

    // LIST with no query and with the namespace wildcard lists base:allocation.
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation", "qemu:foo"][..],
    ] {
        let d = r
            .expect_reply(
                OPT_LIST_META_CONTEXT,
                &meta_request("ro", queries),
                REP_META_CONTEXT,
            )
            .await;
        assert_eq!(&d[4..], BASE_ALLOCATION.as_bytes(), "{queries:?}");
        assert_eq!(r.option_reply().await.1, REP_ACK);
    }
    // Unknown leaf names and namespaces select nothing; SET with `base:` or no query selects
    // nothing either.
    r.expect_reply(
        OPT_LIST_META_CONTEXT,
        &meta_request("ro", &["base:nothing", "x-foo:bar", "nocolon"]),
        REP_ACK,
    )
    .await;
    r.expect_reply(
        OPT_SET_META_CONTEXT,
        &meta_request("ro", &["base:"]),
        REP_ACK,
    )
    .await;
    r.expect_reply(OPT_SET_META_CONTEXT, &meta_request("ro", &[]), REP_ACK)
        .await;
    r.expect_reply(
        OPT_SET_META_CONTEXT,
        &meta_request("nope", &[BASE_ALLOCATION]),
        REP_ERR_UNKNOWN,
    )
    .await;
    let mut bad = meta_request("ro", &[BASE_ALLOCATION]);
    bad.pop();
    r.expect_reply(OPT_SET_META_CONTEXT, &bad, REP_ERR_INVALID)
        .await;
    let mut bad = meta_request("ro", &[]);
    bad[6] = 0x40; // a billion queries in no data
    r.expect_reply(OPT_LIST_META_CONTEXT, &bad, REP_ERR_INVALID)
        .await;
    let d = r
        .expect_reply(
            OPT_SET_META_CONTEXT,
            &meta_request("rw", &["x-foo:bar", BASE_ALLOCATION, "base:"]),
            REP_META_CONTEXT,
        )
        .await;
    assert_eq!(
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
        META_ID_BASE_ALLOCATION
    );
    assert_eq!(r.option_reply().await.1, REP_ACK);

    // An option over the limit is drained and refused; the stream stays in sync.
    r.expect_reply(0x1234, &vec![7u8; 100 * 1024], REP_ERR_TOO_BIG)
        .await;

    // GO with the meta context of the same export: BLOCK_STATUS works.
    r.option(OPT_GO, &info_request("rw", &[])).await;
    loop {
        let (_, t, d) = r.option_reply().await;
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_INFO);
        if d[..2] == INFO_EXPORT.to_be_bytes() {
            let flags = u16::from_be_bytes([d[10], d[11]]);
            assert_eq!(flags, transmission_flags(true, true, true));
            assert_ne!(flags & TFLAG_SEND_DF, 0);
            assert_eq!(flags & TFLAG_READ_ONLY, 0);
        }
    }
    r.request(0, CMD_BLOCK_STATUS, 1, 0, MIB as u32).await;
    let c = r.chunk().await;
    assert_eq!(
        (c.typ, c.cookie, c.flags),
        (REPLY_TYPE_BLOCK_STATUS, 1, REPLY_FLAG_DONE)
    );
    assert_eq!(c.payload.len(), 12);
    let mut rd = Reader::new(&c.payload);
    assert_eq!(rd.u32(), Some(META_ID_BASE_ALLOCATION));
    assert_eq!(rd.u32(), Some(MIB as u32));
    assert_eq!(rd.u32(), Some(STATE_HOLE | STATE_ZERO));
    r.request(0, CMD_DISC, 2, 0, 0).await;
    assert!(r.closed_within(5).await);

    // The meta context of another export does not carry over to GO.
    let mut r = Raw::hello(&t.sock).await;
    r.expect_reply(OPT_STRUCTURED_REPLY, &[], REP_ACK).await;
    r.expect_reply(
        OPT_SET_META_CONTEXT,
        &meta_request("ro", &[BASE_ALLOCATION]),
        REP_META_CONTEXT,
    )
    .await;
    assert_eq!(r.option_reply().await.1, REP_ACK);
    r.option(OPT_GO, &info_request("rw", &[])).await;
    while r.option_reply().await.1 != REP_ACK {}
    r.request(0, CMD_BLOCK_STATUS, 3, 0, 4096).await;
    let c = r.chunk().await;
    assert_eq!(c.typ, REPLY_TYPE_ERROR);
    assert_eq!(&c.payload[..4], &EINVAL.to_be_bytes());

    // ABORT is acknowledged, then the server closes.
    let mut r = Raw::hello(&t.sock).await;
    r.expect_reply(OPT_ABORT, &[], REP_ACK).await;
    assert!(r.closed_within(5).await);

    // EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES.
    let mut r = Raw::connect(&t.sock).await;
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    r.option(OPT_EXPORT_NAME, b"ro").await;
    let d = r.read_exact(8 + 2 + 124).await;
    assert_eq!(&d[..8], &MIB.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([d[8], d[9]]),
        transmission_flags(false, false, true)
    );
    assert!(d[10..].iter().all(|&b| b == 0));
    r.request(0, CMD_READ, 5, 0, 16).await;
    assert_eq!(r.simple_reply().await, (0, 5));
    assert_eq!(r.read_exact(16).await, pattern(16, 1));

    still_serves(&t.sock, "ro").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_are_dropped_and_others_still_served() {
    let config = NbdServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (t, _ro, _rw) = two_exports(config).await;

    // Unknown client flags.
    let mut r = Raw::connect(&t.sock).await;
    r.send(&0x8000_0001u32.to_be_bytes()).await;
    assert!(r.closed_within(2).await);
    still_serves(&t.sock, "ro").await;

    // Bad option magic.
    let mut r = Raw::hello(&t.sock).await;
    r.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0").await;
    assert!(r.closed_within(2).await);
    still_serves(&t.sock, "ro").await;

    // An absurd option length: dropped at once (not at the handshake timeout, 10 s on this
    // other server), nothing allocated or drained.
    let (t10, _, _) = two_exports(NbdServerConfig::default()).await;
    let mut r = Raw::hello(&t10.sock).await;
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    r.send(&h).await;
    assert!(r.closed_within(5).await);
    still_serves(&t10.sock, "ro").await;

    // EXPORT_NAME of an unknown export cannot be answered: dropped.
    let mut r = Raw::hello(&t.sock).await;
    r.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(r.closed_within(2).await);

    // A non-fixed newstyle client may only send EXPORT_NAME.
    let mut r = Raw::connect(&t.sock).await;
    r.send(&0u32.to_be_bytes()).await;
    r.option(OPT_LIST, &[]).await;
    assert!(r.closed_within(2).await);
    // ... and that works.
    let mut r = Raw::connect(&t.sock).await;
    r.send(&0u32.to_be_bytes()).await;
    r.option(OPT_EXPORT_NAME, b"rw").await;
    let d = r.read_exact(134).await;
    assert_eq!(&d[..8], &MIB.to_be_bytes());
    r.request(0, CMD_DISC, 0, 0, 0).await;
    assert!(r.closed_within(2).await);

    // A client that never finishes negotiating is dropped after the timeout.
    let mut idle = Raw::connect(&t.sock).await;
    let t0 = Instant::now();
    assert!(idle.closed_within(3).await);
    assert!(t0.elapsed() >= Duration::from_millis(250));
    let mut slow = Raw::hello(&t.sock).await;
    slow.send(&IHAVEOPT.to_be_bytes()).await; // half an option header
    assert!(slow.closed_within(3).await);

    // Garbage instead of a client.
    let mut r = Raw::connect(&t.sock).await;
    r.send(&[0xffu8; 4096]).await;
    assert!(r.closed_within(2).await);

    still_serves(&t.sock, "rw").await;
    t.wait_no_connections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_errors_keep_the_connection() {
    let (t, ro, rw) = two_exports(NbdServerConfig::default()).await;

    // Simple replies, read-only export.
    let (mut r, size, flags) = Raw::go(&t.sock, "ro", false, false).await;
    assert_eq!(size, MIB);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_DF),
        0
    );
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        // (flags, command, offset, length, expected error)
        (0, CMD_READ, 0, 64 << 20, EINVAL), // over the maximum block size
        (0, CMD_READ, MIB - 512, 1024, EINVAL), // past the end
        (0, CMD_READ, u64::MAX - 10, 100, EINVAL), // offset + length overflows
        (0, CMD_TRIM, 0, 4096, EPERM),
        (0, CMD_WRITE_ZEROES, 0, 4096, EPERM),
        (0, 42, 0, 0, EINVAL),                         // unknown command
        (CMD_FLAG_REQ_ONE, CMD_READ, 0, 4096, EINVAL), // flag of another command
        (CMD_FLAG_DF, CMD_READ, 0, 4096, EINVAL),      // DF without structured replies
        (1 << 9, CMD_FLUSH, 0, 0, EINVAL),             // unknown flag
        (0, CMD_BLOCK_STATUS, 0, 4096, EINVAL),        // no meta context
        (0, CMD_CACHE, MIB, 1, EINVAL),                // past the end
        (0, CMD_CACHE, 0, 4096, 0),
        (CMD_FLAG_FUA, CMD_FLUSH, 0, 0, 0),
    ];
    for (i, &(fl, cmd, off, len, want)) in cases.iter().enumerate() {
        r.request(fl, cmd, i as u64, off, len).await;
        assert_eq!(
            r.simple_reply().await,
            (want, i as u64),
            "case {i}: {} flags {fl:#x} offset {off} length {len}",
            command_name(cmd)
        );
    }
    // A write on a read-only export: EPERM, its payload consumed.
    r.request(0, CMD_WRITE, 100, 0, 8192).await;
    r.send(&[0x55u8; 8192]).await;
    assert_eq!(r.simple_reply().await, (EPERM, 100));
    r.request(0, CMD_READ, 101, 0, 32).await;
    assert_eq!(r.simple_reply().await, (0, 101));
    assert_eq!(r.read_exact(32).await, pattern(32, 1));
    assert_eq!(
        ro.contents()[..64 * KIB as usize],
        pattern(64 * KIB as usize, 1)
    );

    // Writable export.
    let (mut r, _, flags) = Raw::go(&t.sock, "rw", false, false).await;
    assert_eq!(flags, transmission_flags(true, false, true));
    // Past the end: ENOSPC for writes (payload consumed), EINVAL for TRIM.
    r.request(0, CMD_WRITE, 1, MIB - 4096, 8192).await;
    r.send(&[1u8; 8192]).await;
    assert_eq!(r.simple_reply().await, (ENOSPC, 1));
    r.request(0, CMD_WRITE_ZEROES, 2, MIB, 1).await;
    assert_eq!(r.simple_reply().await, (ENOSPC, 2));
    r.request(0, CMD_TRIM, 3, MIB, 4096).await;
    assert_eq!(r.simple_reply().await, (EINVAL, 3));
    // WRITE + FUA reaches the device as FUA; FLUSH flushes.
    let data = pattern(8192, 9);
    r.request(CMD_FLAG_FUA, CMD_WRITE, 4, 4096, 8192).await;
    r.send(&data).await;
    assert_eq!(r.simple_reply().await, (0, 4));
    assert_eq!(rw.fua_writes.load(Ordering::SeqCst), 1);
    r.request(0, CMD_FLUSH, 5, 0, 0).await;
    assert_eq!(r.simple_reply().await, (0, 5));
    assert_eq!(rw.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(&rw.contents()[4096..12288], &data[..]);
    // FAST_ZERO fails at once with ENOTSUP and changes nothing.
    r.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 6, 4096, 8192)
        .await;
    assert_eq!(r.simple_reply().await, (ENOTSUP, 6));
    assert_eq!(&rw.contents()[4096..12288], &data[..]);
    // WRITE_ZEROES may unmap; with NO_HOLE it keeps blocks allocated; +FUA flushes.
    r.request(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 7, 4096, 4096)
        .await;
    assert_eq!(r.simple_reply().await, (0, 7));
    assert_eq!(rw.allocated_blocks(), [2]);
    assert_eq!(rw.flushes.load(Ordering::SeqCst), 2);
    r.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 8, 8192, 4096)
        .await;
    assert_eq!(r.simple_reply().await, (0, 8));
    assert_eq!(rw.allocated_blocks(), [2]);
    assert!(rw.contents()[..16384].iter().all(|&b| b == 0));
    // TRIM frees.
    r.request(0, CMD_TRIM, 9, 8192, 4096).await;
    assert_eq!(r.simple_reply().await, (0, 9));
    assert!(rw.allocated_blocks().is_empty());
    // Zero-length requests succeed without touching anything.
    for (i, cmd) in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES]
        .into_iter()
        .enumerate()
    {
        r.request(0, cmd, 20 + i as u64, 0, 0).await;
        assert_eq!(r.simple_reply().await, (0, 20 + i as u64));
    }
    r.request(0, CMD_DISC, 30, 0, 0).await;
    assert!(r.closed_within(5).await);

    still_serves(&t.sock, "rw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_are_sparse_and_block_status_describes_the_map() {
    let mut dev = MemDevice::new(4 * MIB);
    dev.failing_read = Some(3 * MIB + 100);
    dev.fill(0, &pattern(64 * KIB as usize, 3));
    dev.fill(MIB, &pattern(4 * KIB as usize, 4));
    dev.fill(3 * MIB, &pattern(4 * KIB as usize, 5));
    let (e, dev) = export("s", dev, true);
    let t = TestServer::start(NbdServerConfig::default(), vec![e]).await;
    let (mut r, size, flags) = Raw::go(&t.sock, "s", true, true).await;
    assert_eq!(size, 4 * MIB);
    assert_ne!(flags & TFLAG_SEND_DF, 0);

    // A sparse read: data and hole chunks, reassembling to the contents.
    let len = 2 * MIB as usize;
    r.request(0, CMD_READ, 1, 0, len as u32).await;
    let mut got = vec![0xeeu8; len];
    let mut kinds = Vec::new();
    loop {
        let c = r.chunk().await;
        assert_eq!(c.cookie, 1);
        let mut rd = Reader::new(&c.payload);
        let off = rd.u64().unwrap() as usize;
        match c.typ {
            REPLY_TYPE_OFFSET_DATA => {
                let d = rd.bytes(rd.remaining()).unwrap();
                got[off..off + d.len()].copy_from_slice(d);
                kinds.push(('d', off, d.len()));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let n = rd.u32().unwrap() as usize;
                got[off..off + n].fill(0);
                kinds.push(('h', off, n));
            }
            other => panic!("chunk type {other}"),
        }
        if c.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(got, dev.contents()[..len]);
    let (k, m) = (KIB as usize, MIB as usize);
    assert_eq!(
        kinds,
        [
            ('d', 0, 64 * k),
            ('h', 64 * k, m - 64 * k),
            ('d', m, 4 * k),
            ('h', m + 4 * k, m - 4 * k)
        ]
    );

    // DF: a single data chunk, zeroes included.
    r.request(CMD_FLAG_DF, CMD_READ, 2, 60 * KIB, 8192).await;
    let c = r.chunk().await;
    assert_eq!(
        (c.typ, c.flags, c.cookie),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 2)
    );
    assert_eq!(&c.payload[..8], &(60 * KIB).to_be_bytes());
    assert_eq!(c.payload[8..], dev.contents()[60 * k..68 * k]);

    // Errors are error chunks with a message, for READ too.
    r.request(0, CMD_READ, 3, 4 * MIB, 1).await;
    let c = r.chunk().await;
    assert_eq!(
        (c.typ, c.flags, c.cookie),
        (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 3)
    );
    assert_eq!(&c.payload[..4], &EINVAL.to_be_bytes());
    let msg_len = u16::from_be_bytes([c.payload[4], c.payload[5]]) as usize;
    assert_eq!(msg_len, c.payload.len() - 6);
    assert!(msg_len > 0);
    // A device error.
    r.request(0, CMD_READ, 4, 3 * MIB, 4096).await;
    let c = r.chunk().await;
    assert_eq!((c.typ, c.cookie), (REPLY_TYPE_ERROR, 4));
    assert_eq!(&c.payload[..4], &EIO.to_be_bytes());

    // BLOCK_STATUS: the whole map, merged runs, flags HOLE|ZERO for holes.
    r.request(0, CMD_BLOCK_STATUS, 5, 0, 4 * MIB as u32).await;
    let c = r.chunk().await;
    assert_eq!(
        (c.typ, c.flags, c.cookie),
        (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, 5)
    );
    let mut rd = Reader::new(&c.payload);
    assert_eq!(rd.u32(), Some(META_ID_BASE_ALLOCATION));
    let mut descs = Vec::new();
    while let (Some(n), Some(f)) = (rd.u32(), rd.u32()) {
        descs.push((n as u64, f));
    }
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        descs,
        [
            (64 * KIB, 0),
            (MIB - 64 * KIB, hz),
            (4 * KIB, 0),
            (2 * MIB - 4 * KIB, hz),
            (4 * KIB, 0),
            (MIB - 4 * KIB, hz)
        ]
    );
    // REQ_ONE: one descriptor, within the request.
    r.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 6, 32 * KIB, MIB as u32)
        .await;
    let c = r.chunk().await;
    assert_eq!(c.payload.len(), 12);
    assert_eq!(&c.payload[4..], &[0, 0, 0x80, 0, 0, 0, 0, 0]);
    r.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 100 * KIB, 1000)
        .await;
    let c = r.chunk().await;
    assert_eq!(&c.payload[4..8], &1000u32.to_be_bytes());
    assert_eq!(&c.payload[8..], &hz.to_be_bytes());
    // Empty or past the end: EINVAL.
    for (cookie, off, len) in [(8u64, 0u64, 0u32), (9, 4 * MIB - 512, 1024)] {
        r.request(0, CMD_BLOCK_STATUS, cookie, off, len).await;
        let c = r.chunk().await;
        assert_eq!((c.typ, c.cookie), (REPLY_TYPE_ERROR, cookie));
        assert_eq!(&c.payload[..4], &EINVAL.to_be_bytes());
    }
    // Other commands still get simple replies on success.
    r.request(0, CMD_FLUSH, 10, 0, 0).await;
    assert_eq!(r.simple_reply().await, (0, 10));
    r.request(0, CMD_DISC, 11, 0, 0).await;
    assert!(r.closed_within(5).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_request_streams_drop_only_their_connection() {
    let mut dev = MemDevice::new(MIB);
    dev.slow_read = Some((0, Duration::from_millis(300)));
    let (e, dev) = export("rw", dev, true);
    let t = TestServer::start(NbdServerConfig::default(), vec![e]).await;

    // A bad request magic.
    let (mut r, _, _) = Raw::go(&t.sock, "rw", false, false).await;
    let mut req = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    req[0] = 0x26;
    r.send(&req).await;
    assert!(r.closed_within(2).await);

    // A WRITE longer than the maximum block size cannot be skipped cheaply: dropped.
    let (mut r, _, _) = Raw::go(&t.sock, "rw", false, false).await;
    r.request(0, CMD_WRITE, 1, 0, 64 << 20).await;
    assert!(r.closed_within(2).await);

    // Disconnecting in the middle of a WRITE payload.
    let (mut r, _, _) = Raw::go(&t.sock, "rw", false, false).await;
    r.request(0, CMD_WRITE, 1, 0, 65536).await;
    r.send(&[9u8; 1000]).await;
    drop(r);

    // Disconnecting with a (slow) request in flight: it finishes on the device anyway.
    let (mut r, _, _) = Raw::go(&t.sock, "rw", false, false).await;
    r.request(0, CMD_READ, 1, 0, 4096).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dev.reads_started.load(Ordering::SeqCst), 1);
    drop(r);

    // Disconnecting in the middle of a request header.
    let (mut r, _, _) = Raw::go(&t.sock, "rw", false, false).await;
    r.send(&REQUEST_MAGIC.to_be_bytes()).await;
    drop(r);

    t.wait_no_connections().await;
    assert_eq!(dev.reads_done.load(Ordering::SeqCst), 1);
    assert!(
        dev.allocated_blocks().is_empty(),
        "a partial WRITE was applied"
    );
    still_serves(&t.sock, "rw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_are_answered_out_of_order() {
    let mut dev = MemDevice::new(4 * MIB);
    dev.slow_read = Some((0, Duration::from_millis(400)));
    dev.fill(0, &pattern(4 * MIB as usize, 6));
    let (e, dev) = export("d", dev, false);
    let t = TestServer::start(NbdServerConfig::default(), vec![e]).await;
    let (mut r, _, _) = Raw::go(&t.sock, "d", false, false).await;

    // The slow read first, then 63 others, all sent before any reply is read.
    let n = 64u64;
    let mut batch = Vec::new();
    for cookie in 0..n {
        let req = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 1000 + cookie,
            offset: cookie * 65536,
            length: 4096,
        };
        batch.extend_from_slice(&req.encode());
    }
    r.send(&batch).await;
    let contents = dev.contents();
    let mut order = Vec::new();
    for _ in 0..n {
        let (err, cookie) = r.simple_reply().await;
        assert_eq!(err, 0);
        let off = ((cookie - 1000) * 65536) as usize;
        assert_eq!(r.read_exact(4096).await, contents[off..off + 4096]);
        order.push(cookie);
    }
    let unique: HashSet<_> = order.iter().copied().collect();
    assert_eq!(unique.len(), n as usize, "every request answered once");
    assert_ne!(order[0], 1000, "the slow request was answered first");
    assert_eq!(
        *order.last().unwrap(),
        1000,
        "the slow one should come last"
    );

    // A flood of reads without reading the replies: the server applies back-pressure
    // rather than buffering, and answers everything once the client reads.
    let (mut r, _, _) = Raw::go(&t.sock, "d", false, false).await;
    let n = 600u64;
    let mut batch = Vec::new();
    for cookie in 0..n {
        let req = Request {
            flags: 0,
            kind: CMD_READ,
            cookie,
            offset: (cookie % 60 + 1) * 65536,
            length: 65536,
        };
        batch.extend_from_slice(&req.encode());
    }
    r.send(&batch).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = dev.reads_started.load(Ordering::SeqCst);
    assert!(
        started < 64 + 600,
        "all {started} reads ran while nobody read the replies"
    );
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (err, cookie) = r.simple_reply().await;
        assert_eq!(err, 0);
        r.read_exact(65536).await;
        seen.insert(cookie);
    }
    assert_eq!(seen.len(), n as usize);
}
