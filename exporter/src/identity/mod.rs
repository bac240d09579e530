//! Who is behind the traffic: processes, their executables and hashes.

pub mod command_line;
pub mod containers;
pub mod execs;
pub mod hashing;
pub mod inode;
pub mod modification;
pub mod processes;
