//! Which agent takes a job: one that fits it (the `agent_id` it names, every label it asks
//! for) and has a credit; of those, one holding the mirror of the job's repository when
//! any does (its checkout then needs no clone), then the one with most free slots (load
//! spread). Pure: the machine's dispatch ([`crate::machine`]) picks the job — callers in
//! turn, each caller's jobs in priority order — and asks this which agent.

use shared::placement::{Labels, Placement};
use std::collections::BTreeSet;

/// An agent that can take work now (ready, not paused, its login usable), as dispatch
/// sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub session: &'a str,
    pub agent_id: &'a str,
    pub labels: &'a Labels,
    pub mirrors: &'a BTreeSet<String>,
    pub credits: u32,
}

/// The candidate to send a job to, by index; `None` when no candidate with a credit fits.
/// `repo` is the name of the job's repository ([`shared::repo::RepoUrl::name`]).
pub fn choose(placement: &Placement, repo: Option<&str>, candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.credits > 0 && placement.fits(c.agent_id, c.labels))
        .max_by_key(|(_, c)| (repo.is_some_and(|r| c.mirrors.contains(r)), c.credits))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(text: &str) -> Labels {
        shared::placement::parse_labels(text).unwrap()
    }

    #[test]
    fn fit_first_then_mirror_then_free_slots() {
        let (gpu, cpu) = (labels("gpu=a100"), labels("gpu=none"));
        let (with, without): (BTreeSet<String>, BTreeSet<String>) = (["h/o/r".to_string()].into(), BTreeSet::new());
        let c = [
            Candidate { session: "s1", agent_id: "a", labels: &cpu, mirrors: &without, credits: 4 },
            Candidate { session: "s2", agent_id: "b", labels: &cpu, mirrors: &with, credits: 1 },
            Candidate { session: "s3", agent_id: "c", labels: &gpu, mirrors: &with, credits: 0 },
        ];
        let any = Placement::default();
        assert_eq!(choose(&any, None, &c), Some(0), "most free slots");
        assert_eq!(choose(&any, Some("h/o/r"), &c), Some(1), "the mirror first");
        assert_eq!(choose(&any, Some("h/o/other"), &c), Some(0));
        let needs_gpu = Placement { labels: gpu.clone(), ..Default::default() };
        assert_eq!(choose(&needs_gpu, None, &c), None, "the only GPU agent has no credit");
        let on_a = Placement { agent_id: Some("a".into()), ..Default::default() };
        assert_eq!(choose(&on_a, Some("h/o/r"), &c), Some(0), "agent_id over the mirror");
    }

    proptest! {
        /// Affinity and load never win over a credit or a label: the agent chosen always
        /// has a credit and fits; and when none is chosen, none fits with a credit.
        #[test]
        fn the_choice_has_credit_and_fits(
            agents in proptest::collection::vec((0u32..3, 0u8..4, any::<bool>()), 0..8),
            need in 0u8..5,
            named in proptest::option::of(0usize..8),
            repo in any::<bool>(),
        ) {
            let sets: Vec<Labels> = (0..4u8).map(|k| labels(&format!("k={k}"))).collect();
            let mirror: BTreeSet<String> = ["r".to_string()].into();
            let none = BTreeSet::new();
            let ids: Vec<String> = (0..agents.len()).map(|i| format!("a{i}")).collect();
            let c: Vec<Candidate> = agents.iter().enumerate().map(|(i, (credits, l, holds))| Candidate {
                session: &ids[i], agent_id: &ids[i], labels: &sets[*l as usize],
                mirrors: if *holds { &mirror } else { &none }, credits: *credits,
            }).collect();
            let placement = Placement {
                labels: if need < 4 { sets[need as usize].clone() } else { Labels::new() },
                agent_id: named.map(|i| format!("a{i}")),
                ..Default::default()
            };
            let fits = |x: &Candidate| x.credits > 0 && placement.fits(x.agent_id, x.labels);
            match choose(&placement, repo.then_some("r"), &c) {
                Some(i) => {
                    prop_assert!(fits(&c[i]));
                    if repo && c.iter().any(|x| fits(x) && x.mirrors.contains("r")) {
                        prop_assert!(c[i].mirrors.contains("r"), "a fitting agent holding the mirror was passed over");
                    }
                }
                None => prop_assert!(!c.iter().any(fits)),
            }
        }
    }
}
