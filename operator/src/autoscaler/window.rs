//! A sliding window of time buckets: what [`super::placed`] and
//! [`super::costs`] book traffic and replicas into. Bounded: a bucket older
//! than the window is dropped when the next one starts.

use std::collections::VecDeque;
use std::time::Duration;

/// Buckets of `T`, each with the moment it started.
#[derive(Debug, Clone, Default)]
pub struct Buckets<T> {
    buckets: VecDeque<(Duration, T)>,
}

impl<T: Default> Buckets<T> {
    /// The bucket `now` falls in, for a window of `length` cut into buckets
    /// of `width`: a new one once the newest is `width` old, and the ones
    /// wholly before the window dropped.
    pub fn at(&mut self, now: Duration, length: Duration, width: Duration) -> &mut T {
        if self
            .buckets
            .back()
            .is_none_or(|(start, _)| now >= *start + width)
        {
            self.buckets.push_back((now, T::default()));
        }
        let horizon = now.saturating_sub(length);
        while self.buckets.len() > 1 && self.buckets[1].0 <= horizon {
            self.buckets.pop_front();
        }
        &mut self.buckets.back_mut().expect("just pushed").1
    }

    /// Every bucket in the window, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.buckets.iter().map(|(_, b)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_per_width_and_none_older_than_the_window() {
        let mut window: Buckets<u32> = Buckets::default();
        let s = Duration::from_secs;
        for t in 0..100 {
            *window.at(s(t), s(10), s(2)) += 1;
        }
        // Buckets of 2 s; the oldest kept starts at or before 90 s.
        assert_eq!(window.iter().count(), 6);
        assert_eq!(window.iter().sum::<u32>(), 12);
    }
}
