//! One model's compiled route: its weighted split, match rules and sticky key, and how
//! a version is picked from them.

use rand::Rng;

use crate::attributes::RequestAttributes;
use crate::rules::Rule;
use crate::spec::RouteSpec;
use crate::sticky::Sticky;
use crate::table::{Decision, DecisionReason};

/// One model's compiled route: its versions in config order and their traffic segments,
/// plus the match rules and sticky key that choose among them.
///
/// The versions' weights are laid out as consecutive segments of `0..total`, starting
/// at 0 in config order, so the first version (the canary, by convention) owns the
/// segment at the start and raising its weight only moves traffic into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    slots: Vec<Slot>,
    /// Sum of all weights; positive unless the route is pinned-only.
    total: u64,
    /// Tried in config order; each names a slot of `slots`.
    rules: Vec<Rule>,
    sticky: Option<Sticky>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    version: Box<str>,
    weight: u32,
    /// Exclusive end of this version's segment: the sum of its and all earlier weights.
    end: u64,
}

/// Why a list of weights cannot be compiled into a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightError {
    /// No version has a positive weight (or the list is empty).
    NoPositiveWeight,
    /// The weights do not sum within `u64`.
    Overflow,
}

impl Route {
    /// Lays out the weights of `spec`, with no rules and no sticky key; checks only the
    /// weights, not the version names.
    pub(crate) fn new(spec: &RouteSpec) -> Result<Self, WeightError> {
        let mut total: u64 = 0;
        let mut slots = Vec::with_capacity(spec.versions.len());
        for entry in &spec.versions {
            total = total
                .checked_add(u64::from(entry.weight))
                .ok_or(WeightError::Overflow)?;
            slots.push(Slot {
                version: entry.version.as_str().into(),
                weight: entry.weight,
                end: total,
            });
        }
        if total == 0 && !spec.pinned_only {
            return Err(WeightError::NoPositiveWeight);
        }
        Ok(Self {
            slots,
            total,
            rules: Vec::new(),
            sticky: None,
        })
    }

    /// Adds the compiled rules and sticky key; every rule's slot must index `versions()`.
    pub(crate) fn with_matching(self, rules: Vec<Rule>, sticky: Option<Sticky>) -> Self {
        Self {
            rules,
            sticky,
            ..self
        }
    }

    /// The request's sticky routing key as the route reads it (its header or
    /// parameter), or `None` when the route has none or the request carries none.
    pub fn sticky_key<'a, A: RequestAttributes + ?Sized>(
        &self,
        attributes: &'a A,
    ) -> Option<&'a str> {
        self.sticky.as_ref()?.key(attributes)
    }

    /// The versions and their weights, in config order (zero-weight versions included).
    pub fn versions(&self) -> impl Iterator<Item = (&str, u32)> {
        self.slots.iter().map(|slot| (&*slot.version, slot.weight))
    }

    /// Sum of all weights; 0 only for a pinned-only route (see
    /// [`RouteSpec::pinned_only`]).
    pub fn total_weight(&self) -> u64 {
        self.total
    }

    /// Whether unpinned requests have no version to go to (every weight is 0).
    pub fn is_pinned_only(&self) -> bool {
        self.total == 0
    }

    /// The weight of `version`, or `None` if it is not part of this route.
    pub fn weight(&self, version: &str) -> Option<u32> {
        self.slot(version).map(|slot| slot.weight)
    }

    /// The fraction of unpinned traffic `version` receives, or `None` if it is not part of this route.
    pub fn share(&self, version: &str) -> Option<f64> {
        self.weight(version).map(|weight| match self.total {
            0 => 0.0,
            total => f64::from(weight) / total as f64,
        })
    }

    /// The version owning the segment at `point` in `[0, 1)`; values outside (and NaN) clamp to the ends.
    ///
    /// # Panics
    ///
    /// On a pinned-only route, which has no segments; so do the other `pick` methods.
    pub fn pick_at(&self, point: f64) -> &str {
        // `as` saturates: NaN and negative values become 0, too large ones u64::MAX.
        let offset = (point * self.total as f64) as u64;
        // `total` is positive (checked in `new`), so `total - 1` cannot underflow.
        self.version_at(offset.min(self.total - 1))
    }

    /// The version owning the point `fraction / 2^64` of `[0, 1)`; sticky keys are placed with it.
    ///
    /// The same layout as [`pick_at`](Self::pick_at), in exact integer arithmetic: a
    /// point in the first version's segment stays there whenever its weight is raised
    /// (or the others' lowered), with no rounding at the segment ends.
    pub fn pick_at_fraction(&self, fraction: u64) -> &str {
        // fraction < 2^64, so fraction * total / 2^64 < total and fits in u64.
        let offset = (u128::from(fraction) * u128::from(self.total)) >> 64;
        self.version_at(offset as u64)
    }

    /// Picks a version at random, each with probability weight / total.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> &str {
        // Integer draw: every unit of weight is exactly equally likely.
        self.version_at(rng.random_range(0..self.total))
    }

    /// Decides an unpinned request: the first matching rule, else the sticky key's
    /// segment when the request has a key, else a weighted draw with `rng`; `None`
    /// when no rule matches a pinned-only route.
    pub(crate) fn decide<A, R>(&self, attributes: &A, rng: &mut R) -> Option<Decision<'_>>
    where
        A: RequestAttributes + ?Sized,
        R: Rng + ?Sized,
    {
        for (index, rule) in self.rules.iter().enumerate() {
            if let Some(slot) = rule.apply(attributes) {
                return Some(Decision {
                    // Rule slots index `slots`: validation resolves each rule's version
                    // to its position in the same version list `slots` is built from.
                    version: &self.slots[slot].version,
                    reason: DecisionReason::Rule(index),
                });
            }
        }
        if self.is_pinned_only() {
            return None;
        }
        if let Some(hash) = self.sticky.as_ref().and_then(|s| s.hash(attributes)) {
            return Some(Decision {
                version: self.pick_at_fraction(hash),
                reason: DecisionReason::Sticky,
            });
        }
        Some(Decision {
            version: self.pick(rng),
            reason: DecisionReason::Weighted,
        })
    }

    /// Looks up `version` in this route, returning the route's own copy of the name.
    pub(crate) fn find(&self, version: &str) -> Option<&str> {
        self.slot(version).map(|slot| &*slot.version)
    }

    fn slot(&self, version: &str) -> Option<&Slot> {
        self.slots.iter().find(|slot| &*slot.version == version)
    }

    fn version_at(&self, offset: u64) -> &str {
        // `offset < total` and the last slot ends at `total`, so some slot ends after
        // `offset` and the index is in bounds. A zero-weight slot ends where the one
        // before it does, so it is never the first to end after `offset`.
        let index = self.slots.partition_point(|slot| slot.end <= offset);
        &self.slots[index].version
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;
    use crate::spec::VersionWeight;

    const PICKS: usize = 100_000;

    /// A route over versions `v0`, `v1`, ... with the given weights.
    fn route(weights: &[u32]) -> Route {
        let spec = RouteSpec::weighted(
            weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| VersionWeight {
                    version: format!("v{i}"),
                    weight,
                })
                .collect(),
        );
        Route::new(&spec).expect("test weights have a positive sum")
    }

    fn index(route: &Route, version: &str) -> usize {
        route
            .versions()
            .position(|(v, _)| v == version)
            .expect("picked versions belong to the route")
    }

    fn counts(route: &Route, seed: u64, picks: usize) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut counts = vec![0; route.versions().count()];
        for _ in 0..picks {
            counts[index(route, route.pick(&mut rng))] += 1;
        }
        counts
    }

    /// Checks that `PICKS` seeded picks land within one percentage point of each share.
    fn check_shares(weights: &[u32], seed: u64) -> Result<(), String> {
        let route = route(weights);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        for (i, count) in counts(&route, seed, PICKS).into_iter().enumerate() {
            let expected = f64::from(weights[i]) / total as f64;
            let observed = count as f64 / PICKS as f64;
            if (observed - expected).abs() > 0.01 {
                return Err(format!(
                    "weights {weights:?}: v{i} expected {expected:.4}, observed {observed:.4}"
                ));
            }
        }
        Ok(())
    }

    fn positive_weights() -> impl Strategy<Value = Vec<u32>> {
        prop::collection::vec(0u32..1000, 1..=6)
            .prop_filter("at least one positive weight", |w| w.iter().any(|&x| x > 0))
    }

    #[test]
    fn picks_follow_configured_shares() {
        for weights in [
            &[90, 10][..],
            &[1, 1, 1],
            &[70, 20, 10, 0],
            &[1, 99],
            &[0, 5, 0, 5],
        ] {
            check_shares(weights, 7).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn extreme_weights_do_not_overflow() {
        check_shares(&[u32::MAX; 3], 11).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            route(&[u32::MAX; 3]).total_weight(),
            3 * u64::from(u32::MAX)
        );
    }

    #[test]
    fn shares_are_normalised_weights() {
        let route = route(&[70, 20, 10, 0]);
        assert_eq!(route.share("v0"), Some(0.7));
        assert_eq!(route.share("v3"), Some(0.0));
        assert_eq!(route.share("v4"), None);
        assert_eq!(route.weight("v1"), Some(20));
        assert_eq!(
            route.versions().collect::<Vec<_>>(),
            [("v0", 70), ("v1", 20), ("v2", 10), ("v3", 0)]
        );
    }

    #[test]
    fn no_positive_weight_is_rejected() {
        let spec = RouteSpec::weighted(vec![VersionWeight {
            version: "1".into(),
            weight: 0,
        }]);
        assert_eq!(Route::new(&spec), Err(WeightError::NoPositiveWeight));
        assert_eq!(
            Route::new(&RouteSpec::default()),
            Err(WeightError::NoPositiveWeight)
        );
    }

    #[test]
    fn pick_at_lays_segments_out_in_config_order() {
        let route = route(&[0, 70, 20, 10, 0]);
        assert_eq!(route.pick_at(0.0), "v1");
        assert_eq!(route.pick_at(0.699), "v1");
        assert_eq!(route.pick_at(0.7), "v2");
        assert_eq!(route.pick_at(0.9), "v3");
        assert_eq!(route.pick_at(0.999_999), "v3");
    }

    #[test]
    fn pick_at_clamps_out_of_range_points() {
        let route = route(&[0, 3, 1, 0]);
        assert_eq!(route.pick_at(-1.0), "v1");
        assert_eq!(route.pick_at(f64::NAN), "v1");
        assert_eq!(route.pick_at(1.0), "v2");
        assert_eq!(route.pick_at(f64::INFINITY), "v2");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn random_weights_get_their_shares(weights in positive_weights(), seed in any::<u64>()) {
            check_shares(&weights, seed).map_err(TestCaseError::fail)?;
        }
    }

    proptest! {
        #[test]
        fn zero_weight_versions_get_no_traffic(
            weights in positive_weights(),
            seed in any::<u64>(),
            points in prop::collection::vec(0.0f64..1.0, 100),
        ) {
            let route = route(&weights);
            for (i, count) in counts(&route, seed, 2_000).into_iter().enumerate() {
                if weights[i] == 0 {
                    prop_assert_eq!(count, 0, "v{} has weight 0", i);
                }
            }
            for point in points {
                prop_assert!(route.weight(route.pick_at(point)) > Some(0));
            }
        }

        #[test]
        fn pick_at_is_monotone(weights in positive_weights(), a in 0.0f64..1.0, b in 0.0f64..1.0) {
            let route = route(&weights);
            let (p, q) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(index(&route, route.pick_at(p)) <= index(&route, route.pick_at(q)));
            let first_positive = weights.iter().position(|&w| w > 0).map(|i| format!("v{i}"));
            prop_assert_eq!(Some(route.pick_at(0.0).to_owned()), first_positive);
        }

        #[test]
        fn raising_the_first_weight_only_moves_points_into_it(
            weights in positive_weights(),
            raise in 1u32..1000,
            point in 0.0f64..1.0,
        ) {
            let before = route(&weights);
            let mut raised = weights.clone();
            raised[0] += raise;
            let after = route(&raised);
            if before.pick_at(point) == "v0" {
                prop_assert_eq!(after.pick_at(point), "v0");
            }
        }
    }
}
