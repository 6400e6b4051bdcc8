//! The response body type every handler returns, and small constructors.
//!
//! A body is a boxed stream of byte frames whose error aborts the transfer:
//! hyper then closes the connection without a clean end, so a client never
//! mistakes a failed transfer for a complete one.

use std::io;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}
