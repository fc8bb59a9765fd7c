//! QMP wire protocol, compatible with QEMU's modern (9.x/10.x) monitor.
//! Pure data transformation: no I/O, no command semantics.
//!
//! * [`ErrorClass`] and [`QmpError`] (from `ipc`, shared with the processes that answer
//!   commands): the error type of every layer.
//! * [`json`]: [`JsonStreamer`], the incremental input reader (QEMU's lexer
//!   extensions, error texts, [`Limits`] and resynchronisation rules).
//! * [`wire`]: [`parse_request`] (request-object checks, `id` echo rules),
//!   [`to_wire`] (QEMU's output format) and the line builders [`greeting`],
//!   [`response_ok`], [`response_err`], [`event`].
//! * [`schema`]: [`validate`] checks command arguments against static
//!   [`Member`] tables with QEMU's error texts and order; [`normalize`] adds
//!   QEMU's uint64 wrap-around before serde decoding.
//!
//! A monitor feeds socket bytes to a [`JsonStreamer`]; each `Err` becomes
//! `response_err(&e, None)`; each value goes through [`parse_request`] (its
//! error carries the `id` to echo), then the command's table through
//! [`validate`], then serde.

pub mod json;
pub mod schema;
pub mod wire;

pub use self::json::{JsonStreamer, Limits};
pub use self::schema::{ArgType, Member, normalize, validate, validate_args};
pub use self::wire::{
    Request, RequestError, Timestamp, event, greeting, parse_request, response_err, response_ok,
    to_wire,
};
pub use ipc::{ErrorClass, QmpError};
