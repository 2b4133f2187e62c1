//! The frame ring: one lock-free single-producer single-consumer edge from a source to
//! the scorer thread, with a configured policy for when it is full.
//!
//! A frame travels as two pushes into two `ringbuf` rings: its `dim` values into an
//! `f32` ring, then its [`FrameMeta`] into a metadata ring. The consumer reads metadata
//! first, so every frame it sees has its values already in place (both rings publish
//! with release/acquire ordering). Nothing is allocated per frame.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};
use serde::{Deserialize, Serialize};

/// What a producer does when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Drop the frame being pushed and count it (live sources: never stall the input).
    DropNewest,
    /// Wait until the scorer frees room (replay: never lose a frame).
    Block,
}

/// Per-frame metadata that travels beside the values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FrameMeta {
    /// Position of the frame in its stream (0-based).
    pub seq: u64,
    /// Stream the frame belongs to.
    pub stream: u32,
    /// Event time in epoch seconds (NaN when the input has none).
    pub timestamp: f64,
    /// When the frame entered the ring, in ns of the pipeline's monotonic clock.
    pub enqueued_ns: u64,
    /// MQTT receipt of the frame (raw input) or of its last sample (assembled input), in
    /// epoch seconds; 0 when unknown (replay). The agent's alert latency starts here.
    pub received: f64,
}

/// Counters shared by both ends; read them from any thread.
#[derive(Debug, Default)]
pub struct RingStats {
    pub pushed: AtomicU64,
    pub dropped: AtomicU64,
}

/// State both halves share: counters, and the parked consumer to wake.
#[derive(Debug, Default)]
struct Shared {
    stats: Arc<RingStats>,
    consumer: OnceLock<Thread>,
    consumer_sleeping: AtomicBool,
}

/// Result of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Accepted,
    /// The ring was full and the policy is `DropNewest`.
    Dropped,
    /// The consumer is gone; nothing will read this frame.
    Closed,
}

/// The source's half of the ring.
pub struct FrameProducer {
    meta: HeapProd<FrameMeta>,
    values: HeapProd<f32>,
    dim: usize,
    policy: FullPolicy,
    shared: Arc<Shared>,
}

/// The scorer's half of the ring.
pub struct FrameConsumer {
    meta: HeapCons<FrameMeta>,
    values: HeapCons<f32>,
    dim: usize,
    shared: Arc<Shared>,
}

/// Creates a ring holding `capacity_frames` frames of `dim` values.
pub fn frame_ring(
    capacity_frames: usize,
    dim: usize,
    policy: FullPolicy,
) -> (FrameProducer, FrameConsumer) {
    let capacity_frames = capacity_frames.max(1);
    let (meta_p, meta_c) = HeapRb::<FrameMeta>::new(capacity_frames).split();
    let (val_p, val_c) = HeapRb::<f32>::new((capacity_frames * dim).max(1)).split();
    let shared = Arc::new(Shared::default());
    (
        FrameProducer {
            meta: meta_p,
            values: val_p,
            dim,
            policy,
            shared: shared.clone(),
        },
        FrameConsumer {
            meta: meta_c,
            values: val_c,
            dim,
            shared,
        },
    )
}

impl FrameProducer {
    /// Frame dimension this ring carries.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Counters of this ring.
    pub fn stats(&self) -> Arc<RingStats> {
        self.shared.stats.clone()
    }

    fn has_room(&self) -> bool {
        self.meta.vacant_len() >= 1 && self.values.vacant_len() >= self.dim
    }

    /// Pushes one frame (`values.len()` must equal [`Self::dim`]; a wrong length is
    /// dropped and counted, never half-written). Follows the ring's [`FullPolicy`].
    pub fn push(&mut self, meta: FrameMeta, values: &[f32]) -> Pushed {
        if values.len() != self.dim {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Pushed::Dropped;
        }
        let mut spins = 0u32;
        while !self.has_room() {
            if !self.meta.read_is_held() {
                return Pushed::Closed;
            }
            match self.policy {
                FullPolicy::DropNewest => {
                    self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return Pushed::Dropped;
                }
                FullPolicy::Block => {
                    self.wake_consumer();
                    backoff(&mut spins);
                }
            }
        }
        if !self.meta.read_is_held() {
            return Pushed::Closed;
        }
        self.values.push_slice(values);
        let _ = self.meta.try_push(meta);
        self.shared.stats.pushed.fetch_add(1, Ordering::Relaxed);
        self.wake_consumer();
        Pushed::Accepted
    }

    fn wake_consumer(&self) {
        // Pairs with the fence in `wait`: either the consumer sees this frame before it
        // parks, or this load sees it sleeping (a Release store then a load may otherwise
        // be reordered, and the consumer would sleep a whole park timeout).
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.consumer_sleeping.load(Ordering::SeqCst)
            && let Some(t) = self.shared.consumer.get()
        {
            t.unpark();
        }
    }
}

impl Drop for FrameProducer {
    fn drop(&mut self) {
        // The ring halves drop after this; wake the consumer so it sees the end promptly.
        if let Some(t) = self.shared.consumer.get() {
            t.unpark();
        }
    }
}

/// Spin, then yield, then sleep briefly: low latency when the other side is quick,
/// little CPU when it is not.
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 128 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl FrameConsumer {
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn stats(&self) -> Arc<RingStats> {
        self.shared.stats.clone()
    }

    /// Registers the calling thread as the one producers wake. Call once from the scorer.
    pub fn register_current_thread(&self) {
        let _ = self.shared.consumer.set(std::thread::current());
    }

    /// Frames ready to pop.
    pub fn ready(&self) -> usize {
        self.meta.occupied_len()
    }

    /// True once the producer is gone and every frame has been read.
    pub fn is_finished(&self) -> bool {
        !self.meta.write_is_held() && self.meta.is_empty()
    }

    /// Pops up to `metas.len()` frames: metadata into `metas`, values row by row into
    /// `values` (at least `metas.len() * dim` long). Returns the number of frames popped.
    pub fn pop_batch(&mut self, metas: &mut [FrameMeta], values: &mut [f32]) -> usize {
        let n = self.meta.pop_slice(metas);
        let got = self.values.pop_slice(&mut values[..n * self.dim]);
        debug_assert_eq!(got, n * self.dim);
        n
    }

    /// Parks until a producer signals or `timeout` passes. Returns at once if frames are
    /// ready or the producer is gone.
    pub fn wait(&self, timeout: Duration) {
        self.shared.consumer_sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.meta.is_empty() && self.meta.write_is_held() {
            std::thread::park_timeout(timeout);
        }
        self.shared.consumer_sleeping.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: u64) -> FrameMeta {
        FrameMeta {
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn drops_newest_when_ring_full() {
        let (mut p, mut c) = frame_ring(2, 3, FullPolicy::DropNewest);
        assert_eq!(p.push(meta(0), &[1.0, 2.0, 3.0]), Pushed::Accepted);
        assert_eq!(p.push(meta(1), &[4.0, 5.0, 6.0]), Pushed::Accepted);
        assert_eq!(p.push(meta(2), &[7.0, 8.0, 9.0]), Pushed::Dropped);
        let stats = p.stats();
        assert_eq!(stats.pushed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
        let mut metas = [FrameMeta::default(); 4];
        let mut vals = [0.0; 12];
        assert_eq!(c.pop_batch(&mut metas, &mut vals), 2);
        assert_eq!(metas[1].seq, 1);
        assert_eq!(&vals[..6], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Room again: the next frame is accepted, the dropped one is gone for good.
        assert_eq!(p.push(meta(3), &[0.0; 3]), Pushed::Accepted);
        assert_eq!(c.pop_batch(&mut metas, &mut vals), 1);
        assert_eq!(metas[0].seq, 3);
    }

    #[test]
    fn wrong_length_frame_is_counted_not_written() {
        let (mut p, c) = frame_ring(4, 3, FullPolicy::Block);
        assert_eq!(p.push(meta(0), &[1.0]), Pushed::Dropped);
        assert_eq!(c.ready(), 0);
        assert_eq!(p.stats().dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn block_policy_loses_nothing_across_threads() {
        let (mut p, mut c) = frame_ring(8, 2, FullPolicy::Block);
        let n = 20_000u64;
        let producer = std::thread::spawn(move || {
            for i in 0..n {
                assert_eq!(p.push(meta(i), &[i as f32, -(i as f32)]), Pushed::Accepted);
            }
        });
        c.register_current_thread();
        let mut metas = [FrameMeta::default(); 5];
        let mut vals = [0.0; 10];
        let mut next = 0u64;
        while !c.is_finished() {
            let k = c.pop_batch(&mut metas, &mut vals);
            if k == 0 {
                c.wait(Duration::from_millis(1));
            }
            for (j, m) in metas[..k].iter().enumerate() {
                assert_eq!(m.seq, next);
                assert_eq!(vals[2 * j], next as f32);
                assert_eq!(vals[2 * j + 1], -(next as f32));
                next += 1;
            }
        }
        producer.join().unwrap();
        assert_eq!(next, n);
    }

    #[test]
    fn push_after_consumer_gone_reports_closed() {
        let (mut p, c) = frame_ring(1, 1, FullPolicy::Block);
        drop(c);
        assert_eq!(p.push(meta(0), &[1.0]), Pushed::Closed);
    }
}
