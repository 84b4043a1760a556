//! Order statistics of latency samples.

/// Median, 10th and 90th percentile of a sample set, in the samples' unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

/// The `q`-quantile (0..=1) of sorted samples, interpolating linearly between the two
/// nearest ranks (the usual "type 7" definition, so the median of an even count is the
/// mean of the middle pair).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lower = pos.floor() as usize;
    let upper = pos.ceil() as usize;
    let fraction = pos - lower as f64;
    sorted[lower] + (sorted[upper] - sorted[lower]) * fraction
}

/// None for an empty sample set.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        n: sorted.len(),
        median: quantile(&sorted, 0.5),
        p10: quantile(&sorted, 0.1),
        p90: quantile(&sorted, 0.9),
        min: sorted[0],
        max: sorted[sorted.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_medians() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn percentiles_interpolate() {
        let samples: Vec<f64> = (0..=100).map(f64::from).collect();
        let s = summarize(&samples).unwrap();
        assert_eq!((s.p10, s.median, s.p90), (10.0, 50.0, 90.0));
        let single = summarize(&[7.0]).unwrap();
        assert_eq!((single.p10, single.median, single.p90), (7.0, 7.0, 7.0));
    }
}
