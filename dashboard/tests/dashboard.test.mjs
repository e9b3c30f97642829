// Browser tests of the operator dashboard: a real engine (the debug `orchestrator`
// binary) on a free port with 20k generated orders, driven through headless Debian
// chromium with playwright-core. Screenshots go to tests/artifacts/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync, existsSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const artifacts = join(here, 'artifacts');
const targetDir = process.env.CARGO_TARGET_DIR || join(homedir(), '.cache/atomic-orchestrator/target');
const bin = process.env.ORCHESTRATOR_BIN || join(targetDir, 'debug/orchestrator');
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
const TOKEN = 'dashboard-test-token';
const ORDERS = 20000;
const ROW_H = 28;

let engine, dataDir, base, browser, page;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
    srv.on('error', reject);
  });
}

async function api(method, path, { body, ifMatch, auth } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (ifMatch !== undefined) headers['if-match'] = String(ifMatch);
  if (auth) headers.authorization = `Bearer ${TOKEN}`;
  const res = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : null };
}

async function waitFor(what, fn, timeoutMs = 20000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    await new Promise(r => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`) });
const withToken = () => page.locator('[data-testid=token]').fill(TOKEN);
const row = (id) => page.locator(`[data-testid=order-row][data-order-id="${id}"]`);

before(async () => {
  assert.ok(existsSync(bin), `engine binary missing at ${bin}: run cargo build -p orchestrator first`);
  assert.ok(existsSync(browserPath), `chromium missing at ${browserPath}: apt-get install chromium`);
  mkdirSync(artifacts, { recursive: true });
  dataDir = mkdtempSync(join(tmpdir(), 'dashboard-test-'));
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  engine = spawn(bin, ['serve', '--data-dir', dataDir, '--listen', `127.0.0.1:${port}`, '--api-token', TOKEN], { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitFor('engine health', async () => (await fetch(base + '/health')).ok, 60000);
  // The generator goes through the normal pipeline and verifies the result.
  execFileSync(bin, ['generate', '--quantity', String(ORDERS), '--url', base, '--api-token', TOKEN], { stdio: 'ignore', timeout: 300000 });
  browser = await chromium.launch({
    executablePath: browserPath,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(base + '/');
});

after(async () => {
  if (browser) await browser.close();
  if (engine) { engine.kill('SIGTERM'); await new Promise(r => engine.once('exit', r)); }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

test('the table shows rows with a bounded number of row elements, and the feed is live', async () => {
  await page.locator('[data-testid=conn]').filter({ hasText: 'live' }).waitFor();
  await page.locator('[data-testid=cell-id]').first().filter({ hasText: /\S/ }).waitFor();
  const first = (await api('GET', '/orders?limit=1&sort=-updated_at')).json.items[0];
  await row(first.id).waitFor();
  const elements = await page.locator('[data-testid=order-row]').count();
  assert.ok(elements > 0 && elements <= 100, `row elements in the DOM: ${elements}`);
  await page.locator('[data-testid=health-text]').filter({ hasText: /^ok · backend / }).waitFor();
  await shot('01-table');
});

test('scrolling far loads more pages and renders the row at index 10000', async () => {
  const scroller = page.locator('[data-testid=orders-scroll]');
  // Scroll to the loaded end until the table holds more than 10,000 rows.
  await waitFor('10k rows loaded', async () => {
    const h = await scroller.evaluate((el) => { el.scrollTop = el.scrollHeight; el.dispatchEvent(new Event('scroll')); return el.scrollHeight; });
    return h > 10100 * ROW_H;
  }, 60000);
  await scroller.evaluate((el, y) => { el.scrollTop = y; el.dispatchEvent(new Event('scroll')); }, 10000 * ROW_H);
  const target = page.locator('[data-testid=order-row][data-index="10000"]');
  await target.waitFor({ state: 'visible' });
  // The same row as the API's 10,001st in this sort: nothing changed orders yet.
  let cursor = '', items = [];
  while (items.length <= 10000) {
    const p = (await api('GET', `/orders?limit=1000&sort=-updated_at${cursor ? '&cursor=' + encodeURIComponent(cursor) : ''}`)).json;
    items = items.concat(p.items); cursor = p.next_cursor;
    if (!cursor) break;
  }
  assert.equal(await target.getAttribute('data-order-id'), items[10000].id);
  const elements = await page.locator('[data-testid=order-row]').count();
  assert.ok(elements <= 100, `row elements in the DOM after scrolling: ${elements}`);
  await shot('02-scrolled-10000');
  await scroller.evaluate((el) => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); });
});

test('a PATCH from outside appears in the visible row without a reload', async () => {
  const id = await page.locator('[data-testid=order-row][data-index="3"]').getAttribute('data-order-id');
  const before = (await api('GET', `/orders/${id}`)).json;
  const r = await api('PATCH', `/orders/${id}`, { body: { shipping_fee_cents: 1234, note: 'from outside' }, ifMatch: before.version });
  assert.equal(r.status, 200);
  await row(id).locator('[data-testid=cell-version]').filter({ hasText: String(before.version + 1) }).waitFor();
  assert.match(await row(id).locator('[data-testid=cell-fee]').textContent(), /^12\.34/);
  await shot('03-live-update');
});

test('unsaved edits under a newer version open the conflict dialog; each choice resolves it', async () => {
  const id = await page.locator('[data-testid=order-row][data-index="5"]').getAttribute('data-order-id');
  await row(id).click();
  await page.locator('[data-testid=detail-id]').filter({ hasText: id }).waitFor();
  const v0 = (await api('GET', `/orders/${id}`)).json.version;
  await page.locator('[data-testid=detail-version]').filter({ hasText: String(v0) }).waitFor();

  // Take server: my unsaved note is dropped for the server's row.
  await page.locator('[data-testid=edit-note]').fill('mine');
  assert.equal((await api('PATCH', `/orders/${id}`, { body: { note: 'theirs', shipping_fee_cents: 555 }, ifMatch: v0 })).status, 200);
  const dialog = page.locator('[data-testid=conflict-dialog]');
  await dialog.waitFor();
  assert.equal(await dialog.locator('[data-testid=conflict-note] [data-testid=mine]').textContent(), 'mine');
  assert.equal(await dialog.locator('[data-testid=conflict-note] [data-testid=server]').textContent(), 'theirs');
  await shot('04-conflict-dialog');
  await page.locator('[data-testid=take-server]').click();
  await dialog.waitFor({ state: 'detached' });
  assert.equal(await page.locator('[data-testid=edit-note]').inputValue(), 'theirs');
  assert.equal(await page.locator('[data-testid=detail-version]').textContent(), String(v0 + 1));

  // Re-apply mine: my note goes on top of the server's row, keeping its new fee.
  await page.locator('[data-testid=edit-note]').fill('mine again');
  assert.equal((await api('PATCH', `/orders/${id}`, { body: { shipping_fee_cents: 777 }, ifMatch: v0 + 1 })).status, 200);
  await dialog.waitFor();
  await page.locator('[data-testid=reapply-mine]').click();
  await page.locator('[data-testid=detail-version]').filter({ hasText: String(v0 + 3) }).waitFor();
  let server = (await api('GET', `/orders/${id}`)).json;
  assert.equal(server.note, 'mine again');
  assert.equal(server.shipping_fee_cents, 777);

  // Merge: keep my fee, take the server's note.
  await page.locator('[data-testid=edit-fee]').fill('4242');
  await page.locator('[data-testid=edit-note]').fill('my note, dropped in the merge');
  assert.equal((await api('PATCH', `/orders/${id}`, { body: { note: 'server note' }, ifMatch: v0 + 3 })).status, 200);
  await dialog.waitFor();
  await page.locator('[data-testid=keep-mine-note]').uncheck();
  await page.locator('[data-testid=merge]').click();
  await page.locator('[data-testid=detail-version]').filter({ hasText: String(v0 + 5) }).waitFor();
  server = (await api('GET', `/orders/${id}`)).json;
  assert.equal(server.note, 'server note');
  assert.equal(server.shipping_fee_cents, 4242);

  const history = (await api('GET', `/orders/${id}/history`)).json;
  assert.ok(history.length >= 6, `history entries: ${history.length}`);
  await page.locator('[data-testid=history-entry]').nth(5).waitFor();
  await shot('05-conflict-resolved');
});

test('two pages edit one order: the second save gets 409, the dialog, and re-apply keeps both edits', async () => {
  const id = await page.locator('[data-testid=order-row][data-index="7"]').getAttribute('data-order-id');
  const v0 = (await api('GET', `/orders/${id}`)).json.version;
  // Page B's feed drops order changes, so only the save's 409 can tell it about page A's edit.
  const ctxB = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const pageB = await ctxB.newPage();
  await pageB.routeWebSocket(/\/ws$/, (ws) => {
    const server = ws.connectToServer();
    server.onMessage((m) => { if (!String(m).includes('"order.synced"')) ws.send(m); });
  });
  await pageB.goto(base + '/');
  for (const p of [page, pageB]) {
    await p.locator(`[data-testid=order-row][data-order-id="${id}"]`).click();
    await p.locator('[data-testid=detail-version]').filter({ hasText: String(v0) }).waitFor();
  }
  await page.locator('[data-testid=edit-note]').fill('edit from page A');
  await page.locator('[data-testid=save]').click();
  await page.locator('[data-testid=detail-version]').filter({ hasText: String(v0 + 1) }).waitFor();

  await pageB.locator('[data-testid=edit-fee]').fill('9999');
  await pageB.locator('[data-testid=save]').click();
  const dialog = pageB.locator('[data-testid=conflict-dialog]');
  await dialog.waitFor();
  assert.equal(await dialog.locator('[data-testid=conflict-note] [data-testid=server]').textContent(), 'edit from page A');
  assert.equal(await dialog.locator('[data-testid=conflict-shipping_fee_cents] [data-testid=mine]').textContent(), '9999');
  await pageB.screenshot({ path: join(artifacts, '06-second-page-409.png') });
  await pageB.locator('[data-testid=reapply-mine]').click();
  await pageB.locator('[data-testid=detail-version]').filter({ hasText: String(v0 + 2) }).waitFor();
  const server = (await api('GET', `/orders/${id}`)).json;
  assert.equal(server.note, 'edit from page A');
  assert.equal(server.shipping_fee_cents, 9999);
  const sources = (await api('GET', `/orders/${id}/history`)).json.filter((h) => h.version > v0);
  assert.equal(sources.length, 2, JSON.stringify(sources));
  // Page A, which did see the feed, shows B's edit in its form and in the row.
  await page.locator('[data-testid=detail-version]').filter({ hasText: String(v0 + 2) }).waitFor();
  assert.equal(await page.locator('[data-testid=edit-fee]').inputValue(), '9999');
  await row(id).locator('[data-testid=cell-version]').filter({ hasText: String(v0 + 2) }).waitFor();
  await ctxB.close();
});

test('a run started from the page reaches DONE with verification passed', async () => {
  await withToken();
  await page.locator('[data-testid=run-quantity]').fill('3000');
  await page.locator('[data-testid=run-start]').click();
  await page.locator('[data-testid=run-phase]').filter({ hasText: /GENERATING|VIP_PROCESSING|VIP_DRAINED|NORMAL_PROCESSING|DONE/ }).waitFor();
  await page.locator('[data-testid=run-phase]').filter({ hasText: /^DONE$/ }).waitFor({ timeout: 120000 });
  await page.locator('[data-testid=run-verification-current]').filter({ hasText: 'verification passed' }).waitFor();
  await page.locator('[data-testid=run-history-row]').first().locator('[data-testid=run-verification]').filter({ hasText: 'passed' }).waitFor();
  const runs = (await api('GET', '/runs?limit=1')).json.items;
  assert.equal(runs[0].quantity, 3000);
  assert.equal(runs[0].verification.passed, true);
  await shot('07-run-done');
});

test('plugins: upload a shadow version from the page, promote and roll back; a bad upload shows the engine error', async () => {
  const fixture = join(targetDir, 'wasm-plugins/wasm32-wasip2/plugin/fixture_rules_v2.wasm');
  assert.ok(existsSync(fixture), `plugin fixture missing at ${fixture}`);
  await withToken();
  const slot = page.locator('[data-testid=plugin-order-rules]');
  const active = slot.locator('[data-testid=plugin-active]');
  await active.filter({ hasText: /^v1 / }).waitFor();
  await page.locator('[data-testid=plugin-slot]').selectOption('order-rules');
  await page.locator('[data-testid=plugin-as-shadow]').check();
  await page.locator('[data-testid=plugin-file]').setInputFiles(fixture);
  await page.locator('[data-testid=plugin-upload]').click();
  await slot.locator('[data-testid=plugin-shadow]').filter({ hasText: /^v2 / }).waitFor();
  await page.locator('[data-testid=shadow-report]').first().waitFor();
  await slot.locator('[data-testid=plugin-promote]').click();
  await active.filter({ hasText: /^v2 / }).waitFor();
  await shot('08-plugin-promoted');
  await slot.locator('[data-testid=plugin-rollback]').click();
  await active.filter({ hasText: /^v1 / }).waitFor();
  const slots = (await api('GET', '/plugins')).json;
  assert.equal(slots.find((s) => s.slot === 'order-rules').active.version, 1);

  await page.locator('[data-testid=plugin-file]').setInputFiles({ name: 'broken.wasm', mimeType: 'application/wasm', buffer: Buffer.from('not a component') });
  await page.locator('[data-testid=plugin-upload]').click();
  const message = page.locator('[data-testid=plugin-message]');
  await message.filter({ hasText: /^HTTP 400/ }).waitFor();
  await shot('09-plugin-bad-upload');
});

test('dead letters: a rejected event is listed with its reason and replayed from the page', async () => {
  const orderId = 'dashboard-late-order';
  const event = (event_id, kind, payload) => ({ event_id, order_id: orderId, kind, source: 'dashboard-test', occurred_at: '2026-11-21T10:00:00Z', payload });
  assert.equal((await api('POST', '/orders/events', { body: event('dash-early', 'updated', { note: 'early' }), auth: true })).status, 202);
  await waitFor('the dead letter', async () => (await api('GET', '/dead-letters')).json.items.some((d) => d.id === 'dash-early'));
  assert.equal((await api('POST', '/orders/events', { body: event('dash-create', 'created', { customer: 'late@example.com', tier: 'GOLD', total_cents: 100 }), auth: true })).status, 202);
  await waitFor('the order', async () => (await api('GET', `/orders/${orderId}`)).status === 200);
  await withToken();
  await page.locator('[data-testid=dead-letters-refresh]').click();
  const letter = page.locator('[data-testid=dead-letter][data-id="dash-early"]');
  await letter.waitFor();
  assert.match(await letter.textContent(), new RegExp(orderId));
  await letter.locator('[data-testid=dead-letter-replay]').click();
  await letter.locator('[data-testid=dead-letter-replay]').filter({ hasText: 'replayed' }).waitFor();
  await waitFor('the replayed note', async () => (await api('GET', `/orders/${orderId}`)).json.note === 'early');
  await shot('10-dead-letter-replayed');
});

test('after the engine restarts, the page reconnects and resyncs the rows it shows', async () => {
  const id = await page.locator('[data-testid=order-row][data-index="2"]').getAttribute('data-order-id');
  const v0 = (await api('GET', `/orders/${id}`)).json.version;
  // The page's next socket is held until the order has changed, so the change can
  // only reach the page through the resync after the reconnect, not through the feed.
  let release;
  const gate = new Promise((r) => { release = r; });
  await page.routeWebSocket(/\/ws$/, async (ws) => { await gate; ws.connectToServer(); });
  engine.kill('SIGTERM');
  await new Promise((r) => engine.once('exit', r));
  await page.locator('[data-testid=conn]').filter({ hasText: 'reconnecting' }).waitFor();
  const port = new URL(base).port;
  engine = spawn(bin, ['serve', '--data-dir', dataDir, '--listen', `127.0.0.1:${port}`, '--api-token', TOKEN], { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitFor('engine health after restart', async () => (await fetch(base + '/health')).ok, 60000);
  assert.equal((await api('PATCH', `/orders/${id}`, { body: { note: 'while away' }, ifMatch: v0 })).status, 200);
  release();
  await page.locator('[data-testid=conn]').filter({ hasText: 'live' }).waitFor({ timeout: 30000 });
  await row(id).locator('[data-testid=cell-version]').filter({ hasText: String(v0 + 1) }).waitFor();
  await shot('11-reconnected');
});

test('a run is cancelled from the page, and reset needs a confirmation', async () => {
  await withToken();
  await page.locator('[data-testid=run-quantity]').fill('1000000');
  await page.locator('[data-testid=run-start]').click();
  const phase = page.locator('[data-testid=run-phase]');
  await phase.filter({ hasText: /GENERATING|VIP_PROCESSING|VIP_DRAINED|NORMAL_PROCESSING/ }).waitFor();
  await page.locator('[data-testid=run-cancel]').click();
  await phase.filter({ hasText: /^CANCELLED$/ }).waitFor({ timeout: 60000 });
  const cancelled = (await api('GET', '/runs?limit=1')).json.items[0];
  assert.equal(cancelled.phase, 'CANCELLED');
  assert.equal(cancelled.cancel.purged, true, 'the page cancels with purge by default');
  await shot('12-run-cancelled');
  // Reset clears the store only; wait until the purged log has nothing left to apply.
  await waitFor('empty queues', async () => {
    const h = (await api('GET', '/health')).json;
    return h.queue_depth.vip === 0 && h.queue_depth.normal === 0;
  }, 60000);

  await page.locator('[data-testid=reset]').click();
  await page.locator('[data-testid=reset-abort]').click();
  assert.ok((await api('GET', '/orders?limit=1')).json.items.length > 0, 'abort keeps the orders');
  await page.locator('[data-testid=reset]').click();
  await page.locator('[data-testid=reset-confirm]').click();
  await page.locator('[data-testid=row-count]').filter({ hasText: /^0 orders loaded$/ }).waitFor();
  assert.equal((await api('GET', '/orders?limit=1')).json.items.length, 0);
});
