//! Which device nodes a container may use: the cgroup v2 device controller, an eBPF program
//! of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the container's cgroup.
//!
//! `nodev` mounts stop device nodes a container makes in its own files; this stops them on
//! every path, including one the container mounted itself (a tmpfs with `cap_add =
//! ["SYS_ADMIN"]`) and every node the kernel gives it. The rules are Docker's and runc's
//! defaults: any node may be created (`mknod`, CAP_MKNOD allows it as in Docker), but only
//! the harmless character devices may be opened — null, zero, full, random, urandom, tty,
//! console, ptmx and the pseudo-terminals. Privileged containers get no program.
//!
//! The program is a handful of instructions, generated here rather than pulled in through a
//! BPF toolchain: one block per rule, each falling through to the next on a mismatch, and a
//! final deny. The kernel's view of a request is `struct bpf_cgroup_dev_ctx`: `access_type`
//! (the device type in the low 16 bits, the access in the high 16), `major`, `minor`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Device types as `bpf_cgroup_dev_ctx.access_type` encodes them (linux/bpf.h).
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
/// Accesses, shifted left by 16 in `access_type`.
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// One allowed (type, major, minor, access); `None` matches any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

const fn chr(major: u32, minor: Option<u32>) -> DeviceRule {
    DeviceRule {
        kind: Some(DEV_CHAR),
        major: Some(major),
        minor,
        access: ACC_ALL,
    }
}

/// What an unprivileged container may do with devices (runc's default list).
pub const DEFAULT_RULES: &[DeviceRule] = &[
    // mknod of anything: an image may carry device nodes in its layers; opening them is
    // what matters, and that is refused below unless listed.
    DeviceRule {
        kind: Some(DEV_CHAR),
        major: None,
        minor: None,
        access: ACC_MKNOD,
    },
    DeviceRule {
        kind: Some(DEV_BLOCK),
        major: None,
        minor: None,
        access: ACC_MKNOD,
    },
    chr(1, Some(3)), // null
    chr(1, Some(5)), // zero
    chr(1, Some(7)), // full
    chr(1, Some(8)), // random
    chr(1, Some(9)), // urandom
    chr(5, Some(0)), // tty
    chr(5, Some(1)), // console
    chr(5, Some(2)), // ptmx
    chr(136, None),  // /dev/pts/*
];

/// One eBPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ALU32_AND_K: u8 = 0x54; // dst &= imm (32-bit)
const ALU32_RSH_K: u8 = 0x74; // dst >>= imm (32-bit)
const ALU32_MOV_X: u8 = 0xbc; // dst = src (32-bit)
const ALU64_MOV_K: u8 = 0xb7; // dst = imm
const JNE_K: u8 = 0x55; // if dst != imm: pc += off
const JNE_X: u8 = 0x5d; // if dst != src: pc += off
const EXIT: u8 = 0x95;

/// Registers: r1 holds the context on entry; the prologue leaves the type in r2, the access
/// in r3, major in r4, minor in r5; r1 is scratch after it; r0 is the verdict.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;

/// The program for `rules`: allow (1) on the first matching rule, else deny (0).
fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut out = vec![
        insn(LDX_MEM_W, R2, R1, 0, 0),
        insn(ALU32_AND_K, R2, 0, 0, 0xffff),
        insn(LDX_MEM_W, R3, R1, 0, 0),
        insn(ALU32_RSH_K, R3, 0, 0, 16),
        insn(LDX_MEM_W, R4, R1, 4, 0),
        insn(LDX_MEM_W, R5, R1, 8, 0),
    ];
    for rule in rules {
        // The checks first, so that each knows how many instructions remain in its block:
        // a mismatch jumps past the block's allow-and-exit pair and whatever checks follow.
        let mut checks: Vec<Insn> = Vec::new();
        if let Some(kind) = rule.kind {
            checks.push(insn(JNE_K, R2, 0, 0, kind as i32));
        }
        if rule.access & ACC_ALL != ACC_ALL {
            // Every access asked for must be allowed: (asked & allowed) == asked.
            checks.push(insn(ALU32_MOV_X, R1, R3, 0, 0));
            checks.push(insn(ALU32_AND_K, R1, 0, 0, rule.access as i32));
            checks.push(insn(JNE_X, R1, R3, 0, 0));
        }
        if let Some(major) = rule.major {
            checks.push(insn(JNE_K, R4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            checks.push(insn(JNE_K, R5, 0, 0, minor as i32));
        }
        if checks.is_empty() {
            // A rule that matches everything ends the program: the verifier refuses
            // instructions that can never run.
            out.push(insn(ALU64_MOV_K, R0, 0, 0, 1));
            out.push(insn(EXIT, 0, 0, 0, 0));
            return out;
        }
        let block_len = checks.len() + 2;
        for (i, mut check) in checks.into_iter().enumerate() {
            if check.code == JNE_K || check.code == JNE_X {
                // Relative to the next instruction: skip the rest of the block.
                check.off = (block_len - i - 1) as i16;
            }
            out.push(check);
        }
        out.push(insn(ALU64_MOV_K, R0, 0, 0, 1));
        out.push(insn(EXIT, 0, 0, 0, 0));
    }
    out.push(insn(ALU64_MOV_K, R0, 0, 0, 0));
    out.push(insn(EXIT, 0, 0, 0, 0));
    out
}

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to `expected_attach_type`; the kernel
/// wants every byte after the fields it knows to be zero, which `Default` gives.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as BPF_PROG_ATTACH reads it.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads the program for `rules`; the kernel's verifier log is in the error if it refuses.
pub fn load(rules: &[DeviceRule]) -> io::Result<OwnedFd> {
    let insns = program(rules);
    // Quietly first: with a log the kernel fails a program whose (verbose) log does not fit.
    load_insns(&insns, None).or_else(|e| {
        let mut log = vec![0u8; 1 << 20];
        match load_insns(&insns, Some(&mut log)) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                let verifier = String::from_utf8_lossy(&log[..end]);
                let tail: String = verifier
                    .trim()
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(io::Error::new(
                    e.kind(),
                    format!(
                        "loading the device policy (a cgroup BPF program): {e}; verifier: {tail}"
                    ),
                ))
            }
        }
    })
}

fn load_insns(insns: &[Insn], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"keel_devcg");
    let (log_level, log_size, log_buf) = match log {
        Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..ProgLoadAttr::default()
    };
    // The verifier gives up with EAGAIN when a signal arrives while it works (PID 1 gets a
    // SIGCHLD for every helper and container that ends); the signal is handled on the way
    // out, so trying again works. libbpf does the same, five times.
    let mut attempts = 0;
    let fd = loop {
        attempts += 1;
        // SAFETY: attr is a valid bpf_attr prefix whose pointers (insns, license, the log)
        // outlive the call; the kernel writes only into the log, within log_size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const ProgLoadAttr,
                std::mem::size_of::<ProgLoadAttr>(),
            )
        };
        if fd >= 0 {
            break fd;
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EAGAIN) || attempts >= 5 {
            return Err(error);
        }
    };
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `program` to the cgroup open at `cgroup_dir`, replacing any program attached
/// before (a restarted container's cgroup is reused). Without BPF_F_ALLOW_MULTI, nothing
/// below the cgroup can attach a program of its own that would widen the policy. The cgroup
/// keeps the program after `program` is closed.
pub fn attach(program: &OwnedFd, cgroup_dir: &OwnedFd) -> io::Result<()> {
    let attr = ProgAttachAttr {
        target_fd: cgroup_dir.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..ProgAttachAttr::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix with no pointers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("attaching the device policy to the cgroup: {e}"),
        ));
    }
    Ok(())
}

/// Every device, every access: what a privileged container gets. Attached rather than
/// nothing so that it replaces the policy a reused cgroup had from an unprivileged run.
pub const UNRESTRICTED: &[DeviceRule] = &[DeviceRule {
    kind: None,
    major: None,
    minor: None,
    access: ACC_ALL,
}];

/// The two programs, loaded once and attached to any number of cgroups.
#[derive(Default)]
pub struct DevicePrograms {
    default: Option<OwnedFd>,
    unrestricted: Option<OwnedFd>,
}

impl DevicePrograms {
    /// Attaches the default policy (or, for a privileged container, the unrestricted one)
    /// to the cgroup open at `cgroup_dir`.
    pub fn apply(&mut self, cgroup_dir: &OwnedFd, privileged: bool) -> io::Result<()> {
        let (slot, rules) = if privileged {
            (&mut self.unrestricted, UNRESTRICTED)
        } else {
            (&mut self.default, DEFAULT_RULES)
        };
        let program = match slot {
            Some(program) => program,
            None => slot.insert(load(rules)?),
        };
        attach(program, cgroup_dir)
    }
}

/// Whether `rules` let a process do `access` to the device (kind, major, minor): the same
/// decision the program makes, for tests and for explaining a refusal.
pub fn allows(rules: &[DeviceRule], kind: u32, major: u32, minor: u32, access: u32) -> bool {
    rules.iter().any(|r| {
        r.kind.is_none_or(|k| k == kind)
            && access & r.access == access
            && r.major.is_none_or(|m| m == major)
            && r.minor.is_none_or(|m| m == minor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the generated program on a request: a tiny interpreter of the instructions it
    /// uses, so the jump offsets are checked without a kernel.
    fn run(insns: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [kind | (access << 16), major, minor];
        let mut regs = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = insns[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads read the context");
                    regs[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                ALU32_AND_K => regs[dst] = (regs[dst] as u32 & i.imm as u32) as u64,
                ALU32_RSH_K => regs[dst] = ((regs[dst] as u32) >> i.imm) as u64,
                ALU32_MOV_X => regs[dst] = regs[src] as u32 as u64,
                ALU64_MOV_K => regs[dst] = i.imm as i64 as u64,
                JNE_K if regs[dst] != i.imm as i64 as u64 => pc += i.off as usize,
                JNE_X if regs[dst] != regs[src] => pc += i.off as usize,
                JNE_K | JNE_X => {}
                EXIT => return regs[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn the_program_decides_like_the_rules() {
        let insns = program(DEFAULT_RULES);
        let cases = [
            (DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3, true),
            (DEV_CHAR, ACC_READ, 1, 9, true),
            (DEV_CHAR, ACC_READ, 136, 7, true),
            (DEV_CHAR, ACC_MKNOD, 1, 1, true),
            (DEV_CHAR, ACC_READ, 1, 1, false),
            (DEV_CHAR, ACC_MKNOD | ACC_READ, 1, 1, false),
            (DEV_BLOCK, ACC_MKNOD, 254, 0, true),
            (DEV_BLOCK, ACC_READ, 254, 0, false),
            (DEV_BLOCK, ACC_WRITE, 8, 0, false),
            (DEV_CHAR, ACC_WRITE, 10, 200, false),
            (DEV_CHAR, ACC_READ, 4, 1, false),
        ];
        for (kind, access, major, minor, expect) in cases {
            assert_eq!(
                allows(DEFAULT_RULES, kind, major, minor, access),
                expect,
                "rules: {kind} {access} {major}:{minor}"
            );
            assert_eq!(
                run(&insns, kind, access, major, minor),
                u64::from(expect),
                "program: {kind} {access} {major}:{minor}"
            );
        }
    }

    #[test]
    fn the_unrestricted_policy_allows_everything_and_ends_there() {
        let insns = program(UNRESTRICTED);
        assert_eq!(run(&insns, DEV_BLOCK, ACC_READ | ACC_WRITE, 254, 0), 1);
        assert_eq!(insns.last().map(|i| i.code), Some(EXIT));
        assert_eq!(insns.len(), 8, "the prologue, then allow: {insns:?}");
    }

    #[test]
    fn an_empty_policy_denies_everything() {
        let insns = program(&[]);
        assert_eq!(run(&insns, DEV_CHAR, ACC_READ, 1, 3), 0);
    }
}
