//! The wire types the engine and its dashboard share: an order row, its tier, priority
//! and status, and the sort orders and pages of the order list. Serde only, so the
//! dashboard (wasm32) builds it without the engine; the `schema` feature adds the JSON
//! Schema and OpenAPI derives the engine publishes.

#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod journey;

/// Currencies without minor units (ISO 4217 exponent 0): their amounts are kept in whole
/// units, so `total_cents` of 1500 JPY is ¥1,500. Every other currency is kept in
/// hundredths.
pub const ZERO_DECIMAL: &[&str] =
    &["BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"];

/// How many minor digits an amount in `currency` keeps: 0 or 2.
pub fn minor_digits(currency: &str) -> u32 {
    if ZERO_DECIMAL.contains(&currency) { 0 } else { 2 }
}

/// Customer tier. DIAMOND customers are VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Tier {
    Bronze,
    Silver,
    Gold,
    Diamond,
}

impl Tier {
    /// From the lowest tier up.
    pub const ALL: [Tier; 4] = [Tier::Bronze, Tier::Silver, Tier::Gold, Tier::Diamond];

    pub fn priority(self) -> Priority {
        match self {
            Tier::Diamond => Priority::Vip,
            _ => Priority::Normal,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Bronze => "BRONZE",
            Tier::Silver => "SILVER",
            Tier::Gold => "GOLD",
            Tier::Diamond => "DIAMOND",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BRONZE" => Tier::Bronze,
            "SILVER" => Tier::Silver,
            "GOLD" => Tier::Gold,
            "DIAMOND" => Tier::Diamond,
            _ => return None,
        })
    }
}

/// Processing priority; the log is partitioned by it and VIP always goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Vip,
    Normal,
}

impl Priority {
    /// In scheduling order: VIP first.
    pub const ALL: [Priority; 2] = [Priority::Vip, Priority::Normal];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Vip => "VIP",
            Priority::Normal => "NORMAL",
        }
    }

    /// Lower-case label used in metrics and log partition names.
    pub fn label(self) -> &'static str {
        match self {
            Priority::Vip => "vip",
            Priority::Normal => "normal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "VIP" => Some(Priority::Vip),
            "NORMAL" => Some(Priority::Normal),
            _ => None,
        }
    }
}

/// Order lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Confirmed,
    Processing,
    Shipped,
    Delivered,
    Cancelled,
}

impl Status {
    /// In lifecycle order, as pickers list them.
    pub const ALL: [Status; 6] =
        [Status::Pending, Status::Confirmed, Status::Processing, Status::Shipped, Status::Delivered, Status::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Confirmed => "CONFIRMED",
            Status::Processing => "PROCESSING",
            Status::Shipped => "SHIPPED",
            Status::Delivered => "DELIVERED",
            Status::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => Status::Pending,
            "CONFIRMED" => Status::Confirmed,
            "PROCESSING" => Status::Processing,
            "SHIPPED" => Status::Shipped,
            "DELIVERED" => Status::Delivered,
            "CANCELLED" => Status::Cancelled,
            _ => return None,
        })
    }
}

/// A stored order row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct Order {
    pub id: String,
    #[serde(default)]
    pub shopify_order_id: Option<i64>,
    pub customer: String,
    pub tier: Tier,
    /// Derived from `tier`: DIAMOND is VIP.
    pub priority: Priority,
    pub status: Status,
    /// Order total in minor units (cents).
    pub total_cents: i64,
    /// Shipping fee in minor units (cents).
    pub shipping_fee_cents: i64,
    /// ISO 4217 currency code.
    pub currency: String,
    #[serde(default)]
    pub note: String,
    /// Starts at 1 and grows by exactly one per applied change.
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the source system (Shopify) last changed the order, as of the last change
    /// applied from it. Deliveries not newer than this are stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_updated_at: Option<DateTime<Utc>>,
    /// Which rule (and its version) produced this row.
    pub decided_by: String,
    /// Per field, the place of the change that last set it (see [`ChangedAt`]).
    #[serde(default)]
    pub changed_at: ChangedAt,
    /// The shop the order came from (its first event's, such as a Shopify delivery's
    /// `X-Shopify-Shop-Domain`), fixed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shop: Option<String>,
}

/// Per field, the place of the change that last set it: when the engine first accepted
/// that change, in µs since the epoch. A change never overwrites a field that a
/// later-placed change set, so a row depends only on its changes, never on the order in
/// which they were applied (README, Semantics). Zero means "as the create set it".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct ChangedAt {
    /// The place of the order's created event.
    pub created: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shopify_order_id: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub customer: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tier: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub status: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub total_cents: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shipping_fee_cents: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub currency: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub note: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl ChangedAt {
    /// The latest place of any field: an operator's edit goes after it.
    pub fn latest(&self) -> i64 {
        [
            self.created,
            self.shopify_order_id,
            self.customer,
            self.tier,
            self.status,
            self.total_cents,
            self.shipping_fee_cents,
            self.currency,
            self.note,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// How the stores keep it: one JSON text column.
    pub fn to_column(&self) -> String {
        serde_json::to_string(self).expect("plain integers serialize")
    }

    /// A missing or unreadable column (a row of an earlier version) reads as all zero:
    /// any change may set its fields.
    pub fn from_column(text: Option<&str>) -> Self {
        text.and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default()
    }
}

impl Order {
    /// Sets the business fields. The priority stays: it is the order's from its creation.
    pub fn set_fields(&mut self, f: OrderFields) {
        self.shopify_order_id = f.shopify_order_id;
        self.customer = f.customer;
        self.tier = f.tier;
        self.status = f.status;
        self.total_cents = f.total_cents;
        self.shipping_fee_cents = f.shipping_fee_cents;
        self.currency = f.currency;
        self.note = f.note;
    }

    /// The mutable business fields, for comparing two rows regardless of bookkeeping.
    pub fn fields(&self) -> OrderFields {
        OrderFields {
            shopify_order_id: self.shopify_order_id,
            customer: self.customer.clone(),
            tier: self.tier,
            status: self.status,
            total_cents: self.total_cents,
            shipping_fee_cents: self.shipping_fee_cents,
            currency: self.currency.clone(),
            note: self.note.clone(),
        }
    }
}

/// The business fields of an order, as rules decide them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFields {
    pub shopify_order_id: Option<i64>,
    pub customer: String,
    pub tier: Tier,
    pub status: Status,
    pub total_cents: i64,
    pub shipping_fee_cents: i64,
    pub currency: String,
    pub note: String,
}

/// Sort orders of the order list. Each is paged by an opaque cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub enum Sort {
    /// Most recently updated first (the default).
    #[default]
    #[serde(rename = "-updated_at")]
    UpdatedDesc,
    #[serde(rename = "updated_at")]
    UpdatedAsc,
    #[serde(rename = "id")]
    IdAsc,
    #[serde(rename = "-id")]
    IdDesc,
}

impl Sort {
    pub const ALL: [Sort; 4] = [Sort::UpdatedDesc, Sort::UpdatedAsc, Sort::IdAsc, Sort::IdDesc];

    /// The `sort` query value.
    pub fn as_str(self) -> &'static str {
        match self {
            Sort::UpdatedDesc => "-updated_at",
            Sort::UpdatedAsc => "updated_at",
            Sort::IdAsc => "id",
            Sort::IdDesc => "-id",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Sort::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// For people: what a picker shows.
    pub fn label(self) -> &'static str {
        match self {
            Sort::UpdatedDesc => "newest update first",
            Sort::UpdatedAsc => "oldest update first",
            Sort::IdAsc => "id ascending",
            Sort::IdDesc => "id descending",
        }
    }
}

/// One page of a list, and the cursor of the next (none on the last page).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_parse() {
        for s in Status::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        for t in Tier::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
            assert_eq!(Tier::parse(t.as_str()), Some(t));
        }
        for p in Priority::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        for o in Sort::ALL {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
            assert_eq!(Sort::parse(o.as_str()), Some(o));
        }
        assert_eq!(Sort::parse("total"), None);
    }
}
