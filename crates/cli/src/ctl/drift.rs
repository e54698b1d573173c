//! `aviary ctl drift`: the `Models` service's drift report, one row per feature.

use aviary::pb::admin::{DriftReport, DriftRequest, models_client::ModelsClient};

use super::{Channel, CtlError, print, table::table};

/// Each tracked feature of `model` (at `version`, or every version): its test, p-value,
/// PSI, outliers, window and verdict.
pub(super) async fn report(
    channel: Channel,
    model: &str,
    version: Option<&str>,
    json: bool,
) -> Result<String, CtlError> {
    let report = ModelsClient::new(channel)
        .get_drift(DriftRequest {
            model: model.to_owned(),
            version: version.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    Ok(print(&report, json, render))
}

fn render(report: &DriftReport) -> String {
    let mut rows = vec![
        [
            "VERSION",
            "FEATURE",
            "TEST",
            "STATISTIC",
            "P (ADJUSTED)",
            "PSI",
            "OUTLIERS",
            "WINDOW",
            "REFERENCE",
            "VERDICT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let number = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.4}"));
    for version in &report.versions {
        for f in &version.features {
            rows.push(vec![
                version.version.clone(),
                format!("{} {}/{}", f.side, f.tensor, f.feature),
                f.test.clone(),
                number(f.statistic),
                number(f.adjusted_p_value),
                number(f.psi),
                f.outliers.map_or("-".to_owned(), |n| n.to_string()),
                f.window.to_string(),
                f.reference.to_string(),
                f.verdict.clone(),
            ]);
        }
    }
    let thresholds: Vec<String> = report
        .versions
        .iter()
        .map(|v| {
            format!(
                "version {}: drift when the adjusted p is below {} or PSI above {}; verdicts from {} values on each side",
                v.version, v.alpha, v.max_psi, v.min_samples
            )
        })
        .collect();
    match rows.len() {
        1 => "no loaded version tracks drift".to_owned(),
        _ => format!("{}\n{}", table(&rows), thresholds.join("\n")),
    }
}

#[cfg(test)]
mod tests {
    use aviary::pb::admin::{FeatureDrift, VersionDrift};

    use super::*;

    #[test]
    fn a_row_per_feature_and_the_thresholds() {
        let report = DriftReport {
            versions: vec![VersionDrift {
                model: "demo".into(),
                version: "1".into(),
                alpha: 0.01,
                max_psi: 0.25,
                min_samples: 100,
                features: vec![
                    FeatureDrift {
                        side: "input".into(),
                        tensor: "input".into(),
                        feature: "petal_width".into(),
                        test: "ks".into(),
                        reference: 1000,
                        window: 400,
                        statistic: Some(0.31),
                        p_value: Some(1e-9),
                        adjusted_p_value: Some(4e-9),
                        psi: Some(0.52),
                        outliers: Some(7),
                        outliers_total: Some(9),
                        verdict: "drift".into(),
                    },
                    FeatureDrift {
                        side: "output".into(),
                        tensor: "label".into(),
                        feature: "predicted class".into(),
                        test: "chi-square".into(),
                        reference: 1000,
                        window: 40,
                        verdict: "insufficient".into(),
                        ..FeatureDrift::default()
                    },
                ],
            }],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let words = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            words(lines[1]),
            [
                "1",
                "input",
                "input/petal_width",
                "ks",
                "0.3100",
                "0.0000",
                "0.5200",
                "7",
                "400",
                "1000",
                "drift"
            ]
        );
        assert_eq!(
            words(lines[2]),
            [
                "1",
                "output",
                "label/predicted",
                "class",
                "chi-square",
                "-",
                "-",
                "-",
                "-",
                "40",
                "1000",
                "insufficient"
            ]
        );
        assert!(lines[3].contains("below 0.01 or PSI above 0.25"), "{text}");
        assert_eq!(
            render(&DriftReport::default()),
            "no loaded version tracks drift"
        );
    }
}
