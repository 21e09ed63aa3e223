//! The mirror cache's decisions, without I/O: the folder a repository's mirror lives in,
//! and which unused mirrors to remove when the cache is over `REPO_CACHE_MAX_BYTES`.

use shared::Millis;

/// File in each mirror holding the repository's name (folder names may be shortened).
pub const NAME_FILE: &str = "claude-runner-name";
/// File in each mirror holding when a job last used it (ms since the epoch).
pub const USED_FILE: &str = "claude-runner-last-used";
/// Folder names longer than this are shortened and made unique with a hash.
const MAX_FOLDER: usize = 150;

/// The folder of a repository's mirror, from its name (`host[:port]/path`): readable
/// (`github.com+owner+repo.git`), never `.`-led (those are the cache's own), one path part.
/// Names only hold letters, digits, `. _ - ~ : /`, so `+` and `@` cannot collide.
pub fn folder(name: &str) -> String {
    let readable: String = name.chars().map(|c| match c {
        '/' => '+',
        ':' => '@',
        c => c,
    }).collect();
    if readable.len() <= MAX_FOLDER {
        return format!("{readable}.git");
    }
    let cut = shared::text::truncate(&readable, MAX_FOLDER - 17);
    format!("{cut}~{:016x}.git", fnv1a(name.as_bytes()))
}

/// FNV-1a: a stable 64-bit hash (std's hasher may change between Rust releases, and a
/// folder name must not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// One mirror as the eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorUse {
    pub folder: String,
    pub bytes: u64,
    pub last_used: Millis,
    /// A job holds it (or waits for it): never removed.
    pub in_use: bool,
}

/// The mirrors to remove, least recently used first, until the cache fits `max_bytes`.
/// Mirrors in use are kept even if the cache stays over the limit.
pub fn evictions(mut mirrors: Vec<MirrorUse>, max_bytes: u64) -> Vec<String> {
    let mut total: u64 = mirrors.iter().map(|m| m.bytes).sum();
    mirrors.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.folder.cmp(&b.folder)));
    let mut out = Vec::new();
    for m in mirrors {
        if total <= max_bytes {
            break;
        }
        if !m.in_use {
            total -= m.bytes;
            out.push(m.folder);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_readable_unique_and_one_part() {
        assert_eq!(folder("github.com/owner/repo"), "github.com+owner+repo.git");
        assert_eq!(folder("127.0.0.1:8443/a/b"), "127.0.0.1@8443+a+b.git");
        let long_a = format!("h.com/{}", "a".repeat(300));
        let long_b = format!("h.com/{}b", "a".repeat(299));
        assert_ne!(folder(&long_a), folder(&long_b));
        assert!(folder(&long_a).len() < 200);
        assert!(!folder(&long_a).contains('/'));
    }

    fn m(folder: &str, bytes: u64, last_used: Millis, in_use: bool) -> MirrorUse {
        MirrorUse { folder: folder.into(), bytes, last_used, in_use }
    }

    #[test]
    fn evicts_least_recently_used_idle_mirrors_until_it_fits() {
        let all = vec![m("new", 50, 30, false), m("old", 50, 10, false), m("mid", 50, 20, false)];
        assert_eq!(evictions(all.clone(), 150), Vec::<String>::new());
        assert_eq!(evictions(all.clone(), 100), ["old"]);
        assert_eq!(evictions(all.clone(), 60), ["old", "mid"]);
        // In use: kept, even when that leaves the cache over its limit.
        let busy = vec![m("old", 50, 10, true), m("mid", 50, 20, false), m("new", 50, 30, true)];
        assert_eq!(evictions(busy, 1), ["mid"]);
    }
}
