//! The mirror cache's decisions, without I/O: the folder a repository's mirror lives in,
//! which unused mirrors to remove when the cache is over `REPO_CACHE_MAX_BYTES` (or a job
//! ran out of room, and how much room to make for it), and which of a mirror's packs to
//! combine when it holds too many.

use shared::Millis;

/// File in each mirror holding the repository's name (folder names may be shortened); a
/// mirror is used only by the repository its name file names. Before, the file was
/// `claude-runner-name`, and names folded `x.git` into `x` on every host: a mirror with
/// only that file is not trusted, but fetched again.
pub const NAME_FILE: &str = "claude-runner-repo";
/// File in each mirror holding when a job last used it (ms since the epoch).
pub const USED_FILE: &str = "claude-runner-last-used";
/// Folder names longer than this are shortened and made unique with a hash.
const MAX_FOLDER: usize = 150;

/// The folder of a repository's mirror, from its name (`host[:port]/path`): readable
/// (`github.com+owner+repo.git`), never `.`-led (those are the cache's own), one path part,
/// and never another name's. Names only hold letters, digits, `. _ - ~ : /`
/// (`shared::repo::could_be_name`), so `+` and `@` cannot collide, and `=` marks a
/// shortened name: its `~` once did, and a short name spelled like a long one's folder
/// (`cut~sha256`) got that folder, and its mirror. Folders of older agents named so are
/// removed at the agent's start (their name file no longer names them), fetched again when
/// used.
pub fn folder(name: &str) -> String {
    let readable: String = name.chars().map(|c| match c {
        '/' => '+',
        ':' => '@',
        c => c,
    }).collect();
    if readable.len() <= MAX_FOLDER {
        return format!("{readable}.git");
    }
    // SHA-256: two names of one folder would share a mirror, so no one may make them (a
    // 64-bit hash could be made to collide). Stable, unlike std's hasher.
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(name.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let cut = shared::text::truncate(&readable, MAX_FOLDER - 65);
    format!("{cut}={hash}.git")
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

/// The idle mirrors other than the folder `keep`, least recently used first: those to
/// remove in turn when a job's fetch or checkout of `keep`'s repository ran out of room
/// (its own mirror is what the job needs, and made anew it takes more room, not less).
pub fn idle_oldest_first(mut mirrors: Vec<MirrorUse>, keep: &str) -> Vec<String> {
    mirrors.retain(|m| !m.in_use && m.folder != keep);
    mirrors.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.folder.cmp(&b.folder)));
    mirrors.into_iter().map(|m| m.folder).collect()
}

/// How much room to make from idle mirrors for a job's fetch or checkout that ran out of
/// it (`super::Repos::make_room`), at one try of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Until `bytes` fit the disk beside its reserve (`super::checkout::fits_with_reserve`);
    /// `at_least_one`: one mirror goes even if they seem to fit already (a fetch's need is
    /// an estimate, and the fetch filled the disk with what was free: nothing gone, the
    /// next try would end the same).
    Bytes { bytes: u64, at_least_one: bool },
    /// Every idle mirror: the need is not known, or the estimates did not hold.
    All,
}

/// Tries a job's fetch gets after running out of room, each once idle mirrors made more
/// ([`room_to_make`]): the first two for what its failure says it needs (a mirror each at
/// least), the last with every idle mirror gone. A fetch is tried again from nothing (its partial pack was
/// removed), so tries cost a download each: bounded, and the last settles that the
/// repository does not fit (`runner::full_disk`).
pub const FETCH_ROOM_TRIES: u32 = 3;

/// The room to make for the `round`th time (1 the first) a job's fetch (`checking_out`
/// false) or checkout ran out of it, its failure having said it `needs` bytes (a checkout's
/// measured need; a fetch's estimate, [`fetch_needs`]); None when no more room is made and
/// the failure is judged. A checkout's need is measured, so it gets one round; a fetch's
/// is an estimate from what it received before the disk was full, and gets
/// [`FETCH_ROOM_TRIES`]. Before, a fetch (need unknown) emptied the whole cache at once:
/// one large fetch on a nearly full disk made every other repository's next job clone cold.
pub fn room_to_make(checking_out: bool, needs: Option<u64>, round: u32) -> Option<Room> {
    if checking_out {
        return match (round, needs) {
            (1, Some(bytes)) => Some(Room::Bytes { bytes, at_least_one: false }),
            (1, None) => Some(Room::All),
            _ => None,
        };
    }
    match round {
        0 => None,
        // Its need not known (the disk was full before the pack came): a mirror a round.
        round if round < FETCH_ROOM_TRIES => Some(Room::Bytes { bytes: needs.unwrap_or(0), at_least_one: true }),
        FETCH_ROOM_TRIES => Some(Room::All),
        _ => None,
    }
}

/// The bytes of a pack's index (`.idx`, version 2) for `objects` objects of SHA-1 ids (the
/// mirrors'): a header, a fan-out table, each object's id, checksum and offset, and the
/// pack's and its own checksums (offsets past 2 GiB take 8 more each, left out).
pub fn pack_index_bytes(objects: u64) -> u64 {
    objects.saturating_mul(20 + 4 + 4).saturating_add(8 + 256 * 4 + 2 * 20)
}

/// The fewest bytes an object takes in a pack: its header (a byte) and the smallest zlib
/// stream (8 bytes, of nothing). Bounds the objects a pack of a given size can hold, so a
/// count a server announces (what it likes) cannot make its index's estimate unbounded.
pub const MIN_PACKED_OBJECT_BYTES: u64 = 9;

/// What a fetch that ran out of room is taken to need, from how far it got: `received`
/// bytes of a pack of `objects` objects, `objects_received` of them whole. The pack's size
/// is not known before it has all arrived (a server announces only its count of objects),
/// so the bytes so far are scaled to the objects announced, never below what arrived, and
/// its index is added. Only an estimate (an object is as large as it likes, the last ones
/// too): room is made for it, the fetch tried again, and a further failure, having got
/// further, estimates again ([`room_to_make`]). Capped at what a fetch may receive,
/// `max_bytes` (`REPO_MAX_FETCH_BYTES`: past it the fetch stops anyway), and the index of
/// as many objects as that can hold ([`MIN_PACKED_OBJECT_BYTES`]): a server announcing
/// 2^32 objects made it ~120 GB (rev37-3).
pub fn fetch_needs(received: u64, objects_received: u64, objects: u64, max_bytes: u64) -> u64 {
    let pack = match objects_received {
        0 => received,
        whole if whole >= objects => received,
        whole => u64::try_from(u128::from(received) * u128::from(objects) / u128::from(whole)).unwrap_or(u64::MAX),
    };
    let pack = pack.min(max_bytes).max(received);
    let objects = objects.min(pack / MIN_PACKED_OBJECT_BYTES + 1);
    pack.saturating_add(pack_index_bytes(objects))
}

/// Whether a job's step that ran out of room could fit at all once every idle mirror of
/// other repositories on its disk went: `needs` bytes (a checkout's measured need, a
/// fetch's estimate) beside the disk's reserve in its free bytes (`space`) and the idle
/// mirrors' (`idle`). Not: no mirror goes, and the step is judged at once
/// (`super::Repos::make_room`) — a fetch that could never fit emptied the whole cache
/// before it was told so (rev37-3).
pub fn could_fit(needs: u64, mut space: crate::workspace::DiskSpace, idle: u64) -> bool {
    space.free = space.free.saturating_add(idle);
    super::checkout::fits_with_reserve(needs, space)
}

/// Packs a mirror may hold before it is repacked (`mirror::MirrorCache::repack`). Each fetch
/// that brings something adds one, and libgit2 looks in every pack for each object it
/// reads: 402 packs after 200 fetches made a fetch that found nothing new take 88 ms
/// instead of 23 (rev25-6).
pub const REPACK_AT_PACKS: usize = 16;

/// The packs to combine into one (names), of a mirror's `packs` (name, bytes of the pack)
/// when it holds `at` or more: all but the largest when that one is at least twice the
/// others together (the first fetch's, mostly, kept as it is: libgit2 computes every delta
/// of what it packs again, which for a large repository takes minutes), else all of them.
/// So each repack costs at most about what it combines, and leaves one or two packs.
pub fn packs_to_combine(packs: &[(String, u64)], at: usize) -> Vec<String> {
    if packs.len() < at.max(2) {
        return Vec::new();
    }
    let mut by_size: Vec<&(String, u64)> = packs.iter().collect();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest: u64 = by_size[1..].iter().map(|(_, bytes)| *bytes).sum();
    let skip = usize::from(by_size[0].1 >= rest.saturating_mul(2));
    by_size[skip..].iter().map(|(name, _)| name.clone()).collect()
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
        // The whole SHA-256 of the name, not a 64-bit hash anyone can make collide.
        let hash = folder(&long_a).rsplit_once('=').unwrap().1.strip_suffix(".git").unwrap().to_string();
        assert_eq!(hash, "b0cbb67d2584226bd0177dce4fca4fce0288200235bb35c50456409939fbecdb");
        // A short name spelled as a long one's folder is another folder (hostile review
        // s33, 4: it was that folder, and one repository's fetch removed the other's mirror).
        let spelled = long_a.replace('/', "+").replace(':', "@");
        let short = format!("{}~{hash}", shared::text::truncate(&spelled, MAX_FOLDER - 65)).replace('+', "/").replace('@', ":");
        assert!(short.len() <= MAX_FOLDER && shared::repo::could_be_name(&short), "{short}");
        assert_ne!(folder(&short), folder(&long_a));
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

    #[test]
    fn a_mirror_is_repacked_past_its_packs_keeping_a_large_first_pack_as_it_is() {
        let packs = |sizes: &[u64]| sizes.iter().enumerate().map(|(i, b)| (format!("p{i}"), *b)).collect::<Vec<_>>();
        assert!(packs_to_combine(&packs(&[100, 1, 1]), 4).is_empty(), "under the threshold");
        // The first clone twice the rest or more: kept, the rest combined.
        assert_eq!(packs_to_combine(&packs(&[1, 100, 2, 3]), 4), ["p3", "p2", "p0"]);
        // Not so: all of them.
        assert_eq!(packs_to_combine(&packs(&[10, 6, 5, 1]), 4).len(), 4);
        // Never one alone.
        assert!(packs_to_combine(&packs(&[5]), 0).is_empty());
    }

    #[test]
    fn a_fetch_out_of_room_is_taken_to_need_its_pack_scaled_to_the_objects_announced() {
        let index = |objects| pack_index_bytes(objects);
        // Half the objects in 3 MiB: about 6.
        let max = 1 << 30;
        assert_eq!(fetch_needs(3 << 20, 50, 100, max), (6 << 20) + index(100));
        // All arrived (the index's write filled the disk): what arrived and the index.
        assert_eq!(fetch_needs(5 << 20, 100, 100, max), (5 << 20) + index(100));
        // No object whole yet (a large first one): never below what arrived.
        assert_eq!(fetch_needs(7 << 20, 0, 100, max), (7 << 20) + index(100));
        // Hostile counts (a server announces what it likes) neither overflow nor shrink it.
        assert_eq!(fetch_needs(u64::MAX, 1, u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(fetch_needs(10, 5, 1, max), 10 + index(1));
        // Nor take it past what a fetch may receive (REPO_MAX_FETCH_BYTES, where it stops
        // anyway) and the index of as many objects as that holds: 2^32-1 objects announced
        // made it ~120 GB (rev37-3).
        let hostile = fetch_needs(1 << 20, 10, u64::from(u32::MAX), 64 << 20);
        assert_eq!(hostile, (64 << 20) + index((64 << 20) / MIN_PACKED_OBJECT_BYTES + 1));
        assert!(hostile < 300 << 20, "{hostile}");
    }

    #[test]
    fn a_step_that_could_not_fit_with_every_idle_mirror_gone_makes_no_room() {
        // 24 MiB, a reserve of 1.2: 4 free and 12 in idle mirrors.
        let space = crate::workspace::DiskSpace { free: 4 << 20, size: 24 << 20, free_inodes: None, block: 4096 };
        assert!(could_fit(14 << 20, space, 12 << 20));
        assert!(!could_fit(15 << 20, space, 12 << 20), "16 free and idle, less the reserve");
        // An estimate past the whole disk (a hostile count of objects) fits no cache.
        assert!(!could_fit(u64::MAX, space, 12 << 20));
        assert!(!could_fit(30 << 20, space, 0));
    }

    #[test]
    fn a_fetch_gets_rounds_of_room_for_its_estimate_then_all_a_checkout_one() {
        // A checkout's need is measured: made once, and only as much.
        assert_eq!(room_to_make(true, Some(9), 1), Some(Room::Bytes { bytes: 9, at_least_one: false }));
        assert_eq!(room_to_make(true, Some(9), 2), None);
        assert_eq!(room_to_make(true, None, 1), Some(Room::All));
        // A fetch's is an estimate: at least one mirror a round, every idle one at the last.
        assert_eq!(room_to_make(false, Some(9), 1), Some(Room::Bytes { bytes: 9, at_least_one: true }));
        assert_eq!(room_to_make(false, Some(12), FETCH_ROOM_TRIES - 1), Some(Room::Bytes { bytes: 12, at_least_one: true }));
        assert_eq!(room_to_make(false, Some(12), FETCH_ROOM_TRIES), Some(Room::All));
        // Not known (full before the pack came): one mirror a round, then all.
        assert_eq!(room_to_make(false, None, 1), Some(Room::Bytes { bytes: 0, at_least_one: true }));
        assert_eq!(room_to_make(false, None, FETCH_ROOM_TRIES), Some(Room::All));
        assert_eq!(room_to_make(false, Some(12), FETCH_ROOM_TRIES + 1), None);
        assert_eq!(room_to_make(false, Some(12), 0), None);
    }

    #[test]
    fn room_for_a_job_is_made_from_idle_mirrors_oldest_first_never_its_own() {
        let all = vec![m("new", 50, 30, false), m("own", 50, 5, false), m("busy", 50, 1, true), m("old", 50, 10, false)];
        assert_eq!(idle_oldest_first(all, "own"), ["old", "new"]);
    }
}
