//! Reading a window of keys with one range scan of an index instead of one seek per key: when
//! that pays ([`dense`]), and finding each scanned row's key among the window's
//! ([`SortedKeys`]). Both stores' associated-data passes read a dense window's reference and
//! Provenance target rows this way; each store decides which key range it scans.

/// Whether `count` keys are dense in the key range `[start, end]` (more than one key in
/// `DENSE`): one range scan of an index then reads fewer entries than one seek per key. (Lower
/// in unit tests, so the conformance suite's tiny windows take both paths.)
pub(crate) fn dense(count: usize, (start, end): (i64, i64)) -> bool {
    const DENSE: i64 = if cfg!(test) { 2 } else { 4 };
    (count as i64).saturating_mul(DENSE) > end - start
}

/// Finds keys among items sorted by key (`key` of each) for keys that mostly arrive in
/// ascending order, as a range scan's rows do: a walk forward instead of a binary search per row
/// (those searches were ~8 % of a first manifest's time at 10,000 members, session 9). A key
/// below the last one found is still found, by a binary search.
pub(crate) struct SortedKeys<'a, T, K> {
    items: &'a [T],
    key: K,
    next: usize,
}

impl<'a, T, K: Fn(&T) -> i64> SortedKeys<'a, T, K> {
    pub(crate) fn new(items: &'a [T], key: K) -> Self {
        SortedKeys { items, key, next: 0 }
    }

    /// The index of the item with `key`.
    pub(crate) fn position(&mut self, key: i64) -> Option<usize> {
        let key_of = &self.key;
        if self.next > 0 && key_of(&self.items[self.next - 1]) >= key {
            self.next = self.items.partition_point(|held| key_of(held) < key);
        }
        while self.items.get(self.next).is_some_and(|held| key_of(held) < key) {
            self.next += 1;
        }
        self.items.get(self.next).is_some_and(|held| key_of(held) == key).then_some(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are found walking forward, repeated, skipped, missing, or going back.
    #[test]
    fn sorted_keys_find_every_key_in_any_order() {
        let items = [2, 5, 9, 14];
        let mut keys = SortedKeys::new(&items, |&key| key);
        let found: Vec<Option<usize>> = [1, 2, 2, 5, 6, 14, 9, 15, 2].iter().map(|&key| keys.position(key)).collect();
        assert_eq!(found, [None, Some(0), Some(0), Some(1), None, Some(3), Some(2), None, Some(0)]);
    }
}
