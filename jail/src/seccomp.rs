//! Seccomp allowlists as reviewable data: a tiny DSL ([`allow`], [`allow_if`], [`fail_with`],
//! [`arg_eq`], [`arg_masked_eq`]), the union of policies, compilation to BPF with seccompiler,
//! installation on all threads, [`thread_runtime_policy`] and [`base_runtime_policy`].
//!
//! A compiled filter traps (SIGSYS) every syscall no rule allows. Rules of one syscall are
//! OR-ed, the conditions of one rule AND-ed; an unconditional rule absorbs conditional ones.

use std::{collections::BTreeMap, fmt};

use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use crate::JailError;

/// `AUDIT_ARCH_X86_64` from `<linux/audit.h>` (not exported by libc).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// A value compared with a syscall argument. Comparisons use the argument's low 32 bits: every
/// argument we narrow (fds, `int` flags and commands, the `unsigned int` ioctl request, the
/// clone flags the kernel truncates to 32 bits) is 32-bit in the kernel.
pub trait Dword: Copy {
    /// The low 32 bits, as the kernel reads the argument.
    fn dword(self) -> u32;
}

impl Dword for i32 {
    fn dword(self) -> u32 {
        self as u32
    }
}

impl Dword for u32 {
    fn dword(self) -> u32 {
        self
    }
}

impl Dword for u64 {
    fn dword(self) -> u32 {
        self as u32
    }
}

/// `(arg & mask) == value` on the argument's low 32 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond {
    arg: u8,
    mask: u32,
    value: u32,
}

/// Argument `arg` (0-based) equals `value`.
pub fn arg_eq(arg: u8, value: impl Dword) -> Cond {
    Cond {
        arg,
        mask: u32::MAX,
        value: value.dword(),
    }
}

/// The bits `mask` of argument `arg` equal `value` (e.g. `arg_masked_eq(2, PROT_EXEC, 0)`:
/// PROT_EXEC not set).
pub fn arg_masked_eq(arg: u8, mask: impl Dword, value: impl Dword) -> Cond {
    Cond {
        arg,
        mask: mask.dword(),
        value: value.dword() & mask.dword(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Allowed when all conditions hold (always, if there are none).
    Allow(Vec<Cond>),
    /// Fails with this errno instead of running.
    Errno(u32),
}

/// One line of a policy: a syscall, what happens to it, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    nr: c_long,
    action: Action,
    why: &'static str,
}

impl Rule {
    fn is_unconditional_allow(&self) -> bool {
        matches!(&self.action, Action::Allow(conds) if conds.is_empty())
    }
}

/// Allow syscall `nr` with any arguments.
pub fn allow(nr: c_long, why: &'static str) -> Rule {
    allow_if(nr, &[], why)
}

/// Allow syscall `nr` when every condition holds (no conditions: always).
pub fn allow_if(nr: c_long, conds: &[Cond], why: &'static str) -> Rule {
    Rule {
        nr,
        action: Action::Allow(conds.to_vec()),
        why,
    }
}

/// Make syscall `nr` fail with `errno` without running (e.g. clone3 with ENOSYS so glibc falls
/// back to clone, whose flags a filter can check). Any allow rule for `nr` in a union wins.
pub fn fail_with(nr: c_long, errno: i32, why: &'static str) -> Rule {
    Rule {
        nr,
        action: Action::Errno(errno.dword()),
        why,
    }
}

/// A seccomp allowlist: everything not allowed traps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeccompPolicy {
    rules: Vec<Rule>,
}

impl SeccompPolicy {
    /// A policy made of `rules`.
    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Self {
        Self {
            rules: rules.into_iter().collect(),
        }
    }

    /// Everything either policy allows: the rules of one syscall are OR-ed, an unconditional
    /// rule absorbs the conditional ones, and an allow rule beats a `fail_with` rule. A parent
    /// whose filter is inherited across `execve` must install the union of its children's.
    pub fn union(&self, other: &Self) -> Self {
        let all: Vec<&Rule> = self.rules.iter().chain(&other.rules).collect();
        let mut rules: Vec<Rule> = Vec::new();
        for &rule in &all {
            let mut same_nr = all.iter().filter(|r| r.nr == rule.nr);
            let absorbed = match &rule.action {
                Action::Allow(conds) => {
                    !conds.is_empty() && same_nr.any(|r| r.is_unconditional_allow())
                }
                Action::Errno(_) => same_nr.any(|r| matches!(r.action, Action::Allow(_))),
            };
            let duplicate = rules.iter().any(|r| {
                r.nr == rule.nr
                    && (r.action == rule.action
                        || matches!(
                            (&r.action, &rule.action),
                            (Action::Errno(_), Action::Errno(_))
                        ))
            });
            if !absorbed && !duplicate {
                rules.push(rule.clone());
            }
        }
        Self { rules }
    }

    /// How many distinct syscalls the policy allows (in some form).
    pub fn syscall_count(&self) -> usize {
        let mut nrs: Vec<c_long> = self
            .rules
            .iter()
            .filter(|r| matches!(r.action, Action::Allow(_)))
            .map(|r| r.nr)
            .collect();
        nrs.sort_unstable();
        nrs.dedup();
        nrs.len()
    }

    /// Whether some rule allows syscall `nr` (possibly only with some arguments).
    pub fn allows(&self, nr: c_long) -> bool {
        self.rules
            .iter()
            .any(|r| r.nr == nr && matches!(r.action, Action::Allow(_)))
    }

    /// Compiles the policy for x86_64: no match traps, a match is allowed, `fail_with` rules
    /// return their errno (from a short prologue, as seccompiler has one match action only).
    pub fn compile(&self) -> Result<BpfProgram, JailError> {
        let mut allowed: BTreeMap<c_long, Vec<SeccompRule>> = BTreeMap::new();
        let mut errnos: BTreeMap<c_long, u32> = BTreeMap::new();
        for rule in &self.rules {
            match &rule.action {
                Action::Allow(conds) => {
                    let chain = allowed.entry(rule.nr).or_default();
                    // An empty chain means "always"; a rule with conditions must not narrow it.
                    if !self
                        .rules
                        .iter()
                        .any(|r| r.nr == rule.nr && r.is_unconditional_allow())
                    {
                        chain.push(SeccompRule::new(
                            conds
                                .iter()
                                .copied()
                                .map(Cond::to_seccompiler)
                                .collect::<Result<_, _>>()?,
                        )?);
                    }
                }
                Action::Errno(errno) => {
                    if errnos.insert(rule.nr, *errno).is_some_and(|e| e != *errno) {
                        return Err(JailError::Policy(format!(
                            "syscall {} fails with two different errnos",
                            rule.nr
                        )));
                    }
                }
            }
        }
        if let Some(nr) = errnos.keys().find(|nr| allowed.contains_key(nr)) {
            return Err(JailError::Policy(format!(
                "syscall {nr} is both allowed and made to fail (use union to merge policies)"
            )));
        }
        let filter = SeccompFilter::new(
            allowed,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?;
        let mut program = errno_prologue(&errnos)?;
        program.extend(BpfProgram::try_from(filter)?);
        if program.len() > libc::BPF_MAXINSNS as usize {
            return Err(JailError::Policy(format!(
                "{} BPF instructions, the kernel takes at most {}",
                program.len(),
                libc::BPF_MAXINSNS
            )));
        }
        Ok(program)
    }
}

/// One line per rule, for review and logs: `16 allow if arg1 == 0x5421: set_nonblocking ...`.
impl fmt::Display for SeccompPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for rule in &self.rules {
            write!(f, "{} ", rule.nr)?;
            match &rule.action {
                Action::Errno(errno) => write!(f, "fails with errno {errno}")?,
                Action::Allow(conds) => {
                    write!(f, "allow")?;
                    for (i, c) in conds.iter().enumerate() {
                        let glue = if i == 0 { " if" } else { " and" };
                        match c.mask {
                            u32::MAX => write!(f, "{glue} arg{} == {:#x}", c.arg, c.value)?,
                            mask => write!(f, "{glue} arg{} & {mask:#x} == {:#x}", c.arg, c.value)?,
                        }
                    }
                }
            }
            writeln!(f, ": {}", rule.why)?;
        }
        Ok(())
    }
}

impl Cond {
    fn to_seccompiler(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let op = match self.mask {
            u32::MAX => SeccompCmpOp::Eq,
            mask => SeccompCmpOp::MaskedEq(mask.into()),
        };
        SeccompCondition::new(self.arg, SeccompCmpArgLen::Dword, op, self.value.into())
    }
}

/// For x86_64 syscalls listed in `errnos`, return `SECCOMP_RET_ERRNO | errno`; everything else
/// (including a foreign arch) falls through to seccompiler's program, which checks the arch
/// again and kills on a mismatch.
fn errno_prologue(errnos: &BTreeMap<c_long, u32>) -> Result<BpfProgram, JailError> {
    if errnos.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let skip_all = u8::try_from(1 + 2 * errnos.len())
        .map_err(|_| JailError::Policy(format!("{} fail_with rules, at most 127", errnos.len())))?;
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let ret = libc::BPF_RET | libc::BPF_K;
    // struct seccomp_data { int nr; __u32 arch; ... }: nr at offset 0, arch at offset 4.
    let mut program = vec![
        stmt(load, 4),
        sock_filter {
            jf: skip_all,
            ..stmt(jeq, AUDIT_ARCH_X86_64)
        },
        stmt(load, 0),
    ];
    for (&nr, &errno) in errnos {
        let nr =
            u32::try_from(nr).map_err(|_| JailError::Policy(format!("bad syscall number {nr}")))?;
        program.push(sock_filter {
            jf: 1,
            ..stmt(jeq, nr)
        });
        program.push(stmt(
            ret,
            libc::SECCOMP_RET_ERRNO | (errno & libc::SECCOMP_RET_DATA),
        ));
    }
    Ok(program)
}

/// Installs `program` on every thread of the process (TSYNC), setting `no_new_privs`.
pub(crate) fn install(program: &BpfProgram) -> Result<(), JailError> {
    Ok(seccompiler::apply_filter_all_threads(program)?)
}

/// What a Rust process of ours built on std threads alone (no tokio) needs once set up:
/// memory, threads, signals, time, and I/O on fds it already holds, over `read`/`write`,
/// `sendmsg`/`recvmsg` and epoll. It opens nothing and creates no sockets. vmm-proc's filter
/// is this plus its KVM ioctls; every process's is at least this.
pub fn thread_runtime_policy() -> SeccompPolicy {
    use libc::*;
    let no_exec = [arg_masked_eq(2, PROT_EXEC, 0)];
    // Threads share memory, files and signal handlers, and create no namespaces.
    let thread_flags = CLONE_THREAD | CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND;
    let ns_flags = CLONE_NEWNS
        | CLONE_NEWCGROUP
        | CLONE_NEWUTS
        | CLONE_NEWIPC
        | CLONE_NEWUSER
        | CLONE_NEWPID
        | CLONE_NEWNET;
    SeccompPolicy::new([
        // Memory.
        allow(SYS_brk, "malloc grows the heap"),
        allow_if(
            SYS_mmap,
            &no_exec,
            "malloc, thread stacks and guard pages; never executable",
        ),
        allow_if(
            SYS_mprotect,
            &no_exec,
            "thread stack guard pages; never executable",
        ),
        allow(SYS_munmap, "free, thread stacks"),
        allow(SYS_mremap, "realloc of large blocks"),
        allow_if(
            SYS_madvise,
            &[arg_eq(2, MADV_DONTNEED)],
            "glibc returns a trimmed heap and the stacks of exited threads (MADV_DONTNEED \
             only: nothing that changes how memory is shared, dumped or forked)",
        ),
        // Threads.
        allow(SYS_futex, "Mutex, Condvar, channels, thread join"),
        allow_if(
            SYS_clone,
            &[arg_masked_eq(0, thread_flags | ns_flags, thread_flags)],
            "pthread_create; threads only: no fork, no namespaces",
        ),
        fail_with(
            SYS_clone3,
            ENOSYS,
            "its flags sit in memory a filter cannot read; on ENOSYS glibc falls back to clone",
        ),
        fail_with(
            SYS_openat,
            EACCES,
            "glibc opens files on its own (malloc reads /proc/sys/vm/overcommit_memory when it \
             trims a thread heap); the open fails, nothing is opened, glibc uses its defaults",
        ),
        allow(
            SYS_set_robust_list,
            "glibc registers each new thread's robust futex list",
        ),
        allow(
            SYS_rseq,
            "glibc registers restartable sequences for each new thread",
        ),
        allow_if(
            SYS_prctl,
            &[arg_eq(0, PR_SET_NAME)],
            "std names its threads",
        ),
        allow(SYS_exit, "a thread ends"),
        allow(SYS_sched_yield, "spin loops in std"),
        allow(
            SYS_sched_getaffinity,
            "glibc's pthread_create and available_parallelism",
        ),
        // Signals.
        allow(
            SYS_rt_sigaction,
            "signal handlers, and the SIGSYS handler resets itself",
        ),
        allow(
            SYS_rt_sigprocmask,
            "pthread_create blocks signals; the SIGSYS handler unblocks",
        ),
        allow(SYS_rt_sigreturn, "returning from any signal handler"),
        allow(
            SYS_sigaltstack,
            "std's stack overflow handler, one alternate stack per thread",
        ),
        allow(
            SYS_restart_syscall,
            "resumes a sleep or futex wait interrupted by SIGSTOP/SIGCONT",
        ),
        allow(
            SYS_getpid,
            "pthread_kill and the SIGSYS handler name their own process",
        ),
        allow(SYS_gettid, "the SIGSYS handler re-raises on this thread"),
        allow(
            SYS_tgkill,
            "pthread_kill (vmm-proc kicks vCPU threads out of KVM_RUN), the SIGSYS handler, \
             abort; a thread signals its own process",
        ),
        // Time and randomness.
        allow(
            SYS_clock_gettime,
            "Instant and SystemTime when the vDSO is not used",
        ),
        allow(SYS_clock_nanosleep, "thread::sleep"),
        allow(SYS_getrandom, "HashMap keys, seeded once per thread"),
        allow(SYS_exit_group, "the process ends"),
        // I/O on fds the process already holds.
        allow(SYS_read, "reads from held fds (IPC socket, pipes, eventfd)"),
        allow(SYS_write, "writes to held fds, logging to stderr"),
        allow(SYS_writev, "vectored writes, logging"),
        allow(SYS_close, "drops of held fds"),
        allow(SYS_lseek, "file positions on held fds"),
        allow_if(SYS_fcntl, &[arg_eq(1, F_GETFD)], "reading FD_CLOEXEC"),
        allow_if(SYS_fcntl, &[arg_eq(1, F_SETFD)], "setting FD_CLOEXEC"),
        allow_if(SYS_fcntl, &[arg_eq(1, F_GETFL)], "reading O_NONBLOCK"),
        allow_if(SYS_fcntl, &[arg_eq(1, F_SETFL)], "setting O_NONBLOCK"),
        allow_if(
            SYS_fcntl,
            &[arg_eq(1, F_DUPFD_CLOEXEC)],
            "try_clone of held fds",
        ),
        allow(SYS_fstat, "metadata of held fds"),
        allow_if(
            SYS_ioctl,
            &[arg_eq(1, FIONBIO)],
            "set_nonblocking on sockets",
        ),
        allow_if(SYS_ioctl, &[arg_eq(1, FIOCLEX)], "set FD_CLOEXEC"),
        // Event loops over held fds.
        allow(SYS_epoll_create1, "a poller over held fds"),
        allow(SYS_epoll_ctl, "registers held fds with the poller"),
        allow(SYS_epoll_wait, "waits for events on held fds"),
        allow(SYS_eventfd2, "wakers of a poller"),
        // Sockets the process was handed (creating, binding, connecting stays forbidden).
        allow(SYS_recvmsg, "IPC messages with SCM_RIGHTS"),
        allow(SYS_sendmsg, "IPC messages with SCM_RIGHTS"),
    ])
}

/// What any Rust std/tokio process of ours needs to keep running once set up: the
/// [`thread_runtime_policy`] plus what tokio, mio and std's socket and file I/O call. It
/// opens nothing and creates no sockets. Build the tokio runtime before jailing (it reads
/// cgroup files to count CPUs).
pub fn base_runtime_policy() -> SeccompPolicy {
    use libc::*;
    thread_runtime_policy().union(&SeccompPolicy::new([
        allow(
            SYS_madvise,
            "malloc returns memory (any advice: tokio's allocations go through glibc's \
             tunables)",
        ),
        allow(SYS_nanosleep, "thread::sleep on older glibc"),
        allow(SYS_readv, "vectored reads"),
        allow(SYS_statx, "std's metadata of held fds"),
        allow(SYS_newfstatat, "glibc's fstat (AT_EMPTY_PATH)"),
        allow(SYS_prlimit64, "getrlimit (stack size for guard pages)"),
        allow(SYS_epoll_pwait, "tokio/mio waits for events"),
        allow(SYS_poll, "blocking waits on held fds"),
        allow(SYS_ppoll, "blocking waits on held fds"),
        allow(SYS_recvfrom, "std's recv on held sockets"),
        allow(SYS_sendto, "std's send (MSG_NOSIGNAL) on held sockets"),
        allow(SYS_shutdown, "closing one direction of a held socket"),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::*;

    const RET_ALLOW: u32 = SECCOMP_RET_ALLOW;
    const RET_TRAP: u32 = 0x0003_0000;

    /// A tiny interpreter for the classic BPF seccompiler emits.
    fn run(program: &[seccompiler::sock_filter], arch: u32, nr: c_long, args: [u64; 6]) -> u32 {
        let mut data = [0u32; 16];
        data[0] = nr as u32;
        data[1] = arch;
        for (i, arg) in args.iter().enumerate() {
            data[4 + 2 * i] = *arg as u32;
            data[5 + 2 * i] = (*arg >> 32) as u32;
        }
        let (mut pc, mut acc) = (0, 0u32);
        loop {
            let ins = &program[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { ins.jt } else { ins.jf });
            match u32::from(ins.code) {
                c if c == BPF_LD | BPF_W | BPF_ABS => acc = data[ins.k as usize / 4],
                c if c == BPF_ALU | BPF_AND | BPF_K => acc &= ins.k,
                c if c == BPF_JMP | BPF_JA => pc += ins.k as usize,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => pc += jump(acc == ins.k),
                c if c == BPF_JMP | BPF_JGT | BPF_K => pc += jump(acc > ins.k),
                c if c == BPF_JMP | BPF_JGE | BPF_K => pc += jump(acc >= ins.k),
                c if c == BPF_RET | BPF_K => return ins.k,
                c => panic!("unexpected BPF instruction {c:#x}"),
            }
        }
    }

    fn verdict(policy: &SeccompPolicy, nr: c_long, args: [u64; 6]) -> u32 {
        run(
            &policy.compile().expect("compiles"),
            AUDIT_ARCH_X86_64,
            nr,
            args,
        )
    }

    #[test]
    fn base_policy_allows_narrows_and_traps() {
        let base = base_runtime_policy();
        let prot_rw = (PROT_READ | PROT_WRITE) as u64;
        assert_eq!(verdict(&base, SYS_read, [0; 6]), RET_ALLOW);
        assert_eq!(
            verdict(&base, SYS_openat, [0; 6]),
            SECCOMP_RET_ERRNO | EACCES as u32
        );
        assert_eq!(verdict(&base, SYS_execve, [0; 6]), RET_TRAP);
        assert_eq!(
            verdict(&base, SYS_socket, [AF_UNIX as u64, 0, 0, 0, 0, 0]),
            RET_TRAP
        );
        assert_eq!(
            verdict(&base, SYS_ioctl, [3, FIONBIO, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(verdict(&base, SYS_ioctl, [3, TCGETS, 0, 0, 0, 0]), RET_TRAP);
        assert_eq!(
            verdict(&base, SYS_mmap, [0, 4096, prot_rw, 0, 0, 0]),
            RET_ALLOW
        );
        let prot_rx = (PROT_READ | PROT_EXEC) as u64;
        assert_eq!(
            verdict(&base, SYS_mmap, [0, 4096, prot_rx, 0, 0, 0]),
            RET_TRAP
        );
        assert_eq!(
            verdict(&base, SYS_mprotect, [0, 4096, prot_rx, 0, 0, 0]),
            RET_TRAP
        );
        // glibc's pthread_create flags pass; fork-like and namespace-creating clones trap.
        let pthread = (CLONE_VM
            | CLONE_FS
            | CLONE_FILES
            | CLONE_SYSVSEM
            | CLONE_SIGHAND
            | CLONE_THREAD
            | CLONE_SETTLS
            | CLONE_PARENT_SETTID
            | CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(
            verdict(&base, SYS_clone, [pthread, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            verdict(&base, SYS_clone, [SIGCHLD as u64, 0, 0, 0, 0, 0]),
            RET_TRAP
        );
        let with_ns = pthread | CLONE_NEWNET as u64;
        assert_eq!(
            verdict(&base, SYS_clone, [with_ns, 0, 0, 0, 0, 0]),
            RET_TRAP
        );
        assert_eq!(
            verdict(&base, SYS_clone3, [0; 6]),
            SECCOMP_RET_ERRNO | ENOSYS as u32
        );
        assert_eq!(
            verdict(&base, SYS_fcntl, [3, F_SETFL as u64, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            verdict(&base, SYS_fcntl, [3, F_SETLK as u64, 0, 0, 0, 0]),
            RET_TRAP
        );
        // Another architecture is killed before any rule is looked at, even clone3.
        let program = base.compile().expect("compiles");
        let i386 = 0x4000_0003;
        assert_eq!(
            run(&program, i386, SYS_clone3, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            run(&program, i386, SYS_read, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn base_policy_counts() {
        let base = base_runtime_policy();
        assert!(base.allows(SYS_futex) && base.allows(SYS_clone));
        assert!(
            !base.allows(SYS_clone3),
            "clone3 fails with ENOSYS, it is not allowed"
        );
        assert_eq!(base.syscall_count(), 51);
        let threads = thread_runtime_policy();
        assert_eq!(threads.syscall_count(), 40);
        assert!((0..460).all(|nr| !threads.allows(nr) || base.allows(nr)));
        for nr in [SYS_poll, SYS_recvfrom, SYS_sendto, SYS_shutdown, SYS_statx] {
            assert!(!threads.allows(nr), "{nr}");
        }
        // madvise: MADV_DONTNEED only without tokio.
        assert_eq!(
            verdict(
                &threads,
                SYS_madvise,
                [0, 4096, MADV_DONTNEED as u64, 0, 0, 0]
            ),
            RET_ALLOW
        );
        assert_eq!(
            verdict(
                &threads,
                SYS_madvise,
                [0, 4096, MADV_DONTFORK as u64, 0, 0, 0]
            ),
            RET_TRAP
        );
        assert_eq!(
            verdict(&base, SYS_madvise, [0, 4096, MADV_DONTFORK as u64, 0, 0, 0]),
            RET_ALLOW
        );
    }

    #[test]
    fn union_ors_rules_and_unconditional_absorbs() {
        let a = SeccompPolicy::new([
            allow_if(SYS_socket, &[arg_eq(0, AF_UNIX)], "a: unix"),
            allow_if(SYS_ioctl, &[arg_eq(1, FIONBIO)], "a"),
            fail_with(SYS_clone3, ENOSYS, "a"),
        ]);
        let b = SeccompPolicy::new([
            allow_if(SYS_socket, &[arg_eq(0, AF_INET)], "b: inet"),
            allow(SYS_ioctl, "b: any ioctl"),
            allow_if(SYS_ioctl, &[arg_eq(1, FIONBIO)], "b"),
            fail_with(SYS_clone3, ENOSYS, "b"),
        ]);
        let u = a.union(&b);
        assert_eq!(u.rules.len(), 4, "{u:#?}");
        assert_eq!(u.syscall_count(), 2);
        assert_eq!(
            verdict(&u, SYS_socket, [AF_UNIX as u64, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            verdict(&u, SYS_socket, [AF_INET as u64, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            verdict(&u, SYS_socket, [AF_NETLINK as u64, 0, 0, 0, 0, 0]),
            RET_TRAP
        );
        assert_eq!(verdict(&u, SYS_ioctl, [3, TCGETS, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            verdict(&u, SYS_clone3, [0; 6]),
            SECCOMP_RET_ERRNO | ENOSYS as u32
        );
        // An allow on one side beats fail_with on the other.
        let c = SeccompPolicy::new([allow(SYS_clone3, "c")]);
        assert_eq!(verdict(&u.union(&c), SYS_clone3, [0; 6]), RET_ALLOW);
        assert_eq!(verdict(&c.union(&u), SYS_clone3, [0; 6]), RET_ALLOW);
    }

    #[test]
    fn conflicting_rules_do_not_compile() {
        let both = SeccompPolicy::new([allow(SYS_clone3, "x"), fail_with(SYS_clone3, ENOSYS, "y")]);
        assert!(matches!(both.compile(), Err(JailError::Policy(_))));
        let two = SeccompPolicy::new([
            fail_with(SYS_clone3, ENOSYS, "x"),
            fail_with(SYS_clone3, EPERM, "y"),
        ]);
        assert!(matches!(two.compile(), Err(JailError::Policy(_))));
        let bad_arg = SeccompPolicy::new([allow_if(SYS_read, &[arg_eq(6, 0)], "x")]);
        assert!(matches!(
            bad_arg.compile(),
            Err(JailError::SeccompCompile(_))
        ));
    }

    #[test]
    fn empty_policy_traps_everything() {
        let empty = SeccompPolicy::default();
        assert_eq!(empty.syscall_count(), 0);
        assert_eq!(verdict(&empty, SYS_read, [0; 6]), RET_TRAP);
    }
}
