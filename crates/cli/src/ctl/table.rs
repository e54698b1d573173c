//! Plain-text output for people: aligned tables, ages of timestamps, optional numbers.

use std::time::{Duration, UNIX_EPOCH};

/// `x` with `digits` decimals, or `-` when absent.
pub(super) fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// The watched file, or a note that none is watched yet.
pub(super) fn shown(path: &str) -> &str {
    if path.is_empty() {
        "(not watched yet)"
    } else {
        path
    }
}

/// How long ago `ms` (milliseconds since the Unix epoch) was; `-` for 0 (never).
pub(super) fn loaded_at(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let age = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_millis(ms))
        .unwrap_or_default();
    format!("{}s ago", age.as_secs())
}

/// Left-aligned columns separated by two spaces.
pub(super) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["A".to_owned(), "LONG".to_owned()],
            vec!["wide".to_owned(), "x".to_owned()],
        ];
        assert_eq!(table(&rows), "A     LONG\nwide  x");
    }
}
