//! HTTP/2 settings both ends of the gateway ↔ node connection use, so a large
//! guest transfer (a 32 MiB file is about 43 MiB of base64 in JSON) is not held
//! back by hyper's default flow-control windows and 16 KiB frames.

/// Bytes one stream may have in flight before the receiver acknowledges them.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Bytes all streams of one connection may have in flight.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame either end sends.
pub const MAX_FRAME: u32 = 1024 * 1024;
