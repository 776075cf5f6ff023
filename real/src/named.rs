//! Command-line names of fieldless enums (`--capture`, `--transport`): one macro writes the list
//! of choices, the name of each, and `Display`, `FromStr` and `Serialize` through that name, so
//! that every choice reads and prints the same everywhere.

/// `named_choices!(Type, ErrorType, ErrorType::Variant, { Variant => "name", ... })` gives
/// `Type::ALL` (in the order listed, which is the order benchmarks report them), `Type::name`,
/// and `Display`, `FromStr` (an unknown name fails with `ErrorType::Variant(name)`) and
/// `serde::Serialize` as that name.
macro_rules! named_choices {
    ($ty:ident, $err:ty, $unknown:path, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every choice, in the order benchmarks report them.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// The name used on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $err;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::ALL
                    .into_iter()
                    .find(|c| c.name() == s)
                    .ok_or_else(|| $unknown(s.to_string()))
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
    };
}

pub(crate) use named_choices;
