//! The epoch policy on the command line: `--epoch-policy` and the bounds of the output policy,
//! shared by the agent, the demo, real scenario runs and the benchmarks.

use std::time::Duration;

use ftvm_model::{EpochPolicy, OutputDriven};

/// When epochs end.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct EpochPolicyArgs {
    /// When an epoch ends: `fixed` (every --epoch-ms) or `output` (as soon as the VM's output
    /// waits at the gate, within --min-gap-us and --max-idle-pct; --epoch-ms is then the
    /// longest epoch).
    #[arg(long, default_value = "fixed", value_parser = ["fixed", "output"])]
    pub epoch_policy: String,
    /// Output policy: least time (µs) the VM runs between a pause and an early capture.
    #[arg(long, default_value_t = 1000)]
    pub min_gap_us: u64,
    /// Output policy: largest share of time (percent, 1-100) early captures may keep the VM
    /// paused; after a pause p the next early capture waits p × (100 − pct) / pct.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub max_idle_pct: u8,
}

impl Default for EpochPolicyArgs {
    fn default() -> EpochPolicyArgs {
        EpochPolicyArgs::of(EpochPolicy::Fixed)
    }
}

impl EpochPolicyArgs {
    /// The policy these flags name.
    pub fn policy(&self) -> EpochPolicy {
        let bounds = OutputDriven {
            min_gap: Duration::from_micros(self.min_gap_us),
            max_idle_pct: self.max_idle_pct,
        };
        // clap admits only the two names.
        EpochPolicy::named(&self.epoch_policy, bounds).unwrap_or_default()
    }

    /// The flags that name `policy`.
    pub fn of(policy: EpochPolicy) -> EpochPolicyArgs {
        let bounds = match policy {
            EpochPolicy::Output(b) => b,
            EpochPolicy::Fixed => OutputDriven::default(),
        };
        EpochPolicyArgs {
            epoch_policy: policy.name().to_string(),
            min_gap_us: u64::try_from(bounds.min_gap.as_micros()).unwrap_or(u64::MAX),
            max_idle_pct: bounds.max_idle_pct,
        }
    }

    /// The same flags for another process's command line.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--epoch-policy".into(),
            self.epoch_policy.clone(),
            "--min-gap-us".into(),
            self.min_gap_us.to_string(),
            "--max-idle-pct".into(),
            self.max_idle_pct.to_string(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        policy: EpochPolicyArgs,
    }

    #[test]
    fn flags_round_trip_and_bad_values_are_refused() {
        let c =
            Cli::try_parse_from(["x", "--epoch-policy", "output", "--min-gap-us", "500"]).unwrap();
        let p = c.policy.policy();
        assert_eq!(
            p,
            EpochPolicy::Output(OutputDriven {
                min_gap: Duration::from_micros(500),
                max_idle_pct: 50
            })
        );
        assert_eq!(EpochPolicyArgs::of(p), c.policy);
        let again = Cli::try_parse_from(std::iter::once("x".to_string()).chain(c.policy.to_args()))
            .unwrap();
        assert_eq!(again.policy.policy(), p);
        assert_eq!(
            Cli::try_parse_from(["x"]).unwrap().policy.policy(),
            EpochPolicy::Fixed
        );
        assert!(Cli::try_parse_from(["x", "--epoch-policy", "eager"]).is_err());
        assert!(Cli::try_parse_from(["x", "--max-idle-pct", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--max-idle-pct", "101"]).is_err());
    }
}
