//! The shipped example configuration must stay valid and equal to the defaults.

use fleetsnitch::config::Config;

#[test]
fn example_config_parses_and_equals_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.example.yaml");
    let config = Config::from_file(std::path::Path::new(path)).unwrap();
    config.validate().unwrap();
    assert_eq!(config, Config::default());
}
