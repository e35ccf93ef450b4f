//! The process's peak resident memory as the kernel counts it (Linux's `VmHWM`): what a
//! 24 GB host must hold, loading included, measured by the process itself.

/// Peak resident set size in bytes since the process started; `None` where `/proc` does not
/// say (not Linux).
pub fn peak_rss() -> Option<u64> {
    vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmHWM:` line of a `/proc/<pid>/status` text, in bytes.
fn vm_hwm(status: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: u64 = value.trim().strip_suffix("kB")?.trim_end().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_high_water_mark_line() {
        let status = "Name:\tinternvl\nVmPeak:\t 9000 kB\nVmHWM:\t   17300 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(vm_hwm(status), Some(17_300 * 1024));
        assert_eq!(vm_hwm("VmRSS:\t100 kB\n"), None);
        assert_eq!(vm_hwm("VmHWM:\tlots kB\n"), None);
        assert_eq!(vm_hwm("VmHWM:\t100 MB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn counts_memory_the_process_touched() {
        // More than the peak so far: the peak must then rise past it.
        let before = peak_rss().expect("VmHWM on Linux");
        let size = before as usize + (64 << 20);
        let touched = std::hint::black_box(vec![1u8; size]);
        let after = peak_rss().expect("VmHWM on Linux");
        assert!(
            after >= size as u64 && after > before,
            "peak {after} after touching {size} bytes (was {before})"
        );
        drop(touched);
    }
}
