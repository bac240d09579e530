//! Every type and constant of `src/lib.rs` is in the tables that assert its
//! layout on both sides (`SHARED_STRUCTS`, `SHARED_CONSTANTS`), so a new one
//! cannot be shared with the C programs unchecked.

use std::collections::BTreeSet;

use fleetsnitch_ebpf::{SHARED_CONSTANTS, SHARED_STRUCTS, Stat};

const LIB_RS: &str = include_str!("../src/lib.rs");

/// Names of the top-level items `lib.rs` declares as `pub <keyword> NAME`.
fn declared(keyword: &str) -> Vec<&'static str> {
    let prefix = format!("pub {keyword} ");
    LIB_RS
        .lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|rest| {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn every_struct_in_lib_rs_has_its_layout_listed() {
    let listed: BTreeSet<&str> = SHARED_STRUCTS.iter().map(|s| s.rust_name).collect();
    let structs = declared("struct");
    assert!(structs.len() >= 6, "found only {structs:?} in src/lib.rs");
    let missing: Vec<&str> = structs
        .into_iter()
        .filter(|name| !listed.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "structs of src/lib.rs missing from SHARED_STRUCTS: {missing:?}"
    );
}

#[test]
fn every_constant_in_lib_rs_is_listed() {
    let listed: BTreeSet<&str> = SHARED_CONSTANTS.iter().map(|c| c.rust_name).collect();
    let mut expected: Vec<String> = declared("const")
        .into_iter()
        .filter(|name| !name.starts_with("SHARED_"))
        .map(str::to_owned)
        .collect();
    assert!(
        expected.len() >= 10,
        "found only {expected:?} in src/lib.rs"
    );
    expected.extend(Stat::ALL.iter().map(|stat| format!("Stat::{stat:?}")));
    expected.push("Stat::ALL.len()".to_owned());
    let missing: Vec<&String> = expected
        .iter()
        .filter(|name| !listed.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "constants of src/lib.rs missing from SHARED_CONSTANTS: {missing:?}"
    );
}

#[test]
fn names_are_listed_once() {
    let mut seen = BTreeSet::new();
    for s in SHARED_STRUCTS {
        assert!(seen.insert(s.c_name), "struct {} listed twice", s.c_name);
        assert!(seen.insert(s.rust_name), "{} listed twice", s.rust_name);
        let mut fields = BTreeSet::new();
        for f in s.fields {
            assert!(
                fields.insert(f.name),
                "{}::{} listed twice",
                s.rust_name,
                f.name
            );
        }
    }
    for c in SHARED_CONSTANTS {
        assert!(seen.insert(c.c_name), "{} listed twice", c.c_name);
    }
}

#[test]
fn stat_indexes_follow_their_order() {
    for (index, stat) in Stat::ALL.iter().enumerate() {
        assert_eq!(
            *stat as usize, index,
            "Stat::{stat:?} is out of order in Stat::ALL"
        );
    }
}
