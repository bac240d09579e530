//! User names of uids, as the node's user database has them.
//!
//! On the host the C library answers (`getpwuid`, so NSS sources such as
//! LDAP or sssd work). In the chart's pod the C library would read the
//! image's `/etc/passwd`, which names the image's users, not the node's: there
//! the node's `/etc/passwd` is read instead (NSS modules of the node cannot
//! be loaded into the agent; their users stay numbers).

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::support::node;

/// Names of uids, looked up once each.
#[derive(Debug, Default)]
pub struct UserNames {
    names: HashMap<u32, String>,
    /// The node's `/etc/passwd` when the agent's own is not the node's.
    node_passwd: Option<PasswdFile>,
}

impl UserNames {
    /// The name of `uid`, or the number when the user database has none.
    pub fn name(&mut self, uid: u32) -> &str {
        if !self.names.contains_key(&uid) {
            let name = match node::foreign_root() {
                Some(_) => self
                    .node_passwd
                    .get_or_insert_with(|| {
                        PasswdFile::new(node::path_on_node(Path::new("/etc/passwd")))
                    })
                    .name(uid),
                None => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|user| user.name),
            };
            self.names
                .insert(uid, name.unwrap_or_else(|| uid.to_string()));
        }
        &self.names[&uid]
    }
}

/// A passwd(5) file, read again when it changes (a user added on the node).
#[derive(Debug)]
struct PasswdFile {
    path: PathBuf,
    modified: Option<SystemTime>,
    names: HashMap<u32, String>,
}

impl PasswdFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            modified: None,
            names: HashMap::new(),
        }
    }

    fn name(&mut self, uid: u32) -> Option<String> {
        let modified = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != self.modified {
            match fs::read_to_string(&self.path) {
                Ok(text) => {
                    self.names = parse_passwd(&text);
                    self.modified = modified;
                }
                Err(error) => {
                    tracing::warn!(file = %self.path.display(), %error, "cannot read the node's user database");
                }
            }
        }
        self.names.get(&uid).cloned()
    }
}

/// `name:password:uid:gid:gecos:home:shell` lines; the first name of a uid
/// wins, as `getpwuid` answers.
fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(uid)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if name.is_empty() || name.starts_with('#') || name.starts_with(['+', '-']) {
            continue;
        }
        if let Ok(uid) = uid.parse::<u32>() {
            names.entry(uid).or_insert_with(|| name.to_owned());
        }
    }
    names
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

    #[test]
    fn passwd_lines_name_their_uids_first_entry_first() {
        let names = parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\n\
             # a comment\n\
             \n\
             +nisdefault\n\
             alice:x:1000:1000::/home/alice:/bin/sh\n\
             alias:x:1000:1000::/home/alice:/bin/sh\n\
             broken\n\
             bad:x:notanumber:0::/:/bin/false\n",
        );
        assert_eq!(names.get(&0).map(String::as_str), Some("root"));
        assert_eq!(names.get(&1000).map(String::as_str), Some("alice"));
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_changed_passwd_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        fs::write(&path, "a:x:7:7::/:/bin/sh\n").unwrap();
        let mut file = PasswdFile::new(path.clone());
        assert_eq!(file.name(7).as_deref(), Some("a"));
        assert_eq!(file.name(8), None);
        fs::write(&path, "a:x:7:7::/:/bin/sh\nb:x:8:8::/:/bin/sh\n").unwrap();
        // A new modification time (file systems with coarse timestamps).
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(file.name(8).as_deref(), Some("b"));
    }
}
