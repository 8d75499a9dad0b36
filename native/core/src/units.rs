//! Human-readable byte sizes for reports, errors and logs.

use std::fmt;

/// Formats a byte count in binary units with one decimal: `512 B`, `1.5 KiB`, `8.0 MiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let b = self.0;
        if b < 1024 {
            return write!(f, "{b} B");
        }
        let mut value = b as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// Shorthand for `HumanBytes(bytes)`.
pub fn human(bytes: u64) -> HumanBytes {
    HumanBytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn formats_binary_units() {
        assert_eq!(human(0).to_string(), "0 B");
        assert_eq!(human(1023).to_string(), "1023 B");
        assert_eq!(human(1024).to_string(), "1.0 KiB");
        assert_eq!(human(1536).to_string(), "1.5 KiB");
        assert_eq!(human(8 << 20).to_string(), "8.0 MiB");
        assert_eq!(human(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(human(u64::MAX).to_string(), "16.0 EiB");
    }
}
