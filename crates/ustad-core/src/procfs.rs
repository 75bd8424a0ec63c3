//! What `/proc` says about other processes: state, parent and process group, and this
//! process's children.

use std::fs;

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// One letter: `R`, `S`, `D`, `Z` (zombie), `T`…
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Process group id.
    pub pgrp: u32,
    /// CPU time used, user plus system, by the process and the children it waited for, in
    /// clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
    /// When the process started, in clock ticks after boot: with the pid, names one process
    /// for the life of the machine (a pid is reused, never with the same start time).
    pub start_ticks: u64,
}

/// The process's name (`/proc/<pid>/comm`); `None` if it is gone.
pub fn comm(pid: u32) -> Option<String> {
    let name = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim_end_matches('\n').to_owned())
}

/// Reads `/proc/<pid>/stat`; `None` if the process is gone.
pub fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses a `stat` line. The command name (field 2) may contain spaces and parentheses, so
/// the fields are read after its *last* closing parenthesis.
fn parse_stat(line: &str) -> Option<ProcStat> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // After pgrp: session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime
    // cutime cstime priority nice num_threads itrealvalue starttime vsize rss (proc(5)).
    let mut rest = fields.skip(8);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    // The time of children it has waited for: what a group's exited members used stays in
    // the sum (through their parent), so a group's CPU time does not go down.
    let cutime = rest.next()?.parse::<i64>().ok()?.max(0) as u64;
    let cstime = rest.next()?.parse::<i64>().ok()?.max(0) as u64;
    let start_ticks = rest.nth(4)?.parse().ok()?;
    let rss_pages = rest.nth(1)?.parse::<i64>().ok()?.max(0) as u64;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        cpu_ticks: utime + stime + cutime + cstime,
        rss_pages,
        start_ticks,
    })
}

/// What a process group uses now, summed over its live members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// CPU time, user plus system, in seconds × [`ticks_per_second`].
    pub cpu_ticks: u64,
    /// Resident set size in bytes (pages shared between members count once per member).
    pub rss_bytes: u64,
    /// Live processes in the group.
    pub processes: u32,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `cpu_ticks`.
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// The usage of each of these process groups, from one pass over `/proc`. Groups with no
/// live member are absent.
pub fn group_usage(pgids: &[u32]) -> std::collections::HashMap<u32, GroupUsage> {
    let mut usage = std::collections::HashMap::new();
    if pgids.is_empty() {
        return usage;
    }
    let page = rustix::param::page_size() as u64;
    let Ok(entries) = fs::read_dir("/proc") else {
        return usage;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(stat) = stat(pid) else { continue };
        if stat.state == 'Z' || !pgids.contains(&stat.pgrp) {
            continue;
        }
        let group: &mut GroupUsage = usage.entry(stat.pgrp).or_default();
        group.cpu_ticks += stat.cpu_ticks;
        group.rss_bytes += stat.rss_pages * page;
        group.processes += 1;
    }
    usage
}

/// The pids of this process's children (of all its threads).
pub fn own_children() -> Vec<u32> {
    let mut children = Vec::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return children;
    };
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            children.extend(
                list.split_whitespace()
                    .filter_map(|pid| pid.parse::<u32>().ok()),
            );
        }
    }
    children.sort_unstable();
    children.dedup();
    children
}

/// The command line of a process, for logs (`?` if it is gone).
pub fn cmdline(pid: u32) -> String {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(bytes) if !bytes.is_empty() => bytes
            .split(|b| *b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        _ => "?".to_owned(),
    }
}

/// Resident set size of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 10 0 0 0 70 30 5 5 20 0 \
                    1 0 100 5000000 321 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 1234,
                cpu_ticks: 110,
                rss_pages: 321,
                start_ticks: 100,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let own = stat(std::process::id()).unwrap();
        assert_eq!(own.ppid, std::os::unix::process::parent_id());
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(!cmdline(std::process::id()).is_empty());
    }

    #[test]
    fn a_group_sums_its_members() {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", "sleep 5 & sleep 5; wait"]);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().unwrap();
        let pgid = child.id();
        // sh, then its two sleeps, appear as the shell runs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let usage = loop {
            let usage = group_usage(&[pgid]);
            if usage.get(&pgid).is_some_and(|u| u.processes == 3)
                || std::time::Instant::now() > deadline
            {
                break usage;
            }
            std::thread::yield_now();
        };
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(pgid as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
        child.wait().unwrap();
        let group = usage[&pgid];
        assert_eq!(group.processes, 3);
        assert!(group.rss_bytes > 0);
        // The sleeps die asynchronously after SIGKILL; once gone, the group is absent.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !group_usage(&[pgid]).is_empty() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(group_usage(&[pgid]).is_empty());
    }

    #[test]
    fn children_are_listed() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(own_children().contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
