//! What the agent adds to a flow: domain, GeoIP, container, pod.

pub mod dns;
pub mod flows;
pub mod geoip;
pub mod kubernetes;
pub mod users;
