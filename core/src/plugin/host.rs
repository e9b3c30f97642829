//! The Wasm sandbox: one wasmtime engine with epoch deadlines and pooled instances,
//! compilation and contract checks for uploads, and loaded plugins that implement the
//! rule interfaces with a memory cap and a per-call deadline.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram, counter, histogram};
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, ComponentExportIndex, Func, HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};

use super::bindings::resolver::{ConflictResolver as ResolverWorld, ConflictResolverPre};
use super::bindings::rules::orchestrator::rules::host::{Host, Level};
use super::bindings::rules::{OrderRules as RulesWorld, OrderRulesIndices};
use super::cache::CompileCache;
use super::calls::{CallTally, LoadedCalls};
use super::convert::host as wit;
use super::{PluginError, Slot};
use crate::domain::{Order, OrderEvent, OrderFields};
use crate::rules::{ConflictResolver, Decision, OrderRules, RuleError, RuleErrorKind};
use crate::telemetry;

/// Sandbox limits, the same for every plugin.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock budget of one call into a plugin.
    pub deadline: Duration,
    /// Largest linear memory one instance may grow to.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { deadline: Duration::from_millis(10), memory_bytes: 16 << 20 }
    }
}

/// The epoch ticks once per millisecond; deadlines are counted in ticks.
const TICK: Duration = Duration::from_millis(1);
/// How often a call that ran out of time is tried (with twice the deadline each time).
const TIMEOUT_ATTEMPTS: u32 = 5;
/// The pause before a retry after a timeout, times the attempt number.
const TIMEOUT_PAUSE: Duration = Duration::from_millis(5);

/// Runs `f` with a deadline stretched 1, 2, 4… times while it times out, pausing
/// between tries, [`TIMEOUT_ATTEMPTS`] times in all: a stalled machine looks like a loop.
fn patiently<T>(f: impl Fn(u32) -> Result<T, RuleError>) -> Result<T, RuleError> {
    let mut attempt = 1;
    loop {
        match f(1 << (attempt - 1)) {
            Err(e) if e.kind == RuleErrorKind::Timeout && attempt < TIMEOUT_ATTEMPTS => {
                std::thread::sleep(TIMEOUT_PAUSE * attempt);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Events in a row that ran out of time on every attempt before the plugin counts as
/// looping (one attempt per event from then on, until it decides one again).
const LOOPING_AFTER: u32 = 3;

/// Per-instance state: the memory cap and what the plugin last logged at error level
/// (a panic message, through the SDK's panic hook).
pub struct Sandbox {
    memory_bytes: usize,
    /// Linear memory this instance holds now (the limiter sees its first allocation
    /// and every growth).
    memory_in_use: usize,
    /// The growth last allowed, taken back if it then fails.
    growing: usize,
    hit_memory_cap: bool,
    plugin: Arc<str>,
    last_error_log: Option<String>,
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit_memory_cap = true;
            return Ok(false);
        }
        self.growing = desired.saturating_sub(current);
        self.memory_in_use += self.growing;
        Ok(true)
    }

    /// A growth allowed above can still fail (past the module's own maximum, or the
    /// allocation): it is not in use then.
    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_in_use -= std::mem::take(&mut self.growing);
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

// The types interface has no functions; its host trait is empty.
impl super::bindings::rules::orchestrator::rules::types::Host for Sandbox {}

impl Host for Sandbox {
    fn log(&mut self, level: Level, message: String) {
        // Bounded, so a chatty plugin cannot flood the engine's log with huge lines.
        let message: String = message.chars().take(2_000).collect();
        let plugin = &*self.plugin;
        match level {
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => {
                tracing::warn!(plugin, "{message}");
                self.last_error_log = Some(message);
            }
        }
    }
}

/// The shared wasmtime engine and the linkers for both worlds.
pub struct Runtime {
    engine: Engine,
    rules_linker: Linker<Sandbox>,
    resolver_linker: Linker<Sandbox>,
    pub limits: Limits,
    /// Compiled components kept across restarts, where the engine has a data dir.
    cache: Option<CompileCache>,
}

impl Runtime {
    /// A runtime that compiles every component it is given.
    pub fn new(limits: Limits) -> Result<Arc<Self>, PluginError> {
        Self::build(limits, None)
    }

    /// A runtime that keeps compiled components in `dir`, so a restart loads them
    /// instead of compiling them again.
    pub fn with_cache(limits: Limits, dir: &std::path::Path) -> Result<Arc<Self>, PluginError> {
        Self::build(limits, Some(dir))
    }

    fn build(limits: Limits, cache_dir: Option<&std::path::Path>) -> Result<Arc<Self>, PluginError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let mut pool = PoolingAllocationConfig::default();
        // Instances are reused across calls and replaced only after a trap, so a small
        // pool suffices; its memories are sized to the cap (the limiter enforces it exactly).
        pool.total_component_instances(256);
        pool.total_core_instances(512);
        pool.total_memories(512);
        pool.total_tables(512);
        pool.max_memory_size(limits.memory_bytes.max(1 << 20) * 2);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PluginError::Runtime(format!("{e:#}")))?;

        let mut rules_linker = Linker::new(&engine);
        RulesWorld::add_to_linker::<_, HasSelf<_>>(&mut rules_linker, |s| s)
            .map_err(|e| PluginError::Runtime(format!("{e:#}")))?;
        let mut resolver_linker = Linker::new(&engine);
        ResolverWorld::add_to_linker::<_, HasSelf<_>>(&mut resolver_linker, |s| s)
            .map_err(|e| PluginError::Runtime(format!("{e:#}")))?;

        // Without its cache the engine still runs; it compiles on every start.
        let cache = cache_dir.and_then(|dir| {
            CompileCache::open(dir, &engine)
                .inspect_err(
                    |e| tracing::warn!(dir = %dir.display(), error = %e, "no compile cache; compiling on start"),
                )
                .ok()
        });
        let runtime = Arc::new(Self { engine, rules_linker, resolver_linker, limits, cache });
        // A weak handle: the ticker ends with the runtime.
        let weak: Weak<Self> = Arc::downgrade(&runtime);
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(rt) = weak.upgrade() {
                    rt.engine.increment_epoch();
                    drop(rt);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| PluginError::Runtime(e.to_string()))?;
        Ok(runtime)
    }

    /// Compiles `bytes` and checks it against `slot`'s world: the right exports, and
    /// no imports but the host interface (WASI imports that Rust's std links in are
    /// allowed but trap if called: plugins get no ambient access).
    pub fn compile(self: &Arc<Self>, slot: Slot, bytes: &[u8]) -> Result<Compiled, PluginError> {
        let component = self.component(bytes)?;
        let ty = component.component_type();
        for (name, item) in ty.imports(&self.engine) {
            let allowed = ["orchestrator:rules/host@1.", "orchestrator:rules/types@1.", "wasi:"]
                .iter()
                .any(|p| name.starts_with(p));
            if !allowed || !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
                return Err(PluginError::Invalid(format!(
                    "the component imports `{name}`, which the host does not provide; \
                     a {} plugin may import only orchestrator:rules/host",
                    slot.name()
                )));
            }
        }
        let mut linker = match slot {
            Slot::OrderRules => self.rules_linker.clone(),
            Slot::ConflictResolver => self.resolver_linker.clone(),
        };
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| PluginError::Invalid(format!("cannot link the component: {e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Invalid(format!("cannot link the component: {e:#}")))?;
        let world = |e: wasmtime::Error| {
            PluginError::Invalid(format!(
                "the component does not implement the `{}` world of orchestrator:rules@1.0.0: {}",
                slot.name(),
                root_cause(&e)
            ))
        };
        Ok(match slot {
            Slot::OrderRules => {
                let indices = OrderRulesIndices::new(&pre).map_err(world)?;
                let packed = packed_export(&component)?;
                Compiled::Rules(Typed::new(self, RulesPre { instance_pre: pre, indices, packed }))
            }
            Slot::ConflictResolver => {
                Compiled::Resolver(Typed::new(self, ConflictResolverPre::new(pre).map_err(world)?))
            }
        })
    }
}

impl Runtime {
    /// Deletes compiled code on disk for anything but `keep` (sha256s); nothing without
    /// a cache.
    pub fn prune_cache(&self, keep: &std::collections::HashSet<String>) {
        let Some(cache) = &self.cache else { return };
        match cache.prune(keep) {
            Ok(0) => {}
            Ok(gone) => tracing::info!(gone, "deleted compiled plugins no stored version needs"),
            Err(e) => {
                tracing::warn!(error = %e, "pruning the compile cache failed; it is tried again at the next start")
            }
        }
    }

    /// The compiled component: from the cache when it holds it, else compiled (and
    /// kept there).
    fn component(&self, bytes: &[u8]) -> Result<Component, PluginError> {
        let sha256 = super::sha256_hex(bytes);
        if let Some(component) = self.cache.as_ref().and_then(|c| c.load(&self.engine, &sha256)) {
            counter!(telemetry::PLUGIN_COMPILES, "source" => "cache").increment(1);
            return Ok(component);
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PluginError::Invalid(format!("not a valid WebAssembly component: {}", root_cause(&e))))?;
        counter!(telemetry::PLUGIN_COMPILES, "source" => "compiled").increment(1);
        if let Some(cache) = &self.cache {
            cache.store(&sha256, &component);
        }
        Ok(component)
    }
}

fn root_cause(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

/// One of the two worlds a plugin implements, and how an instance of it starts.
pub trait World: Sized + Send + 'static {
    type Pre: Send + Sync + 'static;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self>;
    /// Where the compiled code lies in memory.
    fn code_range(pre: &Self::Pre) -> std::ops::Range<*const u8>;
}

/// Where a component exports the optional packed fast path for batches.
const PACKED_INTERFACE: &str = "orchestrator:rules/packed@1.0.0";
const PACKED_FUNCTION: &str = "decide-packed";

/// The packed fast path of an order-rules component, if it exports one: a function
/// from `list<u8>` to `list<u8>`. Any other shape there is refused.
fn packed_export(component: &Component) -> Result<Option<ComponentExportIndex>, PluginError> {
    let Some((_, interface)) = component.get_export(None, PACKED_INTERFACE) else { return Ok(None) };
    let bytes = |ty: Option<Type>| matches!(ty, Some(Type::List(l)) if matches!(l.ty(), Type::U8));
    match component.get_export(Some(&interface), PACKED_FUNCTION) {
        Some((ComponentItem::ComponentFunc(f), index))
            if f.params().len() == 1
                && bytes(f.params().next().map(|(_, ty)| ty))
                && f.results().len() == 1
                && bytes(f.results().next()) =>
        {
            Ok(Some(index))
        }
        _ => Err(PluginError::Invalid(format!(
            "the component exports `{PACKED_INTERFACE}` without `{PACKED_FUNCTION}: func(inputs: list<u8>) -> \
             list<u8>`; export it as the WIT declares it, or not at all"
        ))),
    }
}

/// An instance of the order-rules world, with the packed fast path when the component
/// exports it.
pub struct Rules {
    world: RulesWorld,
    packed: Option<Func>,
}

/// A compiled order-rules component, linked and ready to instantiate.
pub struct RulesPre {
    instance_pre: InstancePre<Sandbox>,
    indices: OrderRulesIndices,
    packed: Option<ComponentExportIndex>,
}

impl World for Rules {
    type Pre = RulesPre;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self> {
        let instance = pre.instance_pre.instantiate(&mut *store)?;
        let world = pre.indices.load(&mut *store, &instance)?;
        let packed = match &pre.packed {
            Some(index) => Some(
                instance
                    .get_func(&mut *store, index)
                    .ok_or_else(|| wasmtime::format_err!("the instance lacks `{PACKED_FUNCTION}`"))?,
            ),
            None => None,
        };
        Ok(Self { world, packed })
    }
    fn code_range(pre: &Self::Pre) -> std::ops::Range<*const u8> {
        pre.instance_pre.component().image_range()
    }
}

impl World for ResolverWorld {
    type Pre = ConflictResolverPre<Sandbox>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self> {
        pre.instantiate(store)
    }
    fn code_range(pre: &Self::Pre) -> std::ops::Range<*const u8> {
        pre.instance_pre().component().image_range()
    }
}

/// What one loaded plugin version holds in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct LoadedMemory {
    /// Its compiled code (shared by its instances).
    pub code_bytes: u64,
    /// Idle instances kept for the next calls (one per thread that called it).
    pub instances: u64,
    /// Their linear memory (each memory of an instance is at most the memory cap).
    pub instance_bytes: u64,
}

/// A compiled, contract-checked plugin of one world, ready to instantiate.
pub struct Typed<W: World> {
    runtime: Arc<Runtime>,
    pre: W::Pre,
}

impl<W: World> Typed<W> {
    fn new(runtime: &Arc<Runtime>, pre: W::Pre) -> Self {
        Self { runtime: runtime.clone(), pre }
    }
}

/// A compiled plugin, typed by the world its slot asked for.
pub enum Compiled {
    Rules(Typed<Rules>),
    Resolver(Typed<ResolverWorld>),
}

impl Compiled {
    /// Loads it for calls: `id` is `slot@version#sha256:<12 hex>`.
    pub fn load(self, version: u64, sha256: &str) -> Handle {
        match self {
            Compiled::Rules(t) => Handle::Rules(Loaded::new(t, Slot::OrderRules, Some(version), sha256)),
            Compiled::Resolver(t) => Handle::Resolver(Loaded::new(t, Slot::ConflictResolver, Some(version), sha256)),
        }
    }

    /// Loads it apart from the live versions, for a what-if run: its own instances, and
    /// no plugin metrics (its calls and failures are not the live path's). The id reads
    /// `slot@what-if#sha256:<12 hex>`.
    pub fn load_apart(self, sha256: &str) -> Handle {
        match self {
            Compiled::Rules(t) => Handle::Rules(Loaded::new(t, Slot::OrderRules, None, sha256)),
            Compiled::Resolver(t) => Handle::Resolver(Loaded::new(t, Slot::ConflictResolver, None, sha256)),
        }
    }
}

/// A loaded plugin version of either world: what the registry keeps per version.
#[derive(Clone)]
pub enum Handle {
    Rules(Arc<Loaded<Rules>>),
    Resolver(Arc<Loaded<ResolverWorld>>),
}

impl Handle {
    pub fn id(&self) -> &str {
        match self {
            Handle::Rules(l) => l.id(),
            Handle::Resolver(l) => l.id(),
        }
    }

    pub fn memory(&self) -> LoadedMemory {
        match self {
            Handle::Rules(l) => l.memory(),
            Handle::Resolver(l) => l.memory(),
        }
    }

    pub fn calls(&self) -> LoadedCalls {
        match self {
            Handle::Rules(l) => l.calls(),
            Handle::Resolver(l) => l.calls(),
        }
    }

    /// Starts the component and calls it once on a sample (a new order; a race on it
    /// for a resolver): a component that reaches for an import the host does not give
    /// (WASI) traps here, at upload, instead of on every event once it is live. What it
    /// decides does not matter, only that it decides.
    pub fn smoke_check(&self) -> Result<(), RuleError> {
        let event = sample_event();
        match self {
            Handle::Rules(l) => {
                l.check_instantiates()?;
                let none = || RuleError { kind: RuleErrorKind::Instantiate, message: "no decision".into() };
                l.decide_batch(&[(&event, None)]).pop().unwrap_or_else(|| Err(none()))?;
                l.check_packed_path(&[(&event, None)])
            }
            Handle::Resolver(l) => {
                l.check_instantiates()?;
                let row = sample_row(&event);
                let change = Order { note: "smoke check".into(), version: 2, ..row.clone() };
                l.resolve(Some(&row), &row, &change).map(drop)
            }
        }
    }
}

/// The order a smoke check decides: a plain new order, as any source sends one.
fn sample_event() -> OrderEvent {
    OrderEvent {
        event_id: "smoke-check-1".into(),
        order_id: "smoke-check".into(),
        kind: crate::domain::EventKind::Created,
        source: "smoke-check".into(),
        occurred_at: chrono::Utc::now(),
        payload: crate::domain::OrderChange {
            customer: Some("smoke@example.com".into()),
            tier: Some(crate::domain::Tier::Gold),
            total_cents: Some(12_345),
            currency: Some("USD".into()),
            ..Default::default()
        },
        accepted_at: None,
        shop: None,
    }
}

/// The row the sample event makes.
pub(super) fn sample_row(event: &OrderEvent) -> Order {
    Order {
        id: event.order_id.clone(),
        shopify_order_id: None,
        customer: "smoke@example.com".into(),
        tier: crate::domain::Tier::Gold,
        priority: crate::domain::Priority::Normal,
        status: crate::domain::Status::Pending,
        total_cents: 12_345,
        shipping_fee_cents: 0,
        currency: "USD".into(),
        note: String::new(),
        version: 1,
        created_at: event.occurred_at,
        updated_at: event.occurred_at,
        source_updated_at: None,
        decided_by: "smoke-check".into(),
        changed_at: Default::default(),
        shop: None,
    }
}

struct Instance<W> {
    store: Store<Sandbox>,
    bindings: W,
}

/// Metric handles of one loaded plugin version.
struct PluginMetrics {
    ok: Counter,
    failed: Counter,
    duration: Histogram,
}

/// A plugin version of world `W`, loaded for calls: `id` is `slot@version#sha256:<12 hex>`.
pub struct Loaded<W: World> {
    id: String,
    compiled: Typed<W>,
    /// Idle instances, reused across calls; one that failed is dropped, never reused.
    idle: Mutex<Vec<Instance<W>>>,
    metrics: PluginMetrics,
    /// This instance's figures for the plugins page.
    tally: CallTally,
    /// Events in a row that timed out on every attempt (see [`Loaded::call`]).
    timed_out_in_a_row: AtomicU32,
}

impl<W: World> Loaded<W> {
    fn new(compiled: Typed<W>, slot: Slot, version: Option<u64>, sha256: &str) -> Arc<Self> {
        let sha = &sha256[..12.min(sha256.len())];
        let Some(version) = version else {
            let id = format!("{}@what-if#sha256:{sha}", slot.name());
            let metrics = PluginMetrics { ok: Counter::noop(), failed: Counter::noop(), duration: Histogram::noop() };
            let idle = Mutex::new(Vec::new());
            let (tally, timed_out_in_a_row) = (CallTally::default(), AtomicU32::new(0));
            return Arc::new(Self { id, compiled, idle, metrics, tally, timed_out_in_a_row });
        };
        let id = format!("{}@{version}#sha256:{sha}", slot.name());
        let labels = [("plugin", slot.name().to_string()), ("version", version.to_string())];
        let metrics = PluginMetrics {
            ok: counter!(
                telemetry::PLUGIN_CALLS,
                &[labels[0].clone(), labels[1].clone(), ("outcome", "ok".to_string())]
            ),
            failed: counter!(
                telemetry::PLUGIN_CALLS,
                &[labels[0].clone(), labels[1].clone(), ("outcome", "error".to_string())]
            ),
            duration: histogram!(telemetry::PLUGIN_DURATION, &labels),
        };
        let (idle, tally, timed_out_in_a_row) = (Mutex::new(Vec::new()), CallTally::default(), AtomicU32::new(0));
        Arc::new(Self { id, compiled, idle, metrics, tally, timed_out_in_a_row })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its calls on this instance since it was loaded.
    pub fn calls(&self) -> LoadedCalls {
        self.tally.snapshot()
    }

    /// What this loaded version holds in memory now.
    pub fn memory(&self) -> LoadedMemory {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let code = W::code_range(&self.compiled.pre);
        LoadedMemory {
            code_bytes: (code.end as usize).saturating_sub(code.start as usize) as u64,
            instances: idle.len() as u64,
            instance_bytes: idle.iter().map(|i| i.store.data().memory_in_use as u64).sum(),
        }
    }

    /// Instantiates once and drops the instance: proves the component starts.
    ///
    /// A start that runs past the deadline is tried again with twice the deadline, like
    /// a call: on a busy machine a healthy component can miss it once.
    pub fn check_instantiates(&self) -> Result<(), RuleError> {
        patiently(|stretch| self.instantiate(u64::from(stretch))).map(drop)
    }

    /// A fresh instance; its start runs under `stretch` times the deadline.
    fn instantiate(&self, stretch: u64) -> Result<Instance<W>, RuleError> {
        let rt = &self.compiled.runtime;
        let sandbox = Sandbox {
            memory_bytes: rt.limits.memory_bytes,
            memory_in_use: 0,
            growing: 0,
            hit_memory_cap: false,
            plugin: self.id.as_str().into(),
            last_error_log: None,
        };
        let mut store = Store::new(&rt.engine, sandbox);
        store.limiter(|s| s);
        store.set_epoch_deadline(ticks(rt.limits.deadline) * stretch);
        let bindings =
            W::instantiate(&self.compiled.pre, &mut store).map_err(|e| classify(&e, store.data(), "instantiating"))?;
        Ok(Instance { store, bindings })
    }

    /// Runs `f` on an idle (or new) instance under the deadline, for one event. An
    /// instance whose call failed is discarded: after a trap a component cannot be
    /// entered again.
    ///
    /// A deadline passes when the machine stalls, not only when a plugin loops, so a
    /// timeout is transient: it is tried again after a pause, with twice the deadline
    /// each time, [`TIMEOUT_ATTEMPTS`] times in all. Only a plugin that runs out of time
    /// on every attempt fails the event.
    ///
    /// A plugin that really loops would cost every attempt on every event, so after
    /// [`LOOPING_AFTER`] events in a row failed all their attempts, each further event
    /// gets one attempt, until the plugin decides one again.
    fn call<T>(&self, f: impl Fn(&mut Instance<W>) -> wasmtime::Result<T>) -> Result<T, RuleError> {
        let looping = self.timed_out_in_a_row.load(AtomicOrdering::Relaxed) >= LOOPING_AFTER;
        let attempts = if looping { 1 } else { TIMEOUT_ATTEMPTS };
        let mut attempt = 1;
        loop {
            match self.call_for(1, 1 << (attempt - 1), &f) {
                Err(e) if e.kind == RuleErrorKind::Timeout && attempt < attempts => {
                    std::thread::sleep(TIMEOUT_PAUSE * attempt);
                    attempt += 1;
                }
                Err(mut e) if e.kind == RuleErrorKind::Timeout => {
                    self.timed_out_in_a_row.fetch_add(1, AtomicOrdering::Relaxed);
                    let last = self.compiled.runtime.limits.deadline * (1 << (attempt - 1));
                    e.message = format!("{} ({attempt} attempts, the last one {last:?})", e.message);
                    return Err(e);
                }
                other => {
                    if other.is_ok() {
                        self.timed_out_in_a_row.store(0, AtomicOrdering::Relaxed);
                    }
                    return other;
                }
            }
        }
    }

    /// A call deciding `events` events: the deadline grows with the batch (one budget
    /// per 64 events), so a long batch of fast decisions is not mistaken for a loop,
    /// and by `stretch` on a retry.
    fn call_for<T>(
        &self,
        events: usize,
        stretch: u32,
        f: impl Fn(&mut Instance<W>) -> wasmtime::Result<T>,
    ) -> Result<T, RuleError> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut inst = match taken {
            Some(i) => i,
            None => self.instantiate(u64::from(stretch))?,
        };
        let budgets = events.div_ceil(64).max(1) as u64 * u64::from(stretch);
        inst.store.set_epoch_deadline(ticks(self.compiled.runtime.limits.deadline) * budgets);
        inst.store.data_mut().last_error_log = None;
        let started = Instant::now();
        let result = f(&mut inst);
        let took = started.elapsed();
        self.metrics.duration.record(took.as_secs_f64());
        self.tally.record(took, result.is_ok());
        match result {
            Ok(v) => {
                self.metrics.ok.increment(1);
                self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(inst);
                Ok(v)
            }
            Err(e) => {
                self.metrics.failed.increment(1);
                let err = classify(&e, inst.store.data(), "calling");
                let kind = err.kind.as_str();
                counter!(telemetry::PLUGIN_ERRORS, "plugin" => self.id.clone(), "error_type" => kind).increment(1);
                Err(err)
            }
        }
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_millis() as u64 / TICK.as_millis() as u64).max(1)
}

/// Names why a call failed, with the plugin's own last words when it left some.
fn classify(e: &wasmtime::Error, sandbox: &Sandbox, doing: &str) -> RuleError {
    let said = sandbox.last_error_log.as_deref().map(|m| format!(" (plugin said: {m})")).unwrap_or_default();
    let (kind, message) = if sandbox.hit_memory_cap {
        (RuleErrorKind::MemoryLimit, format!("the plugin tried to grow its memory past {} bytes", sandbox.memory_bytes))
    } else {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => (RuleErrorKind::Timeout, "the plugin ran past its deadline".to_string()),
            Some(trap) => (RuleErrorKind::Trap, format!("trap while {doing}: {trap}")),
            None if doing == "instantiating" => (RuleErrorKind::Instantiate, format!("{e:#}")),
            None => (RuleErrorKind::Trap, format!("{e:#}")),
        }
    };
    RuleError { kind, message: format!("{message}{said}") }
}

impl OrderRules for Loaded<Rules> {
    fn id(&self) -> &str {
        &self.id
    }

    fn decide_batch(&self, inputs: &[(&OrderEvent, Option<&Order>)]) -> Vec<Result<Decision, RuleError>> {
        self.decide_batch_by(Path::Packed, inputs)
    }
}

/// How a batch crosses into an order-rules component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One buffer each way, when the component exports `decide-packed`; else typed.
    Packed,
    /// `decide-batch` with WIT records, which every component exports.
    Typed,
}

impl Loaded<Rules> {
    /// Whether the component exports the packed fast path.
    pub fn has_packed_path(&self) -> bool {
        self.compiled.pre.packed.is_some()
    }

    /// Decides a batch through `path` (the engine always asks for [`Path::Packed`];
    /// the other is there to compare the two in tests and benchmarks).
    pub fn decide_batch_by(
        &self,
        path: Path,
        inputs: &[(&OrderEvent, Option<&Order>)],
    ) -> Vec<Result<Decision, RuleError>> {
        match self.batch(path, inputs, 1) {
            Ok(decisions) => decisions.into_iter().map(Ok).collect(),
            // One event failed the whole call: decide one by one, so only it fails (and a
            // lone event's timeout gets its retries too).
            Err(_) => inputs
                .iter()
                .map(|(event, current)| {
                    let input = wit::input(event, *current);
                    self.call(|inst| {
                        let rules = inst.bindings.world.orchestrator_rules_rules();
                        rules.call_decide(&mut inst.store, &input.event, input.current.as_ref())
                    })
                    .map(wit::decision_back)
                })
                .collect(),
        }
    }

    /// One call deciding the whole batch through `path`, with no fallback. Encoding and
    /// decoding happen outside the call, so they count neither against the plugin's
    /// deadline nor in its duration metric.
    /// The deadline is `stretch` times the batch's.
    fn batch(
        &self,
        path: Path,
        inputs: &[(&OrderEvent, Option<&Order>)],
        stretch: u32,
    ) -> Result<Vec<Decision>, RuleError> {
        let decisions = if path == Path::Packed && self.has_packed_path() {
            let bytes = super::packed::encode_inputs(inputs);
            let out = self.call_for(inputs.len(), stretch, |inst| call_packed(inst, &bytes))?;
            super::packed::decode_decisions(&out).map_err(|e| RuleError {
                kind: RuleErrorKind::Trap,
                message: format!("the plugin's decide-packed answer is unreadable: {e}"),
            })?
        } else {
            let wit_inputs: Vec<_> = inputs.iter().map(|(e, c)| wit::input(e, *c)).collect();
            let decisions = self.call_for(inputs.len(), stretch, |inst| {
                let rules = inst.bindings.world.orchestrator_rules_rules();
                rules.call_decide_batch(&mut inst.store, &wit_inputs)
            })?;
            decisions.into_iter().map(wit::decision_back).collect()
        };
        if decisions.len() != inputs.len() {
            let message = format!("the plugin returned {} decisions for {} events", decisions.len(), inputs.len());
            return Err(RuleError { kind: RuleErrorKind::Instantiate, message });
        }
        Ok(decisions)
    }

    /// The packed path must decide the smoke check's sample as the typed one does: a
    /// component whose fast path is broken would otherwise fail every batch once and
    /// fall back, slowly, without anyone noticing.
    fn check_packed_path(&self, sample: &[(&OrderEvent, Option<&Order>)]) -> Result<(), RuleError> {
        if !self.has_packed_path() {
            return Ok(());
        }
        // Checks at upload: a timeout is tried again, as a call is (a busy machine must
        // not refuse a healthy plugin).
        let packed = patiently(|stretch| self.batch(Path::Packed, sample, stretch))?;
        let typed = patiently(|stretch| self.batch(Path::Typed, sample, stretch))?;
        if packed != typed {
            return Err(RuleError {
                kind: RuleErrorKind::Instantiate,
                message: format!(
                    "decide-packed decided {packed:?} where decide-batch decided {typed:?}; \
                     they must decide alike (rebuild with the SDK, or drop the packed export)"
                ),
            });
        }
        Ok(())
    }
}

/// Calls `decide-packed`: a buffer in, a buffer out.
fn call_packed(inst: &mut Instance<Rules>, bytes: &[u8]) -> wasmtime::Result<Vec<u8>> {
    let packed = inst.bindings.packed.ok_or_else(|| wasmtime::format_err!("no `{PACKED_FUNCTION}` export"))?;
    let call = packed.typed::<(&[u8],), (Vec<u8>,)>(&inst.store)?;
    Ok(call.call(&mut inst.store, (bytes,))?.0)
}

impl ConflictResolver for Loaded<ResolverWorld> {
    fn id(&self) -> &str {
        &self.id
    }

    fn resolve(
        &self,
        base: Option<&Order>,
        current: &Order,
        change: &Order,
    ) -> Result<Result<OrderFields, String>, RuleError> {
        let (base, current, change) = (base.map(wit::order), wit::order(current), wit::order(change));
        self.call(|inst| {
            let resolver = inst.bindings.orchestrator_rules_resolver();
            resolver.call_resolve(&mut inst.store, base.as_ref(), &current, &change)
        })
        .map(|r| r.map(wit::fields_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> RuleError {
        RuleError { kind: RuleErrorKind::Timeout, message: "ran past its deadline".into() }
    }

    /// An upload's checks go through `patiently`: a first call that misses its deadline
    /// on a starved machine is tried again with more time instead of refusing the plugin
    /// (the CI run of 55e9d28 refused a healthy one this way); a trap is not retried.
    #[test]
    fn checks_at_upload_try_a_timeout_again_with_more_time() {
        let stretches = std::cell::RefCell::new(Vec::new());
        let passed = patiently(|stretch| {
            stretches.borrow_mut().push(stretch);
            if stretch < 4 { Err(timeout()) } else { Ok(stretch) }
        });
        assert_eq!((passed.unwrap(), stretches.take()), (4, vec![1, 2, 4]));

        let looping = patiently(|stretch| {
            stretches.borrow_mut().push(stretch);
            Err::<(), _>(timeout())
        });
        assert_eq!(looping.unwrap_err().kind, RuleErrorKind::Timeout);
        assert_eq!(stretches.take(), vec![1, 2, 4, 8, 16], "five tries in all");

        let trap = patiently(|stretch| {
            stretches.borrow_mut().push(stretch);
            Err::<(), _>(RuleError { kind: RuleErrorKind::Trap, message: "unreachable".into() })
        });
        assert_eq!((trap.unwrap_err().kind, stretches.take()), (RuleErrorKind::Trap, vec![1]));
    }
}
