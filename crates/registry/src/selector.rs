//! Label selection, written once for every kind that selects workloads: a
//! Service's `selector`, a ServiceEntry's `workloadSelector`, a
//! DestinationRule subset's `labels`, and the `selector.matchLabels` of
//! PeerAuthentication and AuthorizationPolicy.
//!
//! This module owns the match itself. What an absent or empty selector means
//! differs by kind (a Service without one selects no workload, a
//! PeerAuthentication without one is namespace-wide) and is decided where the
//! selector is read: the join (`build`) and the policy lookups (`policy`).

use std::collections::BTreeMap;

/// A workload's labels, or the labels a selector asks for.
pub type Labels = BTreeMap<String, String>;

/// An equality-based label selector (Kubernetes' `matchLabels`): it selects
/// labels that hold every one of its own with the same value. An absent or
/// empty selector selects every set of labels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selector<'a>(Option<&'a Labels>);

impl<'a> Selector<'a> {
    /// The selector asking for `labels`; `None` is the empty selector.
    pub fn new(labels: Option<&'a Labels>) -> Selector<'a> {
        Selector(labels)
    }

    /// Whether the selector asks for no label (and so selects everything).
    pub fn is_empty(&self) -> bool {
        self.0.is_none_or(BTreeMap::is_empty)
    }

    /// Whether `labels` hold every label of the selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0
            .into_iter()
            .flatten()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_selector_label_must_be_present_with_its_value() {
        let workload = labels(&[("app", "web"), ("version", "v1")]);
        let app = labels(&[("app", "web")]);
        assert!(Selector::new(Some(&app)).matches(&workload));
        let both = labels(&[("app", "web"), ("version", "v1")]);
        assert!(Selector::new(Some(&both)).matches(&workload));
        let other = labels(&[("app", "web"), ("version", "v2")]);
        assert!(!Selector::new(Some(&other)).matches(&workload));
        let missing = labels(&[("tier", "data")]);
        assert!(!Selector::new(Some(&missing)).matches(&workload));
        assert!(!Selector::new(Some(&app)).matches(&Labels::new()));
    }

    #[test]
    fn an_empty_selector_selects_everything() {
        let empty = Labels::new();
        for selector in [Selector::new(None), Selector::new(Some(&empty))] {
            assert!(selector.is_empty());
            assert!(selector.matches(&labels(&[("app", "web")])));
            assert!(selector.matches(&Labels::new()));
        }
        assert!(!Selector::new(Some(&labels(&[("app", "web")]))).is_empty());
    }
}
