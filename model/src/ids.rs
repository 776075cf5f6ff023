//! Identity newtypes: which VM, which host, which failover generation, which epoch.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// The protected VM. Every frame carries it so one host can never apply another VM's data.
    VmId(u64),
    "vm"
);
id_newtype!(
    /// A host taking part in the protocol (primary, backup, joiner or witness).
    NodeId(u32),
    "n"
);
id_newtype!(
    /// Failover generation: 1 at a fresh start, +1 at every granted takeover. The witness owns it.
    Generation(u64),
    "g"
);
id_newtype!(
    /// Checkpoint epoch. Within a generation epochs strictly increase; `Epoch(0)` means "none".
    Epoch(u64),
    "e"
);

impl Generation {
    /// The generation a fresh VM starts in.
    pub const FIRST: Generation = Generation(1);
    /// "Not known yet" (a joiner that has not asked anyone).
    pub const UNKNOWN: Generation = Generation(0);

    /// The generation after a takeover.
    pub const fn next(self) -> Generation {
        Generation(self.0.saturating_add(1))
    }
}

impl Epoch {
    /// "No epoch": nothing captured, committed, acked or released yet.
    pub const NONE: Epoch = Epoch(0);
    /// The first epoch a fresh VM runs in.
    pub const FIRST: Epoch = Epoch(1);

    /// The following epoch.
    pub const fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_order() {
        assert_eq!(VmId(7).to_string(), "vm7");
        assert_eq!(NodeId(2).to_string(), "n2");
        assert_eq!(Generation(3).to_string(), "g3");
        assert_eq!(Epoch(9).to_string(), "e9");
        assert!(Epoch(1) < Epoch(2));
        assert_eq!(Generation::FIRST.next(), Generation(2));
        assert_eq!(Epoch(u64::MAX).next(), Epoch(u64::MAX));
    }
}
