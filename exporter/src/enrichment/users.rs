//! User names of uids, as the host's user database has them.

use std::collections::HashMap;

/// Names of uids, looked up once each.
#[derive(Debug, Default)]
pub struct UserNames {
    names: HashMap<u32, String>,
}

impl UserNames {
    /// The name of `uid`, or the number when the user database has none.
    pub fn name(&mut self, uid: u32) -> &str {
        self.names.entry(uid).or_insert_with(|| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|user| user.name)
                .unwrap_or_else(|| uid.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_named_and_unknown_uids_are_numbers() {
        let mut users = UserNames::default();
        assert_eq!(users.name(0), "root");
        assert_eq!(users.name(4_000_000_001), "4000000001");
    }
}
