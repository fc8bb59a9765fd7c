//! `nbd_server`: the bytes an NBD client sends, from the first option to the last request,
//! served by block-proc's [`NbdServer`] over an in-memory pipe (the same connection code as
//! a socket's, through [`NbdServer::serve_stream`]).
//!
//! The server has three exports of in-memory drives with holes ([`MemDevice`]): `""`
//! (writable, the default name), `ro` (a read-only drive) and `view` (a writable drive
//! exported read-only). The input is the client's whole side of the conversation; the client
//! then closes its half and reads everything the server says. Checks:
//! - the server never panics and always finishes (libFuzzer's `-timeout` catches a hang);
//! - its first 18 bytes are the fixed-newstyle greeting;
//! - nothing the client says changes the drives behind `ro` and `view`.

use std::sync::Arc;

use block_proc::nbd::proto::{FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC};
use block_proc::nbd::{Export, NbdServer, NbdServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::device::MemDevice;

/// Size of each drive.
const DRIVE: usize = 64 << 10;

/// The target.
pub fn run(data: &[u8]) {
    serve(data);
}

/// Runs the target; returns everything the server said.
pub fn serve(data: &[u8]) -> Vec<u8> {
    let (server, _deleted) = NbdServer::new(NbdServerConfig::default());
    let rw = Arc::new(MemDevice::new(DRIVE, false));
    let ro = Arc::new(MemDevice::new(DRIVE, true));
    let view = Arc::new(MemDevice::new(DRIVE, false));
    for (name, device, writable) in [("", &rw, true), ("ro", &ro, false), ("view", &view, false)] {
        server
            .add_export(Export {
                name: name.into(),
                description: Some(format!("fuzz export '{name}'")),
                device: device.clone(),
                writable,
            })
            .expect("add export");
    }
    let before = (ro.contents(), view.contents());

    let output = crate::block_on(async {
        let (client, conn) = tokio::io::duplex(64 << 10);
        let (sr, sw) = tokio::io::split(conn);
        let (mut cr, mut cw) = tokio::io::split(client);
        let talk = async {
            // The server may hang up first: the rest of the input is then lost, as it would be.
            let _ = cw.write_all(data).await;
            let _ = cw.shutdown().await;
            drop(cw);
        };
        let listen = async {
            let mut out = Vec::new();
            let _ = cr.read_to_end(&mut out).await;
            out
        };
        let ((), (), out) = tokio::join!(talk, server.serve_stream(sr, sw), listen);
        out
    });

    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    assert!(output.starts_with(&hello), "no greeting: {output:02x?}");
    assert!(ro.contents() == before.0, "the read-only drive was changed");
    assert!(
        view.contents() == before.1,
        "the drive of the read-only export was changed"
    );
    assert_eq!(server.connection_count(), 0, "connection still registered");
    output
}
