//! Sets of byte ranges of a disk: what a filesystem uses, what a bmap names,
//! what a card must be written with.

/// Ranges are widened to this, so that O_DIRECT writes stay aligned.
pub const ALIGN: u64 = 4096;

/// Sorted, non-overlapping byte ranges `(start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents(Vec<(u64, u64)>);

impl Extents {
    pub fn from_ranges(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|(s, e)| e > s);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Extents(merged)
    }

    pub fn union(&self, other: &Extents) -> Extents {
        Extents::from_ranges(self.0.iter().chain(other.0.iter()).copied().collect())
    }

    /// Each range widened to `ALIGN` and cut at `limit`.
    pub fn aligned(&self, limit: u64) -> Extents {
        Extents::from_ranges(
            self.0
                .iter()
                .map(|(s, e)| {
                    (
                        s / ALIGN * ALIGN,
                        e.div_ceil(ALIGN).saturating_mul(ALIGN).min(limit),
                    )
                })
                .collect(),
        )
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// These ranges without any byte of `other`.
    pub fn minus(&self, other: &Extents) -> Extents {
        let mut out = Vec::new();
        for &(start, end) in &self.0 {
            let mut at = start;
            for &(s, e) in &other.0 {
                if e <= at || s >= end {
                    continue;
                }
                if s > at {
                    out.push((at, s));
                }
                at = at.max(e);
            }
            if at < end {
                out.push((at, end));
            }
        }
        Extents(out)
    }

    /// Whether any range overlaps `[start, end)`.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        let i = self.0.partition_point(|&(_, e)| e <= start);
        self.0.get(i).is_some_and(|&(s, _)| s < end)
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_align() {
        let e = Extents::from_ranges(vec![(10, 20), (0, 5), (15, 30), (40, 40)]);
        assert_eq!(e.ranges(), &[(0, 5), (10, 30)]);
        assert_eq!(e.bytes(), 25);
        let a = Extents::from_ranges(vec![(5000, 5001), (9000, 9100)]).aligned(10_000);
        assert_eq!(a.ranges(), &[(4096, 10_000)]);
        assert!(
            e.intersects(4, 11)
                && e.intersects(29, 100)
                && !e.intersects(5, 10)
                && !e.intersects(30, 40)
        );
    }
}
