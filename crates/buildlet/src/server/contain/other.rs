//! Containment elsewhere (other Unix, Windows): the command's process
//! group only (see [`super::kill_shared`]). The fallback: a process that
//! leaves its group (`setsid`) can outlive its command here.

use super::Active;

pub(super) fn setup(_mode: super::ContainMode, _scope: &str) -> Active {
    Active::Group
}

pub(super) fn fallback() -> Active {
    Active::Group
}

pub(super) fn remove_cgroup(_dir: &std::path::Path) {}

pub(super) fn kill_cgroup(_dir: &std::path::Path) -> super::Swept {
    super::Swept::Signalled
}

pub(super) fn no_members(_dir: &std::path::Path) -> Option<bool> {
    None
}

pub(super) fn no_sub_cgroups(_dir: &std::path::Path) -> bool {
    false
}
