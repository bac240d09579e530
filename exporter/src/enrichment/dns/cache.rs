//! The answers each process and each container received, by address.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::parse::{Answer, DnsError, Transport, parse_captured};

/// Where "now" comes from; tests inject a [`ManualClock`].
pub trait Clock {
    fn now(&self) -> Instant;
}

/// The monotonic clock of the machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    elapsed: Arc<Mutex<Duration>>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            elapsed: Arc::new(Mutex::new(Duration::ZERO)),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed.lock().unwrap_or_else(|e| e.into_inner());
        *elapsed = elapsed.saturating_add(by);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        let elapsed = *self.elapsed.lock().unwrap_or_else(|e| e.into_inner());
        self.start + elapsed
    }
}

/// Limits of a [`DnsCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCacheConfig {
    /// Entries kept at most, per-process and per-container entries together
    /// (an answer received in a container makes two). Past it the oldest
    /// answers (by receive time) go first. 0 turns the cache off.
    pub max_entries: usize,
    /// Entries live at least this long whatever their TTL: connections
    /// outlive TTLs, and a flow is usually first drained seconds after the
    /// answer that led to it.
    pub min_ttl: Duration,
    /// Entries live at most this long whatever their TTL (a TTL of 68 years
    /// is legal on the wire); never less than `min_ttl`.
    pub max_ttl: Duration,
    /// How long a process's answers outlive its exit (see
    /// [`DnsCache::forget_process`]).
    pub exit_grace: Duration,
}

impl Default for DnsCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 65_536,
            min_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(86_400),
            exit_grace: Duration::from_secs(10),
        }
    }
}

/// Self-metrics of a [`DnsCache`], updated by the cache itself. All counts
/// are totals since start. Unregistered (`default()`) they only count, for
/// tests and the fuzzer; [`DnsCounters::register`] exports them.
#[derive(Debug, Clone, Default)]
pub struct DnsCounters {
    /// Answers (address, name) recorded, per-process and per-container
    /// entries counted once per answer.
    pub answers_recorded: Counter,
    /// Payloads that were not a well-formed DNS message
    /// ([`DnsError::is_failure`]), including TCP payloads whose first
    /// message was read but a later one was damaged.
    pub parse_failures: Counter,
    /// Well-formed messages with nothing to attribute (queries, responses to
    /// other opcodes, several questions).
    pub ignored_messages: Counter,
    /// Payloads cut before their end (capture limit): some answers were lost.
    pub truncated_payloads: Counter,
    /// Entries dropped before their expiry because the cache was full.
    pub evictions: Counter,
    /// Entries dropped at their expiry.
    pub expirations: Counter,
    /// Entries held.
    pub entries: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// A copy of [`DnsCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub answers_recorded: u64,
    pub parse_failures: u64,
    pub ignored_messages: u64,
    pub truncated_payloads: u64,
    pub evictions: u64,
    pub expirations: u64,
}

impl DnsCounters {
    /// Counters registered as `fleetsnitch_dns_messages_total{result}`,
    /// `_dns_cache_evictions_total` and `_dns_cache_entries`.
    pub fn register(registry: &mut Registry) -> Self {
        let messages = Family::<ResultLabel, Counter>::default();
        let result = |result| messages.get_or_create(&ResultLabel { result }).clone();
        let counters = Self {
            answers_recorded: result("answer_recorded"),
            parse_failures: result("parse_failure"),
            ignored_messages: result("ignored"),
            truncated_payloads: result("truncated"),
            ..Self::default()
        };
        registry.register(
            "dns_messages",
            "DNS responses seen at the socket layer, by result (answer_recorded counts answers; parse_failure, ignored, truncated count messages)",
            messages,
        );
        registry.register(
            "dns_cache_evictions",
            "DNS answers dropped before expiry because the cache was full",
            counters.evictions.clone(),
        );
        registry.register(
            "dns_cache_entries",
            "DNS answers held (per process and per container)",
            counters.entries.clone(),
        );
        counters
    }

    pub fn snapshot(&self) -> DnsStats {
        DnsStats {
            answers_recorded: self.answers_recorded.get(),
            parse_failures: self.parse_failures.get(),
            ignored_messages: self.ignored_messages.get(),
            truncated_payloads: self.truncated_payloads.get(),
            evictions: self.evictions.get(),
            expirations: self.expirations.get(),
        }
    }

    fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }
}

/// Whose answer named the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DomainSource {
    /// The process itself received the answer.
    Process,
    /// Another process of the same container did.
    Container,
    // A reverse (PTR) lookup would be a third source, tried last.
}

/// The answer [`DnsCache::resolve`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The name the client asked for.
    pub name: Arc<str>,
    /// The end of its CNAME chain (the address record's owner).
    pub canonical: Arc<str>,
    pub source: DomainSource,
    /// When the answer was recorded.
    pub received: Instant,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    canonical: Arc<str>,
    received: Instant,
    expires: Instant,
    /// Recording order: larger is newer. Unique per entry.
    seq: u64,
}

/// Where an entry lives, for the eviction and expiry indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot {
    Process(u32, IpAddr),
    Container(Arc<str>, IpAddr),
}

/// DNS answers per (process, address) and per (container, address).
///
/// [`domain_for`](Self::domain_for) names an address for a process from the
/// answer that process received most recently for it, else from the answer
/// its container received most recently, else not at all: an answer another
/// program resolved is never used, so two programs that resolved two names
/// sharing one address (a CDN, a load balancer) each get their own name.
///
/// Entries expire at receive time + the answer's TTL, clamped to
/// [`DnsCacheConfig::min_ttl`]..=[`DnsCacheConfig::max_ttl`]. The number of
/// entries is bounded by [`DnsCacheConfig::max_entries`]: when full, expired
/// entries go first, then the oldest by receive time (re-receiving an answer
/// makes it new again). Every operation costs O(log n) per entry touched.
///
/// Process ids are reused; the cache keys on the tgid alone and relies on
/// [`forget_process`](Self::forget_process) being called at exit, and on
/// newer answers replacing older ones for the same address.
#[derive(Debug)]
pub struct DnsCache<C: Clock = SystemClock> {
    config: DnsCacheConfig,
    clock: C,
    processes: HashMap<u32, HashMap<IpAddr, Entry>>,
    containers: HashMap<Arc<str>, HashMap<IpAddr, Entry>>,
    /// Every entry by `seq`: the first is the oldest.
    by_age: BTreeMap<u64, Slot>,
    /// Every entry by (expiry, seq): the first expires soonest.
    by_expiry: BTreeSet<(Instant, u64)>,
    next_seq: u64,
    counters: DnsCounters,
}

impl DnsCache<SystemClock> {
    pub fn new(config: DnsCacheConfig) -> Self {
        Self::with_clock(config, SystemClock)
    }
}

impl Default for DnsCache<SystemClock> {
    fn default() -> Self {
        Self::new(DnsCacheConfig::default())
    }
}

impl<C: Clock> DnsCache<C> {
    pub fn with_clock(config: DnsCacheConfig, clock: C) -> Self {
        Self {
            config,
            clock,
            processes: HashMap::new(),
            containers: HashMap::new(),
            by_age: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            next_seq: 0,
            counters: DnsCounters::default(),
        }
    }

    pub fn config(&self) -> &DnsCacheConfig {
        &self.config
    }

    /// Counts into `counters` from now on (registered ones, to export them).
    pub fn with_counters(mut self, counters: DnsCounters) -> Self {
        self.counters = counters;
        self
    }

    /// The counters (they stay valid as the cache changes).
    pub fn counters(&self) -> &DnsCounters {
        &self.counters
    }

    pub fn stats(&self) -> DnsStats {
        self.counters.snapshot()
    }

    /// Entries held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.by_age.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_age.is_empty()
    }

    /// Parses a DNS response payload the process `tgid` (in `container`,
    /// if any) received, of which the kernel captured `payload` out of
    /// `wire_len` bytes (see [`parse_captured`]), and records its answers;
    /// counts parse failures, ignored messages and truncated payloads.
    /// Returns the number of answers recorded.
    pub fn record_payload(
        &mut self,
        tgid: u32,
        container: Option<&str>,
        payload: &[u8],
        wire_len: usize,
        transport: Transport,
    ) -> Result<usize, DnsError> {
        match parse_captured(payload, wire_len, transport) {
            Ok(parsed) => {
                if parsed.truncated {
                    DnsCounters::add(&self.counters.truncated_payloads, 1);
                }
                if parsed
                    .later_error
                    .as_ref()
                    .is_some_and(DnsError::is_failure)
                {
                    DnsCounters::add(&self.counters.parse_failures, 1);
                }
                Ok(self.record(tgid, container, &parsed.answers))
            }
            Err(error) => {
                let counter = if error.is_failure() {
                    &self.counters.parse_failures
                } else {
                    &self.counters.ignored_messages
                };
                DnsCounters::add(counter, 1);
                Err(error)
            }
        }
    }

    /// Records answers the process `tgid` received, now, for the process and
    /// for its container (`None` or an empty id: not in a container).
    /// tgid 0 means "process unknown": the answers are then kept for the
    /// container only, never under a shared process 0. Returns the number of
    /// answers recorded.
    pub fn record(&mut self, tgid: u32, container: Option<&str>, answers: &[Answer]) -> usize {
        let container = container.filter(|id| !id.is_empty());
        if self.config.max_entries == 0 || answers.is_empty() || (tgid == 0 && container.is_none())
        {
            return 0;
        }
        let now = self.clock.now();
        let container: Option<Arc<str>> = container.map(|id| {
            self.containers
                .get_key_value(id)
                .map_or_else(|| Arc::from(id), |(key, _)| Arc::clone(key))
        });
        // Answers of one response share their names: one allocation each.
        let mut names: Option<(Arc<str>, Arc<str>)> = None;
        for answer in answers {
            let ttl = Duration::from_secs(u64::from(answer.ttl))
                .min(self.config.max_ttl)
                .max(self.config.min_ttl);
            let (name, canonical) = match names.take() {
                Some((name, canonical))
                    if *name == *answer.name && *canonical == *answer.canonical =>
                {
                    (name, canonical)
                }
                _ => {
                    let name: Arc<str> = Arc::from(answer.name.as_str());
                    let canonical = if answer.canonical == answer.name {
                        Arc::clone(&name)
                    } else {
                        Arc::from(answer.canonical.as_str())
                    };
                    (name, canonical)
                }
            };
            let expires = now.checked_add(ttl).unwrap_or(now);
            let entry = |seq| Entry {
                name: Arc::clone(&name),
                canonical: Arc::clone(&canonical),
                received: now,
                expires,
                seq,
            };
            if tgid != 0 {
                let seq = self.take_seq();
                self.insert(Slot::Process(tgid, answer.addr), entry(seq), now);
            }
            if let Some(container) = &container {
                let seq = self.take_seq();
                let slot = Slot::Container(Arc::clone(container), answer.addr);
                self.insert(slot, entry(seq), now);
            }
            names = Some((name, canonical));
        }
        DnsCounters::add(&self.counters.answers_recorded, answers.len() as u64);
        answers.len()
    }

    /// The name `tgid` asked for that resolved to `ip`, from its own most
    /// recent answer, else its container's (see [`resolve`](Self::resolve)).
    pub fn domain_for(&self, tgid: u32, container: Option<&str>, ip: IpAddr) -> Option<String> {
        self.resolve(tgid, container, ip)
            .map(|resolved| resolved.name.to_string())
    }

    /// The unexpired answer for `ip` that `tgid` received most recently, else
    /// the one any process of `container` received most recently, else
    /// `None`. Nothing is guessed from other processes or containers; tgid 0
    /// (unknown) has no answers of its own.
    pub fn resolve(&self, tgid: u32, container: Option<&str>, ip: IpAddr) -> Option<Resolved> {
        let now = self.clock.now();
        let live = |entry: &&Entry| entry.expires > now;
        let found = |entry: &Entry, source| Resolved {
            name: Arc::clone(&entry.name),
            canonical: Arc::clone(&entry.canonical),
            source,
            received: entry.received,
        };
        if let Some(entry) = Some(tgid)
            .filter(|&tgid| tgid != 0)
            .and_then(|tgid| self.processes.get(&tgid))
            .and_then(|answers| answers.get(&ip))
            .filter(live)
        {
            return Some(found(entry, DomainSource::Process));
        }
        if let Some(entry) = container
            .filter(|id| !id.is_empty())
            .and_then(|id| self.containers.get(id))
            .and_then(|answers| answers.get(&ip))
            .filter(live)
        {
            return Some(found(entry, DomainSource::Container));
        }
        // A reverse (PTR) lookup would be tried here.
        None
    }

    /// The process `tgid` exited. Its answers are not dropped at once: the
    /// kernel's counters for its last traffic are drained (and need their
    /// domain) after the exit is announced, so they stay for
    /// [`DnsCacheConfig::exit_grace`] (or until their own expiry, if sooner)
    /// and then expire. A process that reuses the tgid within that grace
    /// could be named from them, but only for addresses it did not resolve
    /// itself. Its container's entries are kept: the container lives on.
    pub fn forget_process(&mut self, tgid: u32) {
        let Some(answers) = self.processes.get_mut(&tgid) else {
            return;
        };
        let deadline = self.clock.now() + self.config.exit_grace;
        for entry in answers.values_mut() {
            if entry.expires > deadline {
                self.by_expiry.remove(&(entry.expires, entry.seq));
                entry.expires = deadline;
                self.by_expiry.insert((deadline, entry.seq));
            }
        }
    }

    /// Drops every expired entry; returns how many. Recording purges as
    /// needed when the cache is full; call this periodically (each drain)
    /// to give memory back sooner.
    pub fn purge_expired(&mut self) -> usize {
        let now = self.clock.now();
        let mut purged = 0;
        while let Some(&(expires, seq)) = self.by_expiry.first() {
            if expires > now {
                break;
            }
            self.remove(seq);
            purged += 1;
        }
        DnsCounters::add(&self.counters.expirations, purged as u64);
        self.counters.entries.set(self.len() as i64);
        purged
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Stores `entry` at `slot`, replacing what was there; makes room first.
    fn insert(&mut self, slot: Slot, entry: Entry, now: Instant) {
        let (expires, seq) = (entry.expires, entry.seq);
        let replaced = match &slot {
            Slot::Process(tgid, ip) => self.processes.get(tgid).and_then(|m| m.get(ip)),
            Slot::Container(id, ip) => self.containers.get(id).and_then(|m| m.get(ip)),
        }
        .map(|old| old.seq);
        match replaced {
            Some(old) => self.remove(old),
            None => self.make_room(now),
        }
        match &slot {
            Slot::Process(tgid, ip) => put(&mut self.processes, *tgid, *ip, entry),
            Slot::Container(id, ip) => put(&mut self.containers, Arc::clone(id), *ip, entry),
        }
        self.by_age.insert(seq, slot);
        self.by_expiry.insert((expires, seq));
    }

    /// Frees one place if the cache is full: an expired entry if there is
    /// one, else the oldest.
    fn make_room(&mut self, now: Instant) {
        while self.by_age.len() >= self.config.max_entries {
            if let Some(&(expires, seq)) = self.by_expiry.first()
                && expires <= now
            {
                self.remove(seq);
                DnsCounters::add(&self.counters.expirations, 1);
            } else if let Some((&seq, _)) = self.by_age.first_key_value() {
                self.remove(seq);
                DnsCounters::add(&self.counters.evictions, 1);
            } else {
                return;
            }
        }
    }

    /// Removes the entry recorded as `seq` from the maps and both indexes.
    fn remove(&mut self, seq: u64) {
        let Some(slot) = self.by_age.remove(&seq) else {
            return;
        };
        let entry = match &slot {
            Slot::Process(tgid, ip) => take(&mut self.processes, tgid, ip),
            Slot::Container(id, ip) => take(&mut self.containers, id, ip),
        };
        if let Some(entry) = entry {
            self.by_expiry.remove(&(entry.expires, entry.seq));
        }
    }
}

fn put<K: Eq + Hash>(
    map: &mut HashMap<K, HashMap<IpAddr, Entry>>,
    key: K,
    ip: IpAddr,
    entry: Entry,
) {
    map.entry(key).or_default().insert(ip, entry);
}

fn take<K: Eq + Hash>(
    map: &mut HashMap<K, HashMap<IpAddr, Entry>>,
    key: &K,
    ip: &IpAddr,
) -> Option<Entry> {
    let answers = map.get_mut(key)?;
    let entry = answers.remove(ip);
    if answers.is_empty() {
        map.remove(key);
    }
    entry
}
