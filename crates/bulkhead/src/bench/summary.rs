//! The counts an import reports (`bulkhead import`'s summary line, `$upload-ndjson`'s
//! OperationOutcome), read by the number before each word so small changes of wording (order,
//! punctuation, extra words) do not break the benchmark.

use anyhow::Context;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportCounts {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub failed: u64,
}

impl ImportCounts {
    /// `created` must be reported; a missing `updated`, `unchanged` or `failed` counts as 0.
    pub fn parse(text: &str) -> anyhow::Result<ImportCounts> {
        let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
        let count = |word: &str| -> Option<u64> {
            words.windows(2).find(|pair| pair[1].eq_ignore_ascii_case(word)).and_then(|pair| pair[0].parse().ok())
        };
        Ok(ImportCounts {
            created: count("created").with_context(|| format!("no 'N created' in the import summary: {text}"))?,
            updated: count("updated").unwrap_or(0),
            unchanged: count("unchanged").unwrap_or(0),
            failed: count("failed").unwrap_or(0),
        })
    }

    pub fn processed(&self) -> u64 {
        self.created + self.updated + self.unchanged + self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::ImportCounts;

    #[test]
    fn reads_the_counts_whatever_the_wording_around_them() {
        let expected = ImportCounts { created: 12, updated: 3, unchanged: 0, failed: 1 };
        for text in [
            "imported 16 resources in 0.1 s (160/s): 12 created, 3 updated, 0 unchanged, 1 failed",
            "processed 16 resources: 12 created; 3 updated; 1 failed",
            r#"{"issue":[{"diagnostics":"loaded 16: 1 failed, 12 Created, 3 updated"}]}"#,
        ] {
            assert_eq!(ImportCounts::parse(text).unwrap(), expected, "{text}");
        }
        assert_eq!(ImportCounts::parse("16 created").unwrap().processed(), 16);
        assert!(ImportCounts::parse("imported 16 resources").is_err(), "no created count is an error");
    }
}
