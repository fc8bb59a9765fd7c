//! monitor-proc: the `splitvmm` binary's library. The supervisor of the other processes and
//! the QMP server that orchestrators talk to.
//!
//! - [`cli`]: the command line;
//! - [`launcher`]: the forked process that alone may exec the children;
//! - [`supervisor`]: start-up, child watch, shutdown;
//! - [`link`]: requests and events over the IPC links to the children;
//! - [`qmp`]: the QMP wire protocol (JSON stream, request checks, argument schema);
//! - [`server`]: QMP sockets and client sessions;
//! - [`commands`]: the command table and handlers; [`block_commands`]: the block and NBD
//!   commands' schemas and their monitor-side work (sockets); [`vm_commands`]: commands
//!   that combine block-proc's and vmm-proc's answers (`query-blockstats`);
//! - [`recovery`]: what block-proc's restart after a crash replays;
//! - [`events`], [`state`], [`signals`], [`sandbox`].

pub mod block_commands;
pub mod cli;
pub mod commands;
pub mod events;
pub mod fds;
pub mod launcher;
pub mod link;
pub mod migration;
pub mod qmp;
pub mod recovery;
pub mod sandbox;
pub mod server;
pub mod signals;
pub mod state;
pub mod supervisor;
pub mod vm_commands;
