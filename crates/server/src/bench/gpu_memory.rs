//! Device memory in use during a benchmark, sampled on a thread (CUDA only).

use candle_core::Device;
use internvl_server::device::memory_info;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Device memory in use, sampled on a thread every 20 ms (CUDA only).
pub(super) struct MemorySampler {
    pub(super) total: usize,
    /// In use when sampling started.
    pub(super) baseline: usize,
    /// Highest sample since the last `reset_peak`, and overall.
    peak: Arc<AtomicUsize>,
    overall: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    device: Device,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemorySampler {
    pub(super) fn start(device: &Device) -> Option<Self> {
        let (free, total) = memory_info(device)?;
        let used = total - free;
        let peak = Arc::new(AtomicUsize::new(used));
        let overall = Arc::new(AtomicUsize::new(used));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, overall, stop, device) =
                (peak.clone(), overall.clone(), stop.clone(), device.clone());
            std::thread::Builder::new()
                .name("memory-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some((free, total)) = memory_info(&device) {
                            peak.fetch_max(total - free, Ordering::Relaxed);
                            overall.fetch_max(total - free, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .ok()
        };
        Some(Self {
            total,
            baseline: used,
            peak,
            overall,
            stop,
            device: device.clone(),
            thread,
        })
    }

    pub(super) fn used_now(&self) -> usize {
        memory_info(&self.device).map_or(0, |(free, total)| total - free)
    }

    pub(super) fn reset_peak(&self) {
        self.peak.store(self.used_now(), Ordering::Relaxed);
    }

    pub(super) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed).max(self.used_now())
    }

    pub(super) fn overall_peak(&self) -> usize {
        self.overall.load(Ordering::Relaxed).max(self.used_now())
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
