//! Drift tracking through `aviary serve`: a demo version whose card asks for drift
//! captures its reference from the first 1,000 rows of traffic; rows from the same
//! distribution leave every input feature at `aviary_drift 0` on `/metrics`; once one
//! feature's values move by half a standard deviation, that feature, and only it among
//! the inputs, shows drift.

mod support;

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng, rngs::SmallRng};
use support::*;

/// Means and standard deviations of the four iris-like features.
const MEAN: [f64; 4] = [5.8, 3.0, 3.8, 1.2];
const SD: [f64; 4] = [0.8, 0.4, 1.7, 0.7];
const FEATURES: [&str; 4] = ["sepal_length", "sepal_width", "petal_length", "petal_width"];

/// A standard normal value (Box-Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let (u, v): (f64, f64) = (rng.random(), rng.random());
    (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// `requests` requests of 10 rows each, feature `c` shifted by `shift[c]` SDs.
fn send(addr: &str, rng: &mut SmallRng, requests: usize, shift: [f64; 4]) {
    runtime().block_on(async {
        let mut client = client(connect(addr).await);
        for _ in 0..requests {
            let rows: Vec<[f32; 4]> = (0..10)
                .map(|_| {
                    std::array::from_fn(|c| (MEAN[c] + SD[c] * (normal(rng) + shift[c])) as f32)
                })
                .collect();
            let request = demo_rows("1", &rows);
            client.model_infer(request).await.expect("served");
        }
    });
}

/// `aviary_drift` of each input feature of demo 1.
fn input_verdicts(served: &mut Served) -> BTreeMap<String, f64> {
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    FEATURES
        .iter()
        .filter_map(|f| {
            let key = format!(
                "aviary_drift{{model=\"demo\",version=\"1\",side=\"input\",tensor=\"input\",feature=\"{f}\"}}"
            );
            Some(((*f).to_owned(), *samples.get(&key)?))
        })
        .collect()
}

#[test]
fn one_shifted_feature_drifts_and_the_others_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = dir.path().join("models");
    let from = repo_root().join("tests/models/demo/1");
    let to = models.join("demo/1");
    std::fs::create_dir_all(&to).expect("version folder");
    std::fs::copy(from.join("model.onnx"), to.join("model.onnx")).expect("model");
    let card = std::fs::read_to_string(from.join("model.toml")).expect("card");
    let names: Vec<String> = FEATURES
        .iter()
        .map(|f| format!("{{ name = \"{f}\" }}"))
        .collect();
    std::fs::write(
        to.join("model.toml"),
        format!(
            "{card}\n[input_rules]\nmode = \"flag\"\n[input_rules.inputs.input]\nfeatures = [{}]\n\n\
             [drift]\ncapture = 1000\nwindow = 1000\nmin_samples = 500\n",
            names.join(", ")
        ),
    )
    .expect("card with drift");
    let mut served = Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 1\n",
            models.display()
        ),
        &[],
    );
    let mut rng = SmallRng::seed_from_u64(20261202);

    send(&served.addr, &mut rng, 100, [0.0; 4]);
    assert!(
        input_verdicts(&mut served).is_empty(),
        "no verdict while the window is empty"
    );
    send(&served.addr, &mut rng, 100, [0.0; 4]);
    let same = input_verdicts(&mut served);
    assert_eq!(same.len(), 4, "{same:?}");
    assert!(
        same.values().all(|v| *v == 0.0),
        "like the reference: {same:?}"
    );

    send(&served.addr, &mut rng, 100, [0.0, 0.0, 0.5, 0.0]);
    let shifted = input_verdicts(&mut served);
    let expected: BTreeMap<String, f64> = FEATURES
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                if *f == "petal_length" { 1.0 } else { 0.0 },
            )
        })
        .collect();
    assert_eq!(shifted, expected);
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    let psi = samples
        .get("aviary_drift_psi{model=\"demo\",version=\"1\",side=\"input\",tensor=\"input\",feature=\"petal_length\"}")
        .copied()
        .expect("a PSI for petal_length");
    assert!(psi > 0.0, "{psi}");
}
