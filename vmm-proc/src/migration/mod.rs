//! Live migration of the VM (docs/migration.md): the stream format ([`stream`]).

pub mod stream;
