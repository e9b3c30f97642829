//! What the backends' errors share: a boxed source, and the question the retry loops ask
//! of any failure, outage or fault, answered by type (never by the message).

/// A backend's own error, kept as the source of a port's error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether `e`, or any error in its chain, is an outage: the same call may pass later.
/// A fault (a refused record, a bad statement, corrupt data) will not pass by waiting.
pub fn is_outage(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let outage = e
            .downcast_ref::<crate::store::StoreError>()
            .map(|s| s.is_transient())
            .or_else(|| e.downcast_ref::<crate::log::LogError>().map(|l| l.is_transient()));
        if let Some(outage) = outage {
            return outage;
        }
        next = e.source();
    }
    false
}

/// `e` and its sources on one line, each cause said once: a port's error already names
/// its source in its own words, which `{:#}` would say again.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogError;
    use crate::store::StoreError;

    #[test]
    fn outages_are_told_from_faults_by_type_through_the_chain() {
        let outage = LogError::Unavailable("broker down".into());
        let fault = StoreError::Backend("syntax error".into());
        assert!(is_outage(&outage));
        assert!(!is_outage(&fault));
        assert!(!is_outage(&LogError::Closed));
        // Wrapped with context, as `anyhow` does in the pipeline.
        let wrapped = anyhow::Error::new(StoreError::Unavailable("timed out".into())).context("writing a batch");
        assert!(is_outage(wrapped.as_ref()));
        let wrapped = anyhow::Error::new(fault).context("writing a batch");
        assert!(!is_outage(wrapped.as_ref()));
        // A message that reads like an outage is not one.
        assert!(!is_outage(anyhow::anyhow!("store unavailable: timed out").as_ref()));
    }
}
