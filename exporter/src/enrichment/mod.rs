//! What the agent adds to a flow: domain, GeoIP, container, pod.

pub mod containers;
pub mod dns;
pub mod geoip;
pub mod kubernetes;
