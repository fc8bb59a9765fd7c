//! The one place that knows the wire encoding of IPC messages (bincode 2 through serde).
//!
//! Swapping the codec means changing this file only. Decoding is bounded: a frame may not
//! be larger than [`MAX_FRAME`], and bincode is told the same limit so a length prefix
//! inside a frame cannot make it allocate more.

use serde::{Serialize, de::DeserializeOwned};

/// The largest frame a link carries, in bytes. It fits in the default socket buffer
/// (`net.core.wmem_default`), so a single `sendmsg` never blocks on a frame it cannot fit.
pub const MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (a message too large for a frame, most likely).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// Decoding failed: garbage, truncated, or an unknown variant.
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// The frame decoded but had bytes left over.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes one message into a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME {
        return Err(CodecError::Encode(format!(
            "{} bytes is over the {MAX_FRAME}-byte frame limit",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes one frame; the whole frame must be one message.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(frame, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != frame.len() {
        return Err(CodecError::Trailing(frame.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockCall, BlockRequest};

    #[test]
    fn round_trip() {
        let call = BlockCall {
            id: 7,
            request: BlockRequest::QueryBlock,
        };
        let frame = encode(&call).expect("encode");
        let back: BlockCall = decode(&frame).expect("decode");
        assert_eq!(back.id, 7);
        assert!(matches!(back.request, BlockRequest::QueryBlock));
    }

    #[test]
    fn garbage_truncated_and_trailing_frames_are_errors() {
        let frame = encode(&BlockCall {
            id: 1,
            request: BlockRequest::QueryBlock,
        })
        .expect("encode");
        assert!(decode::<BlockCall>(&frame[..frame.len() - 1]).is_err());
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(
            decode::<BlockCall>(&long),
            Err(CodecError::Trailing(1))
        ));
        assert!(decode::<BlockCall>(&[0xff; 32]).is_err());
        assert!(decode::<BlockCall>(&[]).is_err());
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A Vec length of u64::MAX inside a tiny frame must fail, not try to allocate.
        let frame = [0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<Vec<u64>>(&frame).is_err());
        assert!(decode::<String>(&frame).is_err());
    }

    #[test]
    fn oversized_messages_are_refused_on_encode() {
        let big = vec![0u8; MAX_FRAME + 1];
        assert!(encode(&big).is_err());
    }
}
