//! The user's home folder, where both binaries' default folders are: `HOME` when it is an
//! absolute path, else this user's home in the password database, where Claude (Node's
//! `os.homedir()`) looks too. A `HOME` that is empty or relative (a unit's
//! `Environment=HOME=`, `env -i`, a cron job) is no home: taken as it was, the agent's
//! folders were under /root for every user, and the native edge's job store under
//! whatever folder it started in.

use std::path::PathBuf;

/// The home folder: `home` (`HOME`) when it is an absolute path, else `passwd`'s.
pub fn home_from(home: Option<std::ffi::OsString>, passwd: impl FnOnce() -> Option<PathBuf>) -> Option<PathBuf> {
    let absolute = |p: &PathBuf| p.is_absolute();
    home.map(PathBuf::from).filter(absolute).or_else(|| passwd().filter(absolute))
}

/// The home folder of user `uid` in the password database (getpwuid_r: no static buffer
/// another thread could overwrite).
pub fn passwd_home(uid: libc::uid_t) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: a zeroed passwd is a valid value to be filled in.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to a live value of the right type; `buf` is `size` long.
        let rc = unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || found.is_null() || entry.pw_dir.is_null() {
            return None;
        }
        // SAFETY: pw_dir points into `buf`, NUL-terminated, alive until `buf` is dropped.
        let dir = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) };
        return Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))).filter(|d| !d.as_os_str().is_empty());
    }
}


/// This user's home ([`home_from`] with this process's `HOME` and effective user).
pub fn this_users(home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    home_from(home, || passwd_home(uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With HOME unset, the default folders were under /root for every user: the password
    /// database's home is taken, and a HOME that is no absolute path is no home.
    #[test]
    fn the_home_is_homes_else_the_password_databases() {
        let passwd = || Some(PathBuf::from("/home/runner"));
        assert_eq!(home_from(Some("/srv/me".into()), passwd), Some(PathBuf::from("/srv/me")));
        assert_eq!(home_from(None, passwd), Some(PathBuf::from("/home/runner")));
        assert_eq!(home_from(Some("".into()), passwd), Some(PathBuf::from("/home/runner")));
        assert_eq!(home_from(Some("relative".into()), passwd), Some(PathBuf::from("/home/runner")));
        assert_eq!(home_from(None, || None), None);
        assert_eq!(home_from(None, || Some(PathBuf::new())), None);
        // This user's entry, as getent reads it.
        let uid = unsafe { libc::geteuid() };
        let getent = std::process::Command::new("getent").args(["passwd", &uid.to_string()]).output().unwrap();
        let line = String::from_utf8(getent.stdout).unwrap();
        let dir = line.trim_end().split(':').nth(5).expect("this user is in the password database");
        assert_eq!(passwd_home(uid), Some(PathBuf::from(dir)));
        assert_eq!(passwd_home(4_000_000_000), None, "no such user");
    }
}
