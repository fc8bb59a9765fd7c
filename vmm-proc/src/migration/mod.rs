//! Live migration of the VM (docs/migration.md): the stream format ([`stream`]).

pub mod state;
pub mod stream;
