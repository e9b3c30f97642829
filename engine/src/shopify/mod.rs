//! The Shopify bridge: signed order webhooks in, order events on the log out, with
//! durable deduplication and an audit record per delivery.

pub mod payload;
pub mod signature;
