//! Searching sorted tables for a sorted batch: each search starts where the previous one ended and gallops
//! forward, so a batch walks a table once, in memory order, instead of bisecting it from the top per address.

/// `slice.partition_point(pred)`, found by galloping forward from `hint` when every element before `hint`
/// satisfies `pred` (a batch moving forward), else by bisecting the whole slice. Same answer either way.
pub(crate) fn partition_point_from<T>(
    slice: &[T],
    hint: usize,
    pred: impl Fn(&T) -> bool,
) -> usize {
    if hint > slice.len() || (hint > 0 && !pred(&slice[hint - 1])) {
        return slice.partition_point(pred);
    }
    // Invariant: everything before `low` satisfies `pred`; find a `high` that does not (or the end).
    let mut low = hint;
    let mut step = 1;
    loop {
        let probe = low + step - 1;
        if probe >= slice.len() {
            return low + slice[low..].partition_point(&pred);
        }
        if !pred(&slice[probe]) {
            return low + slice[low..probe].partition_point(&pred);
        }
        low = probe + 1;
        step *= 2;
    }
}

/// Where a sorted batch's previous search in one table ended.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cursor(pub usize);

impl Cursor {
    /// [`partition_point_from`] from this cursor, which then moves to the answer.
    pub fn partition_point<T>(&mut self, slice: &[T], pred: impl Fn(&T) -> bool) -> usize {
        self.0 = partition_point_from(slice, self.0, pred);
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::partition_point_from;

    #[test]
    fn galloping_agrees_with_bisection_from_every_hint() {
        let table: Vec<u32> = vec![1, 3, 3, 5, 8, 13, 21, 34, 55, 89];
        for key in 0..100 {
            let expected = table.partition_point(|&x| x <= key);
            for hint in 0..=table.len() + 1 {
                assert_eq!(
                    partition_point_from(&table, hint, |&x| x <= key),
                    expected,
                    "key {key} hint {hint}"
                );
            }
        }
        assert_eq!(partition_point_from(&[] as &[u32], 0, |&x| x <= 5), 0);
    }
}
