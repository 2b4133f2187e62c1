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
use ringbuf::wrap::Wrap;
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
    /// Stream the frame belongs to: a slot, which a forgotten stream's source gives to a
    /// new stream (the agent's `[assemble] forget_after_secs`).
    pub stream: u32,
    /// Which of the streams that held slot `stream` the frame belongs to: the source adds
    /// one each time it gives the slot to a new stream. Per-stream state downstream (the
    /// scorer's smoothing, the agent's thresholds and alerts) starts afresh at a newer
    /// generation, and frames of an older one are from a forgotten stream. Frames travel
    /// in order, so this is exact however far the scorer runs behind. (It fills what was
    /// padding after `stream`: the meta stays 48 bytes.)
    pub generation: u32,
    /// Event time in epoch seconds (NaN when the input has none).
    pub timestamp: f64,
    /// When the frame entered the ring, in ns of the pipeline's monotonic clock.
    pub enqueued_ns: u64,
    /// MQTT receipt of the frame (raw input) or of its last sample (assembled input), in
    /// seconds on the monotonic clock (`mqtt::monotonic_secs`); `None` when unknown (replay).
    /// The agent's alert latency starts here: a step of the wall clock does not move it.
    pub received_mono: Option<f64>,
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

/// Scores what a ring holds on the thread that pushes into it, when the scorer is idle
/// (see [`FrameProducer::set_drainer`]).
pub trait Drainer: Send + Sync {
    /// Scores every frame in the ring now, unless the scorer is busy; `false` then (the
    /// producer wakes the scorer as usual).
    fn try_drain(&self) -> bool;
}

/// The source's half of the ring.
pub struct FrameProducer {
    /// `None` once dropped (see `Drop`).
    meta: Option<HeapProd<FrameMeta>>,
    values: Option<HeapProd<f32>>,
    dim: usize,
    policy: FullPolicy,
    shared: Arc<Shared>,
    drainer: Option<Arc<dyn Drainer>>,
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
            meta: Some(meta_p),
            values: Some(val_p),
            dim,
            policy,
            shared: shared.clone(),
            drainer: None,
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

    /// After each push, `drainer` scores the ring on the pushing thread if it can, and only
    /// if it cannot is the consumer woken: a frame then wakes no other thread.
    pub fn set_drainer(&mut self, drainer: Arc<dyn Drainer>) {
        self.drainer = Some(drainer);
    }

    fn halves(&mut self) -> (&mut HeapProd<FrameMeta>, &mut HeapProd<f32>) {
        match (self.meta.as_mut(), self.values.as_mut()) {
            (Some(meta), Some(values)) => (meta, values),
            _ => unreachable!("the ring halves are only taken on drop"),
        }
    }

    fn has_room(&mut self) -> bool {
        let dim = self.dim;
        let (meta, values) = self.halves();
        meta.vacant_len() >= 1 && values.vacant_len() >= dim
    }

    fn read_is_held(&mut self) -> bool {
        self.halves().0.read_is_held()
    }

    /// Scores the ring on this thread if a drainer is set and the scorer is idle.
    fn drain_here(&self) -> bool {
        self.drainer.as_ref().is_some_and(|d| d.try_drain())
    }

    /// Pushes one frame (`values.len()` must equal [`Self::dim`]; a wrong length is
    /// dropped and counted, never half-written). Follows the ring's [`FullPolicy`].
    pub fn push(&mut self, meta: FrameMeta, values: &[f32]) -> Pushed {
        let pushed = self.push_quiet(meta, values);
        if pushed == Pushed::Accepted {
            self.wake();
        }
        pushed
    }

    /// [`Self::push`] without scoring or waking the consumer after it (a full ring still
    /// does either, to make room, even when it then drops the frame): for the frames of one
    /// message, pushed together, after which [`Self::wake`] makes the consumer take them as
    /// one batch instead of one each.
    pub fn push_quiet(&mut self, meta: FrameMeta, values: &[f32]) -> Pushed {
        if values.len() != self.dim {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Pushed::Dropped;
        }
        let mut spins = 0u32;
        while !self.has_room() {
            if !self.read_is_held() {
                return Pushed::Closed;
            }
            // Full while the scorer is idle (only possible with a drainer that was busy a
            // moment ago): score here, which makes room.
            if self.drain_here() {
                continue;
            }
            match self.policy {
                FullPolicy::DropNewest => {
                    // The quiet frames before this one woke nobody: the consumer may be
                    // parked beside a full ring.
                    self.wake_consumer();
                    self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return Pushed::Dropped;
                }
                FullPolicy::Block => {
                    self.wake_consumer();
                    backoff(&mut spins);
                }
            }
        }
        if !self.read_is_held() {
            return Pushed::Closed;
        }
        let (meta_half, values_half) = self.halves();
        values_half.push_slice(values);
        let _ = meta_half.try_push(meta);
        self.shared.stats.pushed.fetch_add(1, Ordering::Relaxed);
        Pushed::Accepted
    }

    /// Has what was pushed scored: here, by the drainer, if it can, else by waking the
    /// consumer.
    pub fn wake(&self) {
        if !self.drain_here() {
            self.wake_consumer();
        }
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
        // The halves go first, so that the consumer woken here finds the ring finished
        // (a consumer that parks long, beside a drainer, would otherwise sleep it out).
        self.meta = None;
        self.values = None;
        self.drainer = None;
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
        park_until_pushed(&self.shared, self.meta.rb(), timeout);
    }

    /// A handle that waits like [`Self::wait`] without the consumer, so that another thread
    /// may hold the consumer meanwhile (see [`Drainer`]).
    pub fn waiter(&self) -> Waiter {
        Waiter {
            shared: self.shared.clone(),
            meta: self.meta.rb_ref().clone(),
        }
    }
}

/// Waits for a ring's producer, apart from its consumer ([`FrameConsumer::waiter`]).
pub struct Waiter {
    shared: Arc<Shared>,
    meta: Arc<HeapRb<FrameMeta>>,
}

impl Waiter {
    /// As [`FrameConsumer::wait`]; call it on the consumer's registered thread.
    pub fn wait(&self, timeout: Duration) {
        park_until_pushed(&self.shared, &self.meta, timeout);
    }
}

fn park_until_pushed(shared: &Shared, meta: &HeapRb<FrameMeta>, timeout: Duration) {
    shared.consumer_sleeping.store(true, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    if meta.is_empty() && meta.write_is_held() {
        std::thread::park_timeout(timeout);
    }
    shared.consumer_sleeping.store(false, Ordering::SeqCst);
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
    fn a_consumer_woken_by_the_producers_drop_finds_the_ring_finished() {
        let (p, c) = frame_ring(4, 1, FullPolicy::Block);
        let (parked_tx, parked_rx) = std::sync::mpsc::channel();
        let consumer = std::thread::spawn(move || {
            c.register_current_thread();
            parked_tx.send(()).unwrap();
            // Long enough that only the producer's unpark ends it.
            c.wait(Duration::from_secs(60));
            c.is_finished()
        });
        parked_rx.recv().unwrap();
        drop(p);
        assert!(consumer.join().unwrap());
    }

    /// Pops every frame it is asked to, unless told it is busy.
    struct Popper {
        consumer: std::sync::Mutex<FrameConsumer>,
        busy: AtomicBool,
        popped: AtomicU64,
    }

    impl Drainer for Popper {
        fn try_drain(&self) -> bool {
            if self.busy.load(Ordering::SeqCst) {
                return false;
            }
            let mut c = self.consumer.lock().unwrap();
            let (mut metas, mut values) = ([FrameMeta::default(); 4], [0.0; 8]);
            let n = c.pop_batch(&mut metas, &mut values) as u64;
            self.popped.fetch_add(n, Ordering::SeqCst);
            true
        }
    }

    #[test]
    fn a_drainer_takes_each_frame_on_the_pushing_thread_unless_busy() {
        let (mut p, c) = frame_ring(4, 2, FullPolicy::DropNewest);
        let popper = Arc::new(Popper {
            consumer: std::sync::Mutex::new(c),
            busy: AtomicBool::new(false),
            popped: AtomicU64::new(0),
        });
        p.set_drainer(popper.clone());
        for seq in 0..10 {
            assert_eq!(p.push(meta(seq), &[1.0, 2.0]), Pushed::Accepted);
        }
        assert_eq!(popper.popped.load(Ordering::SeqCst), 10);
        // Busy: frames stay for the consumer, and the ring fills as without a drainer.
        popper.busy.store(true, Ordering::SeqCst);
        for seq in 10..14 {
            assert_eq!(p.push(meta(seq), &[1.0, 2.0]), Pushed::Accepted);
        }
        assert_eq!(p.push(meta(14), &[1.0, 2.0]), Pushed::Dropped);
        assert_eq!(popper.consumer.lock().unwrap().ready(), 4);
        // Idle again: a full ring is drained on this thread before the push.
        popper.busy.store(false, Ordering::SeqCst);
        assert_eq!(p.push(meta(15), &[1.0, 2.0]), Pushed::Accepted);
        assert_eq!(popper.popped.load(Ordering::SeqCst), 15);
        assert_eq!(p.stats().dropped.load(Ordering::SeqCst), 1);
    }

    /// Quiet pushes leave the drainer alone until `wake`, which then takes them all in
    /// one drain; a full ring still drains to make room.
    #[test]
    fn quiet_pushes_are_drained_together_at_the_wake() {
        struct Counting {
            consumer: std::sync::Mutex<FrameConsumer>,
            drains: AtomicU64,
            sizes: std::sync::Mutex<Vec<usize>>,
        }
        impl Drainer for Counting {
            fn try_drain(&self) -> bool {
                let mut c = self.consumer.lock().unwrap();
                let mut metas = [FrameMeta::default(); 8];
                let mut values = [0.0f32; 16];
                let n = c.pop_batch(&mut metas, &mut values);
                self.drains.fetch_add(1, Ordering::Relaxed);
                self.sizes.lock().unwrap().push(n);
                true
            }
        }
        let (mut producer, consumer) = frame_ring(8, 2, FullPolicy::DropNewest);
        let drainer = Arc::new(Counting {
            consumer: std::sync::Mutex::new(consumer),
            drains: AtomicU64::new(0),
            sizes: std::sync::Mutex::new(Vec::new()),
        });
        producer.set_drainer(drainer.clone());
        for seq in 0..5 {
            assert_eq!(
                producer.push_quiet(meta(seq), &[1.0, 2.0]),
                Pushed::Accepted
            );
        }
        assert_eq!(drainer.drains.load(Ordering::Relaxed), 0);
        producer.wake();
        assert_eq!(*drainer.sizes.lock().unwrap(), [5]);
        // Past the ring's 8 frames the full ring drains (the 9th push), then goes on.
        for seq in 0..10 {
            assert_eq!(
                producer.push_quiet(meta(seq), &[1.0, 2.0]),
                Pushed::Accepted
            );
        }
        assert_eq!(*drainer.sizes.lock().unwrap(), [5, 8]);
        producer.wake();
        assert_eq!(*drainer.sizes.lock().unwrap(), [5, 8, 2]);
        // `push` drains after every frame.
        assert_eq!(producer.push(meta(0), &[1.0, 2.0]), Pushed::Accepted);
        assert_eq!(*drainer.sizes.lock().unwrap(), [5, 8, 2, 1]);
    }

    /// A quiet push into a full ring that cannot be scored here (the drainer is busy)
    /// drops the frame but wakes the parked consumer, which the quiet pushes before it
    /// did not.
    #[test]
    fn a_quiet_push_dropped_by_a_full_ring_wakes_the_consumer() {
        let (mut p, c) = frame_ring(2, 2, FullPolicy::DropNewest);
        let waiter = c.waiter();
        let popper = Arc::new(Popper {
            consumer: std::sync::Mutex::new(c),
            busy: AtomicBool::new(true),
            popped: AtomicU64::new(0),
        });
        p.set_drainer(popper.clone());
        let (woke_tx, woke_rx) = std::sync::mpsc::channel();
        let consumer = std::thread::spawn(move || {
            popper.consumer.lock().unwrap().register_current_thread();
            // Long enough that only the producer's unpark ends it.
            waiter.wait(Duration::from_secs(600));
            woke_tx.send(()).unwrap();
        });
        while !p.shared.consumer_sleeping.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Let it reach `park` (were it to find the frames first it would not sleep, and
        // the test would pass without the wake).
        std::thread::sleep(Duration::from_millis(50));
        for seq in 0..2 {
            assert_eq!(p.push_quiet(meta(seq), &[1.0, 2.0]), Pushed::Accepted);
        }
        assert_eq!(p.push_quiet(meta(2), &[1.0, 2.0]), Pushed::Dropped);
        assert!(
            woke_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "the consumer slept on beside a full ring"
        );
        consumer.join().unwrap();
        assert_eq!(p.stats().dropped.load(Ordering::Relaxed), 1);
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

    /// The meta travels beside every frame: the slot's generation took the padding after
    /// `stream`, not another word.
    #[test]
    fn frame_meta_stays_48_bytes() {
        assert_eq!(std::mem::size_of::<FrameMeta>(), 48);
    }

    #[test]
    fn push_after_consumer_gone_reports_closed() {
        let (mut p, c) = frame_ring(1, 1, FullPolicy::Block);
        drop(c);
        assert_eq!(p.push(meta(0), &[1.0]), Pushed::Closed);
    }
}
