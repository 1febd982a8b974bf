"""The syscall filter every jailed run gets (bubblewrap loads it with --seccomp before the program starts).

Built with libseccomp's own Python bindings (Debian's python3-seccomp) by the system python, which has them, as a
child process at start-up: `python3 -c SOURCE` prints the BPF program, which the service passes to each run.
A default-allow filter that denies, with EPERM, what a program under test has no use for and what attacks the
kernel or the harness: ptrace and reading or writing another process's memory, mounts, keyrings, bpf,
perf_event_open, userfaultfd, loading kernels and modules, io_uring, and making or joining namespaces (clone
with a CLONE_NEW* flag, unshare, setns). clone3 answers ENOSYS, so that the C library falls back to clone, whose
flags the filter can see. Syscalls of another architecture (32-bit int 0x80, x32) kill the process.
"""

import errno
import sys

DENIED = (
    # other processes' memory and file descriptors: the harness's supervisor must stay out of reach
    "ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp "
    # mounts and the filesystem's structure
    "mount umount2 pivot_root chroot move_mount open_tree fsopen fsconfig fsmount fspick mount_setattr "
    "open_by_handle_at name_to_handle_at quotactl swapon swapoff "
    # kernel attack surface
    "keyctl add_key request_key bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register "
    "kexec_load kexec_file_load init_module finit_module delete_module reboot acct syslog lookup_dcookie "
    "settimeofday clock_settime clock_adjtime adjtimex iopl ioperm vhangup fanotify_init "
    # namespaces
    "unshare setns"
).split()
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}


def build():
    """The filter as a BPF program (bytes)."""
    import tempfile

    import seccomp

    syscalls = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED:
        try:
            syscalls.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):  # not a syscall on this architecture
            pass
    for flag in NAMESPACE_FLAGS.values():
        syscalls.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    syscalls.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as program:
        syscalls.export_bpf(program)
        program.seek(0)
        return program.read()


if __name__ == "__main__":
    sys.stdout.buffer.write(build())
