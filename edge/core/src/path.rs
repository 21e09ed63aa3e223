//! How a request's path names its pool and its route, once for both hosts.
//!
//! A leading run of slashes is one slash: a client whose base URL ends in `/`
//! (`CLAUDE_RUNNER_URL=https://edge/`, or `…/pool/gpu/`) sends `//execute`, and is served
//! `/execute`. Nothing else is folded or decoded: a slash inside the path (`/jobs//x`,
//! `/pool//gpu`) stays an empty segment, which no route has; `%2F` stays three characters
//! of one segment; `.` and `..` are plain segments (no route and no pool is named so; on
//! the Worker the platform's URL parser has resolved them before, as WHATWG URLs do). So
//! a folded path reaches exactly what its single-slash form reaches, and no pool prefix
//! can be made out of anything but the path's first two segments.

use shared::contract::ApiError;
use shared::ids::{DEFAULT_POOL, MAX_POOL_NAME};

/// `path` with its leading run of slashes folded to one (`//execute` → `/execute`).
pub fn fold(path: &str) -> &str {
    let rest = path.trim_start_matches('/');
    if rest.len() + 1 < path.len() {
        &path[path.len() - rest.len() - 1..]
    } else {
        path
    }
}

/// The route's segments: the path folded at the front, without a trailing `/`, split
/// (`//jobs/x/` → `["jobs", "x"]`; `/` and `//` → none).
pub fn segments(path: &str) -> Vec<&str> {
    fold(path).trim_end_matches('/').split('/').skip(1).collect()
}

/// Splits `/pool/{name}/rest` into the pool's name and the path its pool sees (`/rest`,
/// or `/` when nothing follows). Any other path belongs to the default pool unchanged.
/// The Worker serves pools; the native edge serves the default pool alone.
/// `/pool/default/…` is a 404: the default pool is the one without a prefix (`POOLS` may
/// not list it), and the native edge, which has no `/pool/…` route, answers it 404 too.
pub fn pool_of(path: &str) -> Result<(String, String), ApiError> {
    let path = fold(path);
    let rest = match path.strip_prefix("/pool") {
        Some("") => "",
        Some(rest) if rest.starts_with('/') => &rest[1..],
        _ => return Ok((DEFAULT_POOL.to_string(), path.to_string())),
    };
    let (name, inner) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if !shared::ids::plain_id(name, MAX_POOL_NAME) {
        return Err(ApiError::invalid(format!(
            "bad pool name in {}: a pool name is 1-{MAX_POOL_NAME} characters of A-Z, a-z, 0-9, _ and - \
             (e.g. /pool/spark/execute); leave the prefix out to use the default pool",
            shared::text::truncate(path, 200)
        )));
    }
    if name == DEFAULT_POOL {
        return Err(ApiError::not_found(&format!(
            "pool `{DEFAULT_POOL}` under /pool/ (the default pool is the one without a prefix: /health, not /pool/{DEFAULT_POOL}/health)"
        )));
    }
    Ok((name.to_string(), inner.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::contract::ErrorCode;

    #[test]
    fn only_the_leading_run_of_slashes_folds() {
        for (raw, folded) in [
            ("/execute", "/execute"),
            ("//execute", "/execute"),
            ("////health/", "/health/"),
            ("//", "/"),
            ("/", "/"),
            ("", ""),
            ("/jobs//x", "/jobs//x"),
            ("//%2Fexecute", "/%2Fexecute"),
        ] {
            assert_eq!(fold(raw), folded, "{raw}");
        }
        assert_eq!(segments("//jobs/x/"), ["jobs", "x"]);
        assert!(segments("//").is_empty() && segments("/").is_empty());
        assert_eq!(segments("/jobs//x"), ["jobs", "", "x"]);
    }

    #[test]
    fn paths_without_a_prefix_go_to_the_default_pool() {
        assert_eq!(pool_of("/execute").unwrap(), ("default".into(), "/execute".into()));
        assert_eq!(pool_of("//execute").unwrap(), ("default".into(), "/execute".into()));
        assert_eq!(pool_of("/").unwrap(), ("default".into(), "/".into()));
        assert_eq!(pool_of("/poolside/x").unwrap(), ("default".into(), "/poolside/x".into()));
        // Encoded slashes are not a prefix.
        assert_eq!(pool_of("/pool%2Fgpu/execute").unwrap(), ("default".into(), "/pool%2Fgpu/execute".into()));
    }

    #[test]
    fn a_prefix_names_the_pool_and_is_stripped() {
        assert_eq!(pool_of("/pool/spark/execute").unwrap(), ("spark".into(), "/execute".into()));
        assert_eq!(pool_of("//pool/spark/execute").unwrap(), ("spark".into(), "/execute".into()));
        // A pooled base URL ending in `/`: the pool's path keeps its slashes, and is folded
        // where it is routed (`segments`).
        assert_eq!(pool_of("/pool/spark//execute").unwrap(), ("spark".into(), "//execute".into()));
        assert_eq!(pool_of("/pool/a_b-9/jobs/1").unwrap(), ("a_b-9".into(), "/jobs/1".into()));
        assert_eq!(pool_of("/pool/spark").unwrap(), ("spark".into(), "/".into()));
        assert_eq!(pool_of("/pool/spark/").unwrap(), ("spark".into(), "/".into()));
        assert_eq!(pool_of(&format!("/pool/{}/health", "x".repeat(64))).unwrap().1, "/health");
        // A second prefix inside a pool is no route of that pool, never another pool.
        assert_eq!(segments(&pool_of("/pool/a//pool/b/execute").unwrap().1), ["pool", "b", "execute"]);
    }

    /// The default pool has no prefix: the Worker served `/pool/default/…` as it, the
    /// native edge (no `/pool/…` route) answered 404.
    #[test]
    fn the_default_pool_under_a_prefix_is_404() {
        for path in ["/pool/default", "/pool/default/", "/pool/default/health", "//pool/default/execute"] {
            let err = pool_of(path).unwrap_err();
            assert_eq!((err.status, err.body.error_code), (404, ErrorCode::NotFound), "{path}");
            assert!(err.body.error.contains("without a prefix"), "{}", err.body.error);
        }
    }

    #[test]
    fn bad_pool_names_are_400() {
        for path in ["/pool", "/pool/", "/pool//execute", "//pool//gpu/x", "//pool/../", "/pool/./x", "/pool/a.b/execute", "/pool/%20/x", "/pool/ü/x"] {
            let err = pool_of(path).unwrap_err();
            assert_eq!(err.status, 400, "{path}");
            assert_eq!(err.body.error_code, ErrorCode::InvalidRequest);
        }
        assert!(pool_of(&format!("/pool/{}/health", "x".repeat(65))).is_err());
    }
}
