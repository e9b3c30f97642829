// The default order rules (plugins/order-rules), ported to JavaScript line for line.
// The conformance test (engine/tests/conformance.rs) checks that it decides exactly like
// the native reference. Amounts and times are BigInts (the contract's s64).

const RANK = ['pending', 'confirmed', 'processing', 'shipped', 'delivered', 'cancelled'];

function shippingFeeCents(total) {
  if (total < 5000n) return 999n;
  if (total < 10000n) return 799n;
  if (total < 20000n) return 599n;
  return 0n;
}

function mappedStatus(financial, fulfillment) {
  if (fulfillment !== undefined) {
    return { fulfilled: 'shipped', partial: 'confirmed', restocked: 'cancelled' }[fulfillment];
  }
  if (financial === undefined) return undefined;
  if (financial === 'pending' || financial === 'authorized') return 'pending';
  if (financial === 'paid' || financial === 'partially-paid' || financial === 'partially-refunded') return 'confirmed';
  return 'cancelled';
}

const same = (a, b) => Object.keys(a).every((k) => a[k] === b[k]);

function decide(event, current) {
  const p = event.payload;
  if (event.kind === 'created' && current !== undefined) return { tag: 'skip', val: 'order already exists' };
  if (event.source === 'shopify' && current !== undefined && current.sourceUpdatedAtMs !== undefined) {
    const last = current.sourceUpdatedAtMs;
    if (event.occurredAtMs < last) {
      return { tag: 'skip', val: `discarded: stale delivery (updated_at ${event.occurredAtMs} is older than ${last})` };
    }
  }
  if (p.totalCents !== undefined && p.totalCents < 0n) return { tag: 'reject', val: `negative total_cents ${p.totalCents}` };
  if (p.shippingFeeCents !== undefined && p.shippingFeeCents < 0n) {
    return { tag: 'reject', val: `negative shipping_fee_cents ${p.shippingFeeCents}` };
  }
  const before = current === undefined ? undefined : current.fields;
  let fields;
  if (before !== undefined) {
    fields = { ...before };
  } else if (p.customer === undefined || p.tier === undefined || p.totalCents === undefined) {
    return {
      tag: 'reject',
      val: `order ${event.orderId} does not exist and the ${event.kind} event lacks customer, tier or total_cents`,
    };
  } else {
    fields = {
      shopifyOrderId: undefined,
      customer: p.customer,
      tier: p.tier,
      status: 'pending',
      totalCents: p.totalCents,
      shippingFeeCents: shippingFeeCents(p.totalCents),
      currency: 'USD',
      note: '',
    };
  }
  for (const name of ['shopifyOrderId', 'customer', 'tier', 'currency', 'note']) {
    if (p[name] !== undefined) fields[name] = p[name];
  }
  if (p.totalCents !== undefined) {
    fields.totalCents = p.totalCents;
    fields.shippingFeeCents = shippingFeeCents(p.totalCents);
  }
  if (p.shippingFeeCents !== undefined) fields.shippingFeeCents = p.shippingFeeCents;
  let status = mappedStatus(p.financialStatus, p.fulfillmentStatus) ?? p.status;
  if (event.kind === 'cancelled') status = 'cancelled';
  // A late or stale event never moves the order back along the lattice.
  if (status !== undefined && RANK.indexOf(status) >= RANK.indexOf(fields.status)) fields.status = status;
  if (before !== undefined && same(before, fields)) return { tag: 'skip', val: 'no change' };
  return { tag: 'upsert', val: fields };
}

export const rules = {
  decide,
  decideBatch(inputs) {
    return inputs.map((input) => decide(input.event, input.current));
  },
};
