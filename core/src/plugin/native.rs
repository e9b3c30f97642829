//! The native reference rules: the default plugins' own Rust code run natively, which
//! the Wasm plugins are checked against and benchmarked beside.

use std::sync::Arc;

use crate::domain::{Order, OrderEvent, OrderFields};
use crate::plugin::convert::native as wit;
use crate::rules::{ConflictResolver, Decision, OrderRules, RuleError, Rulebook};

/// The built-in rules, run natively: what the engine decides with before (or without)
/// any plugin deployment.
pub fn rulebook() -> Arc<Rulebook> {
    Rulebook::new(Arc::new(NativeRules), Arc::new(NativeResolver))
}

/// The default `order-rules` plugin's code, run natively.
#[derive(Debug, Default)]
pub struct NativeRules;

impl NativeRules {
    pub const ID: &'static str = "native:order-rules@1";

    pub fn decide(&self, event: &OrderEvent, current: Option<&Order>) -> Decision {
        use orchestrator_sdk::OrderRules as _;
        wit::decision_back(order_rules::Rules::decide(wit::event(event), current.map(wit::order)))
    }
}

impl OrderRules for NativeRules {
    fn id(&self) -> &str {
        Self::ID
    }

    fn decide_batch(&self, inputs: &[(&OrderEvent, Option<&Order>)]) -> Vec<Result<Decision, RuleError>> {
        inputs.iter().map(|(e, c)| Ok(self.decide(e, *c))).collect()
    }
}

/// The default `conflict-resolver` plugin's code, run natively.
#[derive(Debug, Default)]
pub struct NativeResolver;

impl NativeResolver {
    pub const ID: &'static str = "native:conflict-resolver@1";
}

impl ConflictResolver for NativeResolver {
    fn id(&self) -> &str {
        Self::ID
    }

    fn resolve(
        &self,
        base: Option<&Order>,
        current: &Order,
        change: &Order,
    ) -> Result<Result<OrderFields, String>, RuleError> {
        use orchestrator_sdk::ConflictResolver as _;
        let merged =
            conflict_resolver::Resolver::resolve(base.map(wit::order), wit::order(current), wit::order(change));
        Ok(merged.map(wit::fields_back))
    }
}
