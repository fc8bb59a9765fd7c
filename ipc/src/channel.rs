//! Framing over `SOCK_SEQPACKET` sockets: one datagram is one message, with its file
//! descriptors attached as `SCM_RIGHTS`. [`Channel`] is the blocking front end (vCPU and
//! launcher code), [`AsyncChannel`] the tokio one; both share the frame functions here.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::handshake::{Hello, Link};
use crate::{IpcError, MAX_FRAME, Message, codec};

/// The most file descriptors one frame may carry.
pub const MAX_FDS: usize = 8;

/// A decoded message and the descriptors that came with it.
#[derive(Debug)]
pub struct Received<T> {
    pub msg: T,
    pub fds: Vec<OwnedFd>,
}

/// Makes a connected pair of close-on-exec `SOCK_SEQPACKET` sockets.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

fn send_frame(fd: RawFd, frame: &[u8], fds: &[RawFd], flags: MsgFlags) -> nix::Result<()> {
    let iov = [IoSlice::new(frame)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(fd, &iov, cmsgs, flags | MsgFlags::MSG_NOSIGNAL, None)?;
    // A SEQPACKET datagram is sent whole or not at all.
    if sent == frame.len() {
        Ok(())
    } else {
        Err(Errno::EMSGSIZE)
    }
}

/// A frame's bytes and the descriptors that came with it.
type Frame = (Vec<u8>, Vec<OwnedFd>);

thread_local! {
    /// Where this thread receives frames, reused: a fresh zeroed buffer of the largest
    /// frame size per message cost a 64 KiB memset even for a 30-byte guest I/O
    /// completion. Each frame is copied out at its own length.
    static RECV_BUF: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0u8; MAX_FRAME + 1]);
}

/// Receives one frame. `Ok(None)` means the peer closed the link.
fn recv_frame(fd: RawFd, flags: MsgFlags) -> Result<Option<Frame>, RecvError> {
    RECV_BUF.with_borrow_mut(|buf| recv_frame_into(fd, flags, buf))
}

fn recv_frame_into(fd: RawFd, flags: MsgFlags, buf: &mut [u8]) -> Result<Option<Frame>, RecvError> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(RecvError::Sys)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(RecvError::Sys)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let (len, truncated, ctruncated) = (
        msg.bytes,
        msg.flags.contains(MsgFlags::MSG_TRUNC),
        msg.flags.contains(MsgFlags::MSG_CTRUNC),
    );
    if ctruncated {
        return Err(RecvError::Ipc(IpcError::TooManyFds(MAX_FDS)));
    }
    if truncated || len > MAX_FRAME {
        return Err(RecvError::Ipc(IpcError::Oversized));
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((buf[..len].to_vec(), fds)))
}

enum RecvError {
    Sys(Errno),
    Ipc(IpcError),
}

fn decode_frame<T: Message>(
    frame: Option<(Vec<u8>, Vec<OwnedFd>)>,
) -> Result<Received<T>, IpcError> {
    let (bytes, fds) = frame.ok_or(IpcError::Closed)?;
    let msg: T = codec::decode(&bytes)?;
    let expected = msg.fd_count();
    if fds.len() != expected {
        return Err(IpcError::FdCount {
            expected,
            got: fds.len(),
        });
    }
    Ok(Received { msg, fds })
}

fn encode_frame<T: Message>(
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(Vec<u8>, Vec<RawFd>), IpcError> {
    if fds.len() != msg.fd_count() {
        return Err(IpcError::FdCount {
            expected: msg.fd_count(),
            got: fds.len(),
        });
    }
    Ok((
        codec::encode(msg)?,
        fds.iter().map(AsRawFd::as_raw_fd).collect(),
    ))
}

/// The blocking end of a link.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair of channels.
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let (a, b) = seqpacket_pair()?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps a socket this process was handed (a SEQPACKET socketpair end).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel { fd }
    }

    /// Takes over a link the launcher placed in this process at descriptor `fd` (its number
    /// came on the command line). `None` if no such descriptor is open.
    pub fn from_inherited(fd: RawFd) -> Option<Self> {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails if `fd` is not open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return None;
        }
        // SAFETY: the descriptor is open (checked above) and was handed to this process by
        // the launcher for this link alone; nothing else in the process refers to it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Channel { fd })
    }

    /// Gives the socket back, e.g. to pass it to a child.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one message with exactly the descriptors it declares.
    pub fn send<T: Message>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let (frame, raw) = encode_frame(msg, fds)?;
        loop {
            match send_frame(self.fd.as_raw_fd(), &frame, &raw, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(IpcError::Closed),
                other => return other.map_err(|e| IpcError::Io(e.into())),
            }
        }
    }

    /// Waits for one message.
    pub fn recv<T: Message>(&self) -> Result<Received<T>, IpcError> {
        loop {
            match recv_frame(self.fd.as_raw_fd(), MsgFlags::empty()) {
                Err(RecvError::Sys(Errno::EINTR)) => continue,
                Err(RecvError::Sys(Errno::ECONNRESET)) => return Err(IpcError::Closed),
                Err(RecvError::Sys(e)) => return Err(IpcError::Io(e.into())),
                Err(RecvError::Ipc(e)) => return Err(e),
                Ok(frame) => return decode_frame(frame),
            }
        }
    }

    /// Exchanges [`Hello`]s; the link is usable only if this succeeds.
    pub fn handshake(&self, link: Link) -> Result<(), IpcError> {
        self.send(&Hello::new(link), &[])?;
        self.recv::<Hello>()?.msg.check(link)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The tokio end of a link. `send` and `recv` take `&self`, so one task can read while
/// others write (share it in an `Arc`).
///
/// The socket is registered for readability only. A link's sends almost never wait (a
/// SEQPACKET send fails with `EAGAIN` only when the peer's queue is full), and a permanent
/// write registration costs a reactor wake-up each time the peer reads a message (the
/// socket becomes writable again, an edge): on the guest data path that was one pointless
/// wake-up of a block-proc worker per guest request. A send that meets `EAGAIN` waits on a
/// write registration of its own, made for that wait only.
#[derive(Debug)]
pub struct AsyncChannel {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncChannel {
    /// Registers the channel with the current tokio runtime.
    pub fn new(channel: Channel) -> std::io::Result<Self> {
        // SAFETY: an OwnedFd is a valid open descriptor that stays open, and always the same
        // one, for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(channel.fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Sends one message with exactly the descriptors it declares.
    pub async fn send<T: Message>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let (frame, raw) = encode_frame(msg, fds)?;
        loop {
            match send_frame(
                self.fd.get_ref().as_raw_fd(),
                &frame,
                &raw,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(()) => return Ok(()),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(IpcError::Closed),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => self.writable().await?,
                Err(e) => return Err(IpcError::Io(e.into())),
            }
        }
    }

    /// Waits until the socket may take a message: a registration of a duplicate of the
    /// descriptor for writability, for this wait only (epoll reports a socket that is
    /// already writable when it is added, so space freed since the `EAGAIN` is not missed).
    async fn writable(&self) -> std::io::Result<()> {
        let dup = self.fd.get_ref().try_clone()?;
        // SAFETY: `dup` is a valid descriptor of our own, owned by the AsyncFd until it is
        // dropped at the end of this wait.
        let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
        w.writable().await?.clear_ready();
        Ok(())
    }

    /// Waits for one message.
    pub async fn recv<T: Message>(&self) -> Result<Received<T>, IpcError> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut outcome = None;
            let io = guard.try_io(|fd| {
                match recv_frame(fd.get_ref().as_raw_fd(), MsgFlags::MSG_DONTWAIT) {
                    Err(RecvError::Sys(e)) => Err(std::io::Error::from(e)),
                    other => {
                        outcome = Some(other);
                        Ok(())
                    }
                }
            });
            match (io, outcome) {
                (Ok(Ok(())), Some(Ok(frame))) => return decode_frame(frame),
                (Ok(Ok(())), Some(Err(RecvError::Ipc(e)))) => return Err(e),
                (Ok(Err(e)), _) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    return Err(IpcError::Closed);
                }
                (Ok(Err(e)), _) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                (Ok(Err(e)), _) => return Err(IpcError::Io(e)),
                _ => continue, // would block: wait for readiness again
            }
        }
    }

    /// Exchanges [`Hello`]s; the link is usable only if this succeeds.
    pub async fn handshake(&self, link: Link) -> Result<(), IpcError> {
        self.send(&Hello::new(link), &[]).await?;
        self.recv::<Hello>().await?.msg.check(link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockCall, BlockRequest};

    fn raw_send(ch: &Channel, bytes: &[u8], fds: &[RawFd]) {
        send_frame(ch.as_fd().as_raw_fd(), bytes, fds, MsgFlags::empty()).expect("raw send");
    }

    #[test]
    fn message_round_trip_and_handshake() {
        let (a, b) = Channel::pair().expect("pair");
        let t = std::thread::spawn(move || b.handshake(Link::MonitorBlock).map(|()| b));
        a.handshake(Link::MonitorBlock).expect("handshake a");
        let b = t.join().expect("join").expect("handshake b");
        a.send(
            &BlockCall {
                id: 3,
                request: BlockRequest::QueryBlock,
            },
            &[],
        )
        .expect("send");
        let got = b.recv::<BlockCall>().expect("recv");
        assert_eq!(got.msg.id, 3);
        assert!(got.fds.is_empty());
    }

    #[test]
    fn handshake_on_the_wrong_link_fails() {
        let (a, b) = Channel::pair().expect("pair");
        let t = std::thread::spawn(move || b.handshake(Link::MonitorVmm));
        let err = a.handshake(Link::MonitorBlock).expect_err("must fail");
        assert!(err.to_string().contains("link"), "{err}");
        assert!(t.join().expect("join").is_err());
    }

    #[test]
    fn garbage_oversized_and_closed_frames_are_typed_errors() {
        let (a, b) = Channel::pair().expect("pair");
        raw_send(&a, &[0xff, 0xfe, 0x01], &[]);
        assert!(matches!(b.recv::<BlockCall>(), Err(IpcError::Codec(_))));
        // Frames over MAX_FRAME are dropped and reported; the link stays usable.
        let big = vec![0u8; MAX_FRAME + 100];
        raw_send(&a, &big, &[]);
        assert!(matches!(b.recv::<BlockCall>(), Err(IpcError::Oversized)));
        a.send(
            &BlockCall {
                id: 9,
                request: BlockRequest::QueryBlock,
            },
            &[],
        )
        .expect("send");
        assert_eq!(b.recv::<BlockCall>().expect("recv after errors").msg.id, 9);
        drop(a);
        assert!(matches!(b.recv::<BlockCall>(), Err(IpcError::Closed)));
    }

    #[test]
    fn unexpected_descriptors_are_refused_and_closed() {
        let (a, b) = Channel::pair().expect("pair");
        let frame = codec::encode(&BlockCall {
            id: 1,
            request: BlockRequest::QueryBlock,
        })
        .expect("enc");
        let (x, _y) = seqpacket_pair().expect("pair");
        raw_send(&a, &frame, &[x.as_raw_fd()]);
        assert!(matches!(
            b.recv::<BlockCall>(),
            Err(IpcError::FdCount {
                expected: 0,
                got: 1
            })
        ));
        // And a sender cannot attach descriptors the message does not declare.
        let err = a.send(
            &BlockCall {
                id: 1,
                request: BlockRequest::QueryBlock,
            },
            &[x.as_fd()],
        );
        assert!(matches!(err, Err(IpcError::FdCount { .. })));
    }

    #[test]
    fn async_front_end_round_trip() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (a, b) = Channel::pair().expect("pair");
            let (a, b) = (
                AsyncChannel::new(a).expect("a"),
                AsyncChannel::new(b).expect("b"),
            );
            let (ra, rb) =
                tokio::join!(a.handshake(Link::MonitorVmm), b.handshake(Link::MonitorVmm));
            ra.expect("a");
            rb.expect("b");
            a.send(
                &BlockCall {
                    id: 5,
                    request: BlockRequest::QueryBlock,
                },
                &[],
            )
            .await
            .expect("send");
            assert_eq!(b.recv::<BlockCall>().await.expect("recv").msg.id, 5);
        });
    }

    /// A sender whose peer does not read fills the socket, waits (the `EAGAIN` path and its
    /// one-off write registration) and goes on once the peer drains it; nothing is lost or
    /// reordered.
    #[test]
    fn a_full_link_makes_the_sender_wait_and_loses_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (a, b) = Channel::pair().expect("pair");
            let a = AsyncChannel::new(a).expect("a");
            let count: u64 = 20_000;
            let sender = tokio::spawn(async move {
                for id in 0..count {
                    a.send(
                        &BlockCall {
                            id,
                            request: BlockRequest::QueryBlock,
                        },
                        &[],
                    )
                    .await
                    .expect("send");
                }
                a
            });
            // Far more than a socket buffer holds: the sender must be stuck now.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            assert!(
                !sender.is_finished(),
                "20 000 messages fit in the socket buffer"
            );
            let b = AsyncChannel::new(b).expect("b");
            let drain = async {
                for id in 0..count {
                    assert_eq!(b.recv::<BlockCall>().await.expect("recv").msg.id, id);
                }
                sender.await.expect("sender")
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), drain)
                .await
                .expect("a waiting sender was never woken");
        });
    }
}
