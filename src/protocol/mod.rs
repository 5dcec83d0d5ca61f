//! The only code that knows wire layouts: the native frame (`frame`), its
//! request and response bodies (`messages`), and RESP2 for the Redis port
//! (`resp`). Pure: no I/O, no async.

pub mod frame;
pub mod messages;
pub mod resp;
