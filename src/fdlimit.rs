//! The open-file limit (RLIMIT_NOFILE). Every connection is a descriptor,
//! and most systems start a process with a soft limit of 1,024: a gateway
//! with a thousand devices (or a bench driving them) runs out of
//! descriptors before it reaches `server.max_connections`. The soft limit
//! may be raised up to the hard one without privileges.

use std::io;

/// The limit in force after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit to at least `want` descriptors when the hard
/// limit allows it (to the hard limit when it does not); never lowers it.
pub fn raise(want: u64) -> io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u32 on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let (soft, hard) = (lim.rlim_cur as u64, lim.rlim_max as u64);
    let target = want.min(hard);
    if target <= soft {
        return Ok(FdLimit { soft, hard });
    }
    lim.rlim_cur = target as libc::rlim_t;
    // SAFETY: `lim` is a valid rlimit with rlim_cur <= rlim_max.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FdLimit { soft: target, hard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers_and_stays_within_the_hard_limit() {
        let now = raise(0).expect("getrlimit");
        assert!(now.soft <= now.hard);
        let again = raise(now.soft + 1).expect("raise by one");
        assert_eq!(again.hard, now.hard);
        assert_eq!(again.soft, (now.soft + 1).min(now.hard));
        let huge = raise(u64::MAX).expect("raise to the hard limit");
        assert_eq!(huge.soft, huge.hard);
        assert_eq!(raise(1).expect("lower asked").soft, huge.soft);
    }
}
