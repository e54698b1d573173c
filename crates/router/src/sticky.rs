//! Sticky assignment: a request's routing key hashed to a stable point of the split.
//!
//! The hash is part of the wire contract: every gateway, in every process and every
//! release, must send a key to the same version for the same weights. Changing
//! [`sticky_hash`] (or the salt) reshuffles every user, so it is pinned by golden tests.

use crate::attributes::{RequestAttributes, Source};

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Never occurs in UTF-8, so `(salt, key)` pairs cannot run into each other.
const SEPARATOR: u8 = 0xff;

/// The stable 64-bit hash of `(salt, key)` that places a key on the split.
///
/// FNV-1a 64 over the salt's bytes, a `0xff` byte and the key's bytes, then the
/// splitmix64 finaliser, which spreads FNV's weak high bits over the whole word. The
/// key's point on `[0, 1)` is the hash divided by 2^64; see [`Route::pick_at_fraction`].
///
/// [`Route::pick_at_fraction`]: crate::Route::pick_at_fraction
pub fn sticky_hash(salt: &str, key: &str) -> u64 {
    let fnv = [salt.as_bytes(), &[SEPARATOR], key.as_bytes()]
        .into_iter()
        .flatten()
        .fold(FNV_OFFSET_BASIS, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        });
    splitmix64_finalise(fnv)
}

fn splitmix64_finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A compiled sticky setting: where the key comes from and the salt it is hashed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sticky {
    source: Source,
    salt: Box<str>,
}

impl Sticky {
    pub(crate) fn new(source: Source, salt: &str) -> Self {
        Self {
            source,
            salt: salt.into(),
        }
    }

    /// The request's routing key, or `None` when it has none (an empty value counts as none).
    pub(crate) fn key<'a, A: RequestAttributes + ?Sized>(
        &self,
        attributes: &'a A,
    ) -> Option<&'a str> {
        self.source.read(attributes).filter(|key| !key.is_empty())
    }

    /// The request's hashed routing key, or `None` when it has no key.
    pub(crate) fn hash<A: RequestAttributes + ?Sized>(&self, attributes: &A) -> Option<u64> {
        self.key(attributes).map(|key| sticky_hash(&self.salt, key))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use rand::RngCore;

    use super::*;
    use crate::attributes::Attributes;
    use crate::spec::{RouteSpec, StickySpec, VersionWeight};
    use crate::{DecisionReason, RouteTable};

    const KEYS: usize = 10_000;

    /// An RNG that fails the test if drawn from: sticky decisions must not draw.
    struct NoRng;

    impl RngCore for NoRng {
        fn next_u32(&mut self) -> u32 {
            panic!("a sticky decision drew from the RNG")
        }

        fn next_u64(&mut self) -> u64 {
            panic!("a sticky decision drew from the RNG")
        }

        fn fill_bytes(&mut self, _dest: &mut [u8]) {
            panic!("a sticky decision drew from the RNG")
        }
    }

    /// `demo` over versions `v0`, `v1`, ... with `weights`, keyed on header `x-user-id`.
    fn table(weights: &[u32], salt: Option<&str>) -> RouteTable {
        let versions: Vec<VersionWeight> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| VersionWeight {
                version: format!("v{i}"),
                weight,
            })
            .collect();
        let inventory: BTreeMap<String, BTreeSet<String>> = [(
            "demo".to_owned(),
            versions.iter().map(|v| v.version.clone()).collect(),
        )]
        .into();
        let spec = RouteSpec {
            sticky: Some(StickySpec {
                header: Some("X-User-Id".into()),
                salt: salt.map(str::to_owned),
                ..StickySpec::default()
            }),
            ..RouteSpec::weighted(versions)
        };
        RouteTable::compile(&[("demo".to_owned(), spec)].into(), &inventory)
            .expect("test weights have a positive sum")
    }

    /// The version `key` is assigned; fails the test unless it was a sticky decision.
    fn assign<'t>(table: &'t RouteTable, key: &str) -> &'t str {
        let attributes = Attributes::new().with_header("x-user-id", key);
        let decision = table
            .resolve_with("demo", None, &attributes, &mut NoRng)
            .expect("demo is routed");
        assert_eq!(decision.reason, DecisionReason::Sticky);
        decision.version
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..KEYS).map(|i| format!("user-{i}"))
    }

    /// Asserts that moving from `before` to `after` moves no key out of `v0`.
    fn check_no_key_leaves_v0(before: &[u32], after: &[u32]) -> Result<(), String> {
        let (before_table, after_table) = (table(before, None), table(after, None));
        for key in keys() {
            if assign(&before_table, &key) == "v0" && assign(&after_table, &key) != "v0" {
                return Err(format!("{key} left v0 going from {before:?} to {after:?}"));
            }
        }
        Ok(())
    }

    fn positive_weights() -> impl Strategy<Value = Vec<u32>> {
        prop::collection::vec(0u32..1000, 1..=5)
            .prop_filter("at least one positive weight", |w| w.iter().any(|&x| x > 0))
    }

    #[test]
    fn raising_the_canary_from_10_to_50_percent_only_moves_keys_in() {
        let (before, after) = (table(&[10, 90], None), table(&[50, 50], None));
        let (mut canary_before, mut canary_after) = (0, 0);
        for key in keys() {
            let (was, is) = (assign(&before, &key), assign(&after, &key));
            assert!(was != "v0" || is == "v0", "{key} left the canary");
            canary_before += usize::from(was == "v0");
            canary_after += usize::from(is == "v0");
        }
        assert!((800..=1_200).contains(&canary_before), "{canary_before}");
        assert!((4_800..=5_200).contains(&canary_after), "{canary_after}");
    }

    #[test]
    fn key_shares_follow_the_weights() {
        for weights in [
            &[10, 90][..],
            &[50, 50],
            &[70, 20, 10],
            &[1, 1, 1],
            &[0, 5, 0, 5],
            &[1, 99],
        ] {
            let table = table(weights, None);
            let total: u32 = weights.iter().sum();
            for (i, &weight) in weights.iter().enumerate() {
                let version = format!("v{i}");
                let count = keys().filter(|key| assign(&table, key) == version).count();
                let observed = count as f64 / KEYS as f64;
                let expected = f64::from(weight) / f64::from(total);
                assert!(
                    (observed - expected).abs() <= 0.02,
                    "weights {weights:?}: {version} expected {expected:.3}, got {observed:.3}"
                );
            }
        }
    }

    #[test]
    fn salt_defaults_to_the_model_name_and_reshuffles_keys() {
        let weights = [50, 50];
        let (default, named, other) = (
            table(&weights, None),
            table(&weights, Some("demo")),
            table(&weights, Some("exp-7")),
        );
        let route = other.route("demo").expect("demo is routed");
        let mut moved = 0;
        for key in keys() {
            assert_eq!(assign(&default, &key), assign(&named, &key));
            let salted = assign(&other, &key);
            assert_eq!(salted, route.pick_at_fraction(sticky_hash("exp-7", &key)));
            moved += usize::from(salted != assign(&default, &key));
        }
        // Independent 50/50 assignments disagree about half the time.
        assert!((4_500..=5_500).contains(&moved), "{moved}");
    }

    #[test]
    fn parameter_keys_are_sticky_too() {
        let spec = RouteSpec {
            sticky: Some(StickySpec {
                parameter: Some("user".into()),
                ..StickySpec::default()
            }),
            ..RouteSpec::weighted(vec![
                VersionWeight {
                    version: "1".into(),
                    weight: 1,
                },
                VersionWeight {
                    version: "2".into(),
                    weight: 1,
                },
            ])
        };
        let inventory: BTreeMap<String, BTreeSet<String>> =
            [("demo".to_owned(), ["1", "2"].map(str::to_owned).into())].into();
        let table = RouteTable::compile(&[("demo".to_owned(), spec)].into(), &inventory)
            .expect("valid spec");
        let route = table.route("demo").expect("demo is routed");
        for key in keys().take(100) {
            let attributes = Attributes::new().with_parameter("user", key.clone());
            let decision = table.resolve_with("demo", None, &attributes, &mut NoRng);
            assert_eq!(
                decision.map(|d| (d.version, d.reason)),
                Ok((
                    route.pick_at_fraction(sticky_hash("demo", &key)),
                    DecisionReason::Sticky
                ))
            );
        }
    }

    #[test]
    fn a_route_reads_its_sticky_key_where_the_config_says() {
        let spec = |sticky: StickySpec| RouteSpec {
            sticky: Some(sticky),
            ..RouteSpec::weighted(vec![VersionWeight {
                version: "1".into(),
                weight: 1,
            }])
        };
        let by_header = spec(StickySpec {
            header: Some("X-User-Id".into()),
            ..StickySpec::default()
        });
        let unkeyed = RouteSpec::weighted(vec![VersionWeight {
            version: "1".into(),
            weight: 1,
        }]);
        let inventory: BTreeMap<String, BTreeSet<String>> = [
            ("demo".to_owned(), ["1"].map(str::to_owned).into()),
            ("plain".to_owned(), ["1"].map(str::to_owned).into()),
        ]
        .into();
        let table = RouteTable::compile(
            &[
                ("demo".to_owned(), by_header),
                ("plain".to_owned(), unkeyed),
            ]
            .into(),
            &inventory,
        )
        .expect("valid spec");
        let alice = Attributes::new().with_header("x-user-id", "alice");
        let demo = table.route("demo").expect("routed");
        assert_eq!(
            demo.sticky_key(&alice),
            Some("alice"),
            "names are case-insensitive"
        );
        let empty = Attributes::new().with_header("x-user-id", "");
        assert_eq!(demo.sticky_key(&empty), None, "an empty key is none");
        assert_eq!(
            table.route("plain").expect("routed").sticky_key(&alice),
            None
        );
    }

    proptest! {
        #[test]
        fn the_same_key_always_gets_the_same_version(
            weights in positive_weights(),
            keys in prop::collection::vec("[a-zA-Z0-9@.-]{1,24}", 1..200),
        ) {
            // Two tables compiled apart, as in two gateway processes.
            let (first, second) = (table(&weights, None), table(&weights, None));
            let route = first.route("demo").expect("demo is routed");
            for key in &keys {
                let version = assign(&first, key);
                prop_assert_eq!(assign(&first, key), version);
                prop_assert_eq!(assign(&second, key), version);
                prop_assert!(route.weight(version) > Some(0), "{} got {}", key, version);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn raising_the_first_weight_never_moves_a_key_out(
            a in 0u32..1_000,
            raise in 1u32..1_000,
            other in 0u32..1_000,
        ) {
            prop_assume!(a + other > 0);
            check_no_key_leaves_v0(&[a, other], &[a + raise, other])
                .map_err(TestCaseError::fail)?;
        }

        #[test]
        fn lowering_the_others_never_moves_a_key_out_of_the_first(
            weights in positive_weights(),
            cut in 0.0f64..1.0,
        ) {
            // Scaling the rest down is raising the first version's share, too.
            let lowered: Vec<u32> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| if i == 0 { w } else { (f64::from(w) * cut) as u32 })
                .collect();
            prop_assume!(lowered.iter().any(|&w| w > 0));
            check_no_key_leaves_v0(&weights, &lowered).map_err(TestCaseError::fail)?;
        }
    }

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        })
    }

    #[test]
    fn fnv_and_splitmix_match_their_reference_values() {
        // FNV-1a 64 test vectors from the reference implementation.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        // splitmix64 seeded with 0: its first output finalises the golden-gamma step.
        assert_eq!(
            splitmix64_finalise(0x9e37_79b9_7f4a_7c15),
            0xe220_a839_7b1d_cdaf
        );
        assert_eq!(
            sticky_hash("demo", "alice"),
            splitmix64_finalise(fnv1a(b"demo\xffalice"))
        );
    }

    #[test]
    fn hash_is_pinned_because_it_is_part_of_the_wire_contract() {
        // If this fails, every sticky user would move: do not update the values
        // unless reshuffling all users is the intent.
        assert_eq!(sticky_hash("demo", "alice"), GOLDEN_DEMO_ALICE);
        assert_eq!(sticky_hash("", ""), GOLDEN_EMPTY);
        assert_eq!(sticky_hash("iris", "user-42"), GOLDEN_IRIS_USER_42);
    }

    // Computed independently (Python) from the definition in `sticky_hash`'s docs.
    const GOLDEN_DEMO_ALICE: u64 = 0x76bf_567f_d67d_513a;
    const GOLDEN_EMPTY: u64 = 0x4f2d_b50f_1240_40cd;
    const GOLDEN_IRIS_USER_42: u64 = 0xe969_daf8_694c_a099;

    #[test]
    fn separator_keeps_salt_and_key_apart() {
        assert_ne!(sticky_hash("ab", "c"), sticky_hash("a", "bc"));
        assert_ne!(sticky_hash("demo", "alice"), sticky_hash("demo2", "alice"));
    }

    #[test]
    fn missing_or_empty_keys_have_no_hash() {
        let sticky = Sticky::new(Source::header("X-User-Id"), "demo");
        assert_eq!(sticky.hash(&()), None);
        assert_eq!(
            sticky.hash(&Attributes::new().with_header("x-user-id", "")),
            None
        );
        assert_eq!(
            sticky.hash(&Attributes::new().with_header("x-user-id", "alice")),
            Some(sticky_hash("demo", "alice"))
        );
    }
}
