// The dashboard's cluster view against two real engines in one group on Kafka + CQL
// (KAFKA_BROKERS and CQL_NODES, from compose/local-services.sh): the health page lists
// both instances with the partitions each consumes, their pauses and plugin versions,
// the group's lag per partition, and the live strip adds up the whole group.
// On CI a missing service is a failure; elsewhere the test says why it did not run.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir, homedir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const targetDir = process.env.CARGO_TARGET_DIR || join(homedir(), '.cache/atomic-orchestrator/target');
const bin = process.env.ORCHESTRATOR_BIN || join(targetDir, 'debug/orchestrator');
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
const { KAFKA_BROKERS: brokers, CQL_NODES: nodes } = process.env;
const TOKEN = 'cluster-test-token';
const name = `dash${Date.now()}`;

const missing = !brokers || !nodes;
if (missing && process.env.CI === 'true') throw new Error('KAFKA_BROKERS and CQL_NODES are required on CI');

let engines = [], dirs = [], browser, page;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
    srv.on('error', reject);
  });
}

async function waitFor(what, fn, timeoutMs = 60000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

// One engine of the group: the same topics, group and keyspace, a data dir of its own.
async function startEngine() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'cluster-test-'));
  dirs.push(dir);
  const args = ['serve', '--data-dir', dir, '--listen', `127.0.0.1:${port}`, '--api-token', TOKEN,
    '--kafka-brokers', brokers, '--cql-nodes', nodes, '--kafka-topic-prefix', name, '--kafka-group', `${name}.engine`,
    '--kafka-partitions', '4', '--cql-keyspace', name];
  const env = { ...process.env, RUST_LOG: 'warn' };
  delete env.ORCHESTRATOR_API_TOKEN;
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'inherit'], env });
  engines.push(child);
  const base = `http://127.0.0.1:${port}`;
  await waitFor(`engine on ${port}`, async () => (await fetch(`${base}/health`)).ok);
  return base;
}

let a, b;
before(async () => {
  if (missing) return;
  assert.ok(existsSync(bin), `engine binary missing at ${bin}: run cargo test --workspace first`);
  a = await startEngine();
  b = await startEngine();
  browser = await chromium.launch({ executablePath: browserPath, args: ['--headless', '--no-sandbox', '--disable-gpu'] });
  page = await browser.newPage({ viewport: { width: 1600, height: 1000 }, locale: 'en-US' });
  page.on('pageerror', (e) => console.error('page error:', e.message));
});

after(async () => {
  if (browser) await browser.close();
  for (const e of engines) { e.kill('SIGTERM'); await new Promise((r) => e.once('exit', r)); }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

test('the cluster view shows both engines of the group, their partitions, pauses and plugin versions', { skip: missing && 'KAFKA_BROKERS and CQL_NODES not set' }, async () => {
  await page.goto(`${a}/ui/health`);
  const rows = page.locator('[data-testid=cluster-instance]');
  // Each instance's beacon, and a rebalance that gives each its share of partitions
  // (while it goes, an instance may still say it holds what it gave up).
  const cells = () => rows.evaluateAll((rs) => rs.map((r) => [...r.children].map((c) => c.textContent)));
  const table = await waitFor('both instances, each NORMAL partition consumed by exactly one', async () => {
    const t = await cells();
    const held = t.flatMap((r) => r[3].split(', ')).sort();
    return t.length === 2 && t.every((r) => r[3] !== '–') && held.join() === '0,1,2,3' && t;
  });
  assert.equal(table.filter((r) => r[0].endsWith('(this one)')).length, 1);
  assert.ok(table.every((r) => /^order-rules@1#sha256:/.test(r[5]) && r[5] === table[0][5]), JSON.stringify(table));
  assert.match(await page.locator('[data-testid=cluster-summary]').textContent(), /^2 instances · plugin versions agree$/);
  // The group's lag per partition, each with who consumes it.
  const partitions = page.locator('[data-testid=cluster-partition]');
  assert.equal(await partitions.count(), 8);
  const consumers = await partitions.evaluateAll((rs) => rs.map((r) => r.children[3].textContent));
  assert.ok(consumers.every((c) => !c.startsWith('no one')), JSON.stringify(consumers));
  // The live strip adds up the whole group.
  await page.locator('[data-testid=spark-whose]').filter({ hasText: 'cluster, 2 instances' }).waitFor();

  // A pause made through B shows on both rows of A's page.
  const pause = await fetch(`${b}/queues/vip/pause`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } });
  assert.equal(pause.status, 200);
  await waitFor('the pause on both', async () => {
    const states = await rows.evaluateAll((rs) => rs.map((r) => r.children[4].textContent));
    return states.length === 2 && states.every((s) => s === 'paused / running');
  }, 30000);
  mkdirSync(join(here, '../../docs/screenshots'), { recursive: true });
  await page.locator('[data-testid=cluster]').screenshot({ path: join(here, '../../docs/screenshots/cluster.png') });
  await fetch(`${b}/queues/vip/resume`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } });

  // axe-core on the page with both tables.
  const axe = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
  await page.addScriptTag({ content: axe });
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
  const bad = result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical').map((v) => v.id);
  assert.deepEqual(bad, []);
});
