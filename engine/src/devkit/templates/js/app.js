// {{name}}: order rules for the Atomic Order Orchestrator, in JavaScript.
//
// A new order takes its fields from its created event; an update changes only what it
// names. The house rule: shipping is free from 100.00 for GOLD and DIAMOND customers,
// and costs 4.99 below that. Amounts and times are BigInts (the contract's s64).

function shippingFeeCents(tier, totalCents) {
  return (tier === 'gold' || tier === 'diamond') && totalCents >= 10000n ? 0n : 499n;
}

function decide(event, current) {
  const change = event.payload;
  if (change.totalCents !== undefined && change.totalCents < 0n) {
    return { tag: 'reject', val: 'the total is negative' };
  }
  if (current !== undefined && event.kind === 'created') {
    return { tag: 'skip', val: `order ${current.id} exists already` };
  }
  let fields;
  if (current !== undefined) {
    fields = { ...current.fields };
  } else if (change.customer === undefined || change.tier === undefined || change.totalCents === undefined) {
    return { tag: 'reject', val: 'a new order needs a customer, a tier and a total' };
  } else {
    fields = {
      shopifyOrderId: undefined,
      customer: change.customer,
      tier: change.tier,
      status: 'pending',
      totalCents: change.totalCents,
      shippingFeeCents: 0n,
      currency: 'USD',
      note: '',
    };
  }
  for (const name of ['customer', 'tier', 'totalCents', 'currency', 'note', 'status']) {
    if (change[name] !== undefined) fields[name] = change[name];
  }
  if (event.kind === 'cancelled') fields.status = 'cancelled';
  fields.shippingFeeCents = shippingFeeCents(fields.tier, fields.totalCents);
  return { tag: 'upsert', val: fields };
}

export const rules = {
  decide,
  decideBatch(inputs) {
    return inputs.map((input) => decide(input.event, input.current));
  },
};
