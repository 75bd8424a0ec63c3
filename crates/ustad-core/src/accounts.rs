//! Who a pool's workers run as: the pool's `user` and `group`, looked up in the system's user
//! database (`/etc/passwd` and `/etc/group`, or whatever NSS serves) when each worker is
//! started, so that a user added or changed later is taken as it is then.
//!
//! The primary, started as root, binds privileged ports and keeps its control socket to
//! itself; its workers get their sockets, pipes and channel as fds and change identity in the
//! child, before `exec` (see `sys::prepare_worker`).

use std::path::PathBuf;

use crate::sys;

/// The identity a worker takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its supplementary groups (the user's, from the group database; `gid` among them).
    pub groups: Vec<u32>,
    /// The user's name and home, for `USER`, `LOGNAME` and `HOME`, when it has an account.
    pub account: Option<(String, PathBuf)>,
}

/// The credentials for `user` and `group` (names or numbers); `None` when neither is given.
///
/// # Errors
/// A user or group that does not exist, or a database that cannot be read: the message says
/// which.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, String> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let group_id = match group {
        None => None,
        Some(name) => Some(match sys::group_id(name) {
            Ok(Some(gid)) => gid,
            Ok(None) => name
                .parse::<u32>()
                .map_err(|_| format!("there is no group `{name}`"))?,
            Err(error) => return Err(format!("cannot look up group `{name}`: {error}")),
        }),
    };
    let Some(user) = user else {
        let gid = group_id.expect("a group when there is no user");
        return Ok(Some(Credentials {
            uid: rustix::process::getuid().as_raw(),
            gid,
            groups: vec![gid],
            account: None,
        }));
    };
    match sys::user_account(user) {
        Ok(Some(account)) => {
            let gid = group_id.unwrap_or(account.gid);
            let mut groups = sys::user_groups(&account.name, account.gid)
                .map_err(|error| format!("cannot list the groups of user `{user}`: {error}"))?;
            if !groups.contains(&gid) {
                groups.push(gid);
            }
            Ok(Some(Credentials {
                uid: account.uid,
                gid,
                groups,
                account: Some((account.name, account.home)),
            }))
        }
        // A number without an account: that uid, with the group given or its own number.
        Ok(None) => {
            let uid = user
                .parse::<u32>()
                .map_err(|_| format!("there is no user `{user}`"))?;
            let gid = group_id.unwrap_or(uid);
            Ok(Some(Credentials {
                uid,
                gid,
                groups: vec![gid],
                account: None,
            }))
        }
        Err(error) => Err(format!("cannot look up user `{user}`: {error}")),
    }
}

/// Whether this process may take other identities for its workers: only root may.
pub fn can_switch_users() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_nobody_are_found_and_strangers_are_named() {
        let root = resolve(Some("root"), None).unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert_eq!(root.account.as_ref().map(|a| a.0.as_str()), Some("root"));
        let nobody = resolve(Some("nobody"), Some("nogroup")).unwrap().unwrap();
        assert_eq!(nobody.uid, 65_534);
        assert!(nobody.groups.contains(&nobody.gid));
        let numeric = resolve(Some("4242"), None).unwrap().unwrap();
        assert_eq!((numeric.uid, numeric.gid), (4242, 4242));
        assert_eq!(resolve(None, None), Ok(None));
        let error = resolve(Some("no-such-user-here"), None).unwrap_err();
        assert!(error.contains("no user `no-such-user-here`"), "{error}");
        let error = resolve(Some("root"), Some("no-such-group-here")).unwrap_err();
        assert!(error.contains("no group `no-such-group-here`"), "{error}");
    }
}
