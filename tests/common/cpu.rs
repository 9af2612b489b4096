//! CPU time, read from /proc: of this process's threads by name, of another
//! process, and of the whole machine (the load test's accounting).

/// CPU seconds (user + system) spent so far by this process's threads whose
/// name starts with `prefix`.
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    // /proc counts in USER_HZ, 100 on Linux whatever the kernel's tick.
    let ticks = 100.0;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        total += stat_cpu(&task.path().join("stat")) / ticks;
    }
    total
}

/// utime + stime, in clock ticks, of a /proc/…/stat file.
pub fn stat_cpu(path: &std::path::Path) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the name: state is field 3 of stat(5), so utime (14) is index 11.
    field(11) + field(12)
}

/// Seconds the machine's CPUs were busy (not idle, not waiting on I/O), summed
/// over CPUs, since boot.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}
