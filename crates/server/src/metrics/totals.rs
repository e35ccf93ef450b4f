//! A Prometheus summary with no quantiles: only its `_sum` and `_count`. For work the engine
//! measures in totals alone (the vision encoder runs images in batches and reports the time
//! and images of all its batches), whose distribution per item is unknown: a histogram would
//! have to make its buckets up.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Metric, MetricFamily, MetricType, Summary};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Running totals exported as a summary without quantiles; clones share them, as the
/// `prometheus` crate's metrics do, so one can be registered and another kept.
#[derive(Clone)]
pub struct Totals {
    desc: Desc,
    /// Sum of the measured seconds, and how many items they were spent on.
    totals: Arc<Mutex<(f64, u64)>>,
}

impl Totals {
    pub fn new(name: String, help: &str) -> prometheus::Result<Totals> {
        Ok(Totals {
            desc: Desc::new(name, help.to_owned(), Vec::new(), HashMap::new())?,
            totals: Arc::new(Mutex::new((0.0, 0))),
        })
    }

    /// Adds `seconds` spent on `count` more items.
    pub fn add(&self, seconds: f64, count: u64) {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        totals.0 += seconds;
        totals.1 += count;
    }
}

impl Collector for Totals {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (sum, count) = *self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let mut summary = Summary::default();
        summary.set_sample_sum(sum);
        summary.set_sample_count(count);
        let mut metric = Metric::default();
        metric.set_summary(summary);
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::SUMMARY);
        family.set_metric(vec![metric]);
        vec![family]
    }
}
