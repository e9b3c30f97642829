//! The nemesis: one fault at a time, each healed before the next. Every kind of fault
//! runs at least once per run (in a seeded order), then random ones until the duration
//! is up. In a scale run, instances leave and join the group in turn instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Server, TOKEN, client, distributed, local_services, plugin};
use crate::journal::Journal;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9 of one engine, then a restart.
    Kill,
    /// An operator pauses a priority for a few seconds (cluster-wide).
    Pause(&'static str),
    /// Another version of the rules goes live, then is rolled back.
    HotSwap,
    /// The embedded data dir's file system fills up, then frees.
    DiskFull,
    KafkaRestart,
    CassandraRestart,
    /// An instance stops (SIGTERM) and stays away: the group rebalances without it.
    Leave,
    /// A new instance (its own data dir and name) joins the group.
    Join,
}

/// How long a leaving instance may take to stop cleanly before it is killed.
const LEAVE_WITHIN: Duration = Duration::from_secs(60);

/// What kind of run the nemesis makes.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Every kind of fault, with the engines the run started.
    Faults,
    /// Instances leave and join in turn, around this many in the group.
    Scale(usize),
}

pub async fn run(
    mut rng: Rng,
    mut engines: Vec<Server>,
    mut disk: Disk,
    journal: Arc<Journal>,
    duration: Duration,
    mode: Mode,
    bases: crate::clients::Bases,
) -> (Vec<Server>, Disk) {
    let mut kinds = vec![Fault::Kill, Fault::Pause("vip"), Fault::Pause("normal"), Fault::HotSwap];
    let mut made = engines.len();
    if let Mode::Scale(_) = mode {
        kinds = vec![Fault::Leave, Fault::Join];
    } else if distributed() {
        kinds.extend([Fault::KafkaRestart, Fault::CassandraRestart]);
    } else if disk.mounted {
        kinds.push(Fault::DiskFull);
    }
    let mut plan = kinds.clone();
    rng.shuffle(&mut plan);
    let started = Instant::now();
    let mut done = 0;
    loop {
        tokio::time::sleep(rng.millis(1_000, 4_000)).await;
        if started.elapsed() >= duration && done >= plan.len() {
            break;
        }
        let fault = match mode {
            // One leaves, then one joins: the group stays about its size.
            Mode::Scale(size) if engines.len() >= size => Fault::Leave,
            Mode::Scale(_) => Fault::Join,
            Mode::Faults => plan.get(done).copied().unwrap_or_else(|| *rng.pick(&kinds)),
        };
        done += 1;
        journal.fault(format!("{fault:?} begins"));
        match fault {
            Fault::Kill => {
                let i = rng.between(0, engines.len() as u64) as usize;
                engines[i].kill();
                tokio::time::sleep(rng.millis(300, 2_000)).await;
                engines[i].restart().await;
            }
            Fault::Pause(priority) => {
                operator_post(&engines, &mut rng, &journal, &format!("/queues/{priority}/pause")).await;
                tokio::time::sleep(rng.millis(2_000, 5_000)).await;
                operator_post(&engines, &mut rng, &journal, &format!("/queues/{priority}/resume")).await;
            }
            Fault::HotSwap => {
                let s = rng.pick(&engines);
                let r = s.deploy("order-rules", plugin("fixture_rules_v2"), false).await;
                // 201 the first time; 200 when the slot holds these bytes already; 503 when
                // the cluster did not take it (a service still coming back), which is the
                // honest answer, not a problem.
                if r.status() == 503 {
                    journal.fault(format!("deploying rules v2 answered 503: {}", r.text().await.unwrap()));
                } else if !r.status().is_success() {
                    let status = r.status();
                    journal.problem(format!("deploying rules v2 answered {status}: {}", r.text().await.unwrap()));
                } else {
                    tokio::time::sleep(rng.millis(2_000, 4_000)).await;
                    operator_post(&engines, &mut rng, &journal, "/plugins/order-rules/rollback").await;
                }
            }
            Fault::Leave => {
                // Not the first engine: the checker reads there.
                let i = rng.between(1, engines.len() as u64) as usize;
                let mut gone = engines.remove(i);
                bases.write().unwrap_or_else(|p| p.into_inner()).retain(|b| *b != gone.base);
                // Its clients' requests in flight fail over to the others (they retry).
                let stopped = tokio::task::spawn_blocking(move || (gone.stop_within(LEAVE_WITHIN), gone));
                let (status, gone) = stopped.await.unwrap();
                match status {
                    Ok(s) if s.success() => journal.fault(format!("the instance on {} left", gone.base)),
                    Ok(s) => journal.problem(format!("the instance on {} stopped badly on SIGTERM: {s}", gone.base)),
                    Err(why) => journal.problem(format!("the instance on {}: {why}", gone.base)),
                }
                // A left instance's beacon goes stale; waiting lets the group rebalance.
                tokio::time::sleep(rng.millis(2_000, 5_000)).await;
            }
            Fault::Join => {
                let joined = Server::start_beside(&disk.engine_dir(made), &engines[0]).await;
                made += 1;
                journal.fault(format!("an instance joined on {}", joined.base));
                bases.write().unwrap_or_else(|p| p.into_inner()).push(joined.base.clone());
                engines.push(joined);
            }
            Fault::DiskFull => {
                let filled = disk.fill();
                journal.fault(format!("the data dir's file system is full ({} MiB of ballast)", filled >> 20));
                tokio::time::sleep(rng.millis(2_000, 5_000)).await;
                disk.free();
            }
            Fault::KafkaRestart | Fault::CassandraRestart => {
                let service = if matches!(fault, Fault::KafkaRestart) { "kafka" } else { "cassandra" };
                tokio::task::spawn_blocking(move || local_services("restart", service)).await.unwrap();
                wait_healthy(&engines, &journal, service).await;
            }
        }
        journal.fault(format!("{fault:?} healed"));
    }
    (engines, disk)
}

/// An operator's POST on any engine; it must succeed (retried through brief outages).
async fn operator_post(engines: &[Server], rng: &mut Rng, journal: &Journal, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let url = rng.pick(engines).url(path);
        let r = client().post(&url).bearer_auth(TOKEN).timeout(Duration::from_secs(10)).send().await;
        match r {
            Ok(r) if r.status().is_success() => return,
            Ok(r) if r.status() != 503 => {
                let status = r.status();
                journal.problem(format!("POST {path} answered {status}: {}", r.text().await.unwrap_or_default()));
                return;
            }
            _ if Instant::now() > deadline => {
                journal.problem(format!("POST {path} was refused for a minute"));
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// After a service restart every engine must say healthy again by itself.
async fn wait_healthy(engines: &[Server], journal: &Journal, service: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for s in engines {
        loop {
            let r = client().get(s.url("/health")).timeout(Duration::from_secs(5)).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                break;
            }
            if Instant::now() > deadline {
                journal.problem(format!("an engine did not recover within 120 s after {service} restarted"));
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The engines' data dirs. On the embedded default they live on a small tmpfs of their
/// own, so that the disk-full fault fills a real file system, not the machine's.
pub struct Disk {
    dir: tempfile::TempDir,
    pub mounted: bool,
    ballast: PathBuf,
}

impl Disk {
    pub fn prepare() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ballast = dir.path().join("ballast");
        let mut mounted = false;
        if !distributed() {
            let mount = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256m,mode=0700", "fault-suite"])
                .arg(dir.path())
                .output();
            match mount {
                Ok(out) if out.status.success() => mounted = true,
                other => {
                    let why = match other {
                        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                        Err(e) => e.to_string(),
                    };
                    assert!(
                        std::env::var("CI").as_deref() != Ok("true"),
                        "the disk-full fault needs a tmpfs of its own, and `mount -t tmpfs` failed ({why}): \
                         run the suite as root (or with CAP_SYS_ADMIN)"
                    );
                    eprintln!("fault suite: no tmpfs ({why}), so no disk-full fault in this run");
                }
            }
        }
        Disk { dir, mounted, ballast }
    }

    /// A data dir for engine `i`, which the engine creates itself (and makes private).
    pub fn engine_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("engine-{i}"))
    }

    /// Writes ballast until the file system is full; returns how much it took.
    fn fill(&mut self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(&self.ballast).unwrap();
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        written
    }

    fn free(&mut self) {
        let _ = std::fs::remove_file(&self.ballast);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
        }
    }
}
