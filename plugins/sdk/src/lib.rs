//! The plugin SDK: write order rules or a conflict resolver as a few lines of safe Rust,
//! build them to `wasm32-wasip2`, and unit-test them natively with `cargo test`.
//!
//! ```ignore
//! use orchestrator_sdk::*;
//!
//! pub struct Rules;
//! impl OrderRules for Rules {
//!     fn decide(event: OrderEvent, current: Option<Order>) -> Decision {
//!         match current {
//!             Some(_) => Decision::Skip("nothing to do".into()),
//!             None => Decision::Reject("unknown order".into()),
//!         }
//!     }
//! }
//! export_order_rules!(Rules);
//! ```
//!
//! Plugins are sandboxed: no clock, randomness, filesystem or network. [`log`] is the one
//! host function. A panic is reported through it and fails only the event at hand.

#![deny(rust_2018_idioms)]

// Lets the generated bindings name this crate the same way from inside and outside.
extern crate self as orchestrator_sdk;

pub mod packed;
pub mod testing;

#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics"), feature = "small-block-alloc"))]
mod alloc;
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics"), feature = "small-block-alloc"))]
#[global_allocator]
static ALLOCATOR: alloc::SmallBlocks = alloc::SmallBlocks;

#[doc(hidden)]
pub mod bindings {
    pub mod rules {
        wit_bindgen::generate!({
            world: "order-rules-packed",
            path: "wit",
            pub_export_macro: true,
            export_macro_name: "export_world",
            default_bindings_module: "orchestrator_sdk::bindings::rules",
            runtime_path: "orchestrator_sdk::__wit_bindgen::rt",
            additional_derives: [PartialEq],
        });
    }
    pub mod resolver {
        wit_bindgen::generate!({
            world: "conflict-resolver",
            path: "wit",
            with: {
                "orchestrator:rules/types@1.0.0": super::rules::orchestrator::rules::types,
                "orchestrator:rules/host@1.0.0": super::rules::orchestrator::rules::host,
            },
            pub_export_macro: true,
            export_macro_name: "export_world",
            default_bindings_module: "orchestrator_sdk::bindings::resolver",
            runtime_path: "orchestrator_sdk::__wit_bindgen::rt",
        });
    }
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::rules::orchestrator::rules::host::Level;
pub use bindings::rules::orchestrator::rules::types::{
    Decision, EventKind, FinancialStatus, FulfillmentStatus, Order, OrderChange, OrderEvent, OrderFields, RuleInput,
    Status, Tier,
};

/// Order-processing rules: decide the next row from an event and the current row.
pub trait OrderRules {
    fn decide(event: OrderEvent, current: Option<Order>) -> Decision;

    /// Override only to share work across a batch; the default decides one by one.
    fn decide_batch(inputs: Vec<RuleInput>) -> Vec<Decision> {
        inputs.into_iter().map(|i| Self::decide(i.event, i.current)).collect()
    }
}

/// Conflict resolution: merge a change that lost a race with the row now stored.
pub trait ConflictResolver {
    fn resolve(base: Option<Order>, current: Order, change: Order) -> Result<OrderFields, String>;
}

/// Writes to the engine's log, tagged with this plugin's slot and version.
/// In native tests it prints to stderr.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::rules::orchestrator::rules::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Routes panic messages to the host log, so a failing event's dead letter says why.
#[doc(hidden)]
pub fn __install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|info| log(Level::Error, &format!("plugin panicked: {info}")))));
}

/// Exports a type implementing [`OrderRules`] as the plugin's `order-rules` world, with
/// the packed fast path for batches (the `order-rules-packed` world; see [`packed`]).
#[macro_export]
macro_rules! export_order_rules {
    ($rules:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __Export;
            impl $crate::bindings::rules::exports::orchestrator::rules::rules::Guest for __Export {
                fn decide(event: $crate::OrderEvent, current: Option<$crate::Order>) -> $crate::Decision {
                    $crate::__install_panic_hook();
                    <$rules as $crate::OrderRules>::decide(event, current)
                }
                fn decide_batch(inputs: Vec<$crate::RuleInput>) -> Vec<$crate::Decision> {
                    $crate::__install_panic_hook();
                    <$rules as $crate::OrderRules>::decide_batch(inputs)
                }
            }
            impl $crate::bindings::rules::exports::orchestrator::rules::packed::Guest for __Export {
                fn decide_packed(inputs: Vec<u8>) -> Vec<u8> {
                    $crate::__install_panic_hook();
                    // SAFETY: the engine wrote the buffer from Rust strings.
                    unsafe { $crate::packed::serve::<$rules>(&inputs) }
                }
            }
    $crate::bindings::rules::export_world!(__Export with_types_in $crate::bindings::rules);
        };
    };
}

/// Exports a type implementing [`ConflictResolver`] as the plugin's `conflict-resolver` world.
#[macro_export]
macro_rules! export_conflict_resolver {
    ($resolver:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __Export;
            impl $crate::bindings::resolver::exports::orchestrator::rules::resolver::Guest for __Export {
                fn resolve(
                    base: Option<$crate::Order>,
                    current: $crate::Order,
                    change: $crate::Order,
                ) -> Result<$crate::OrderFields, String> {
                    $crate::__install_panic_hook();
                    <$resolver as $crate::ConflictResolver>::resolve(base, current, change)
                }
            }
    $crate::bindings::resolver::export_world!(__Export with_types_in $crate::bindings::resolver);
        };
    };
}

impl Status {
    /// Position on the status lattice. Orders only move up it, except through an
    /// operator's edit; CANCELLED is terminal.
    pub fn rank(self) -> u8 {
        match self {
            Status::Pending => 0,
            Status::Confirmed => 1,
            Status::Processing => 2,
            Status::Shipped => 3,
            Status::Delivered => 4,
            Status::Cancelled => 5,
        }
    }
}
