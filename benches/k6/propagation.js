// Revocation propagation across replicated sidecars, measured with k6
// (independent of the project's own test client): create a key on one
// sidecar, wait until the others allow it, delete it there, then time until
// each other sidecar denies it. The writer rotates over the sidecars.
//
//   TARGETS=127.0.0.1:50061,127.0.0.1:50062,127.0.0.1:50063 \
//   TOKENS=<admin token of each, same order> ROUNDS=200 \
//   k6 run benches/k6/propagation.js
//
// k6 reads the clock in whole milliseconds, so figures are ±1 ms.
import grpc from 'k6/net/grpc';
import { Trend } from 'k6/metrics';
import { check, fail } from 'k6';

export const options = {
  scenarios: {
    revoke: {
      executor: 'shared-iterations',
      vus: 1,
      iterations: Number(__ENV.ROUNDS || 200),
      maxDuration: '10m',
    },
  },
  summaryTrendStats: ['med', 'p(99)', 'max'],
  thresholds: { checks: ['rate==1'], propagation_ms: ['p(99)<50'] },
};

const targets = __ENV.TARGETS.split(',');
const tokens = __ENV.TOKENS.split(',');
const clients = targets.map(() => new grpc.Client());
const propagation = new Trend('propagation_ms');
let connected = false;

function allowed(i, key) {
  const reply = clients[i].invoke('keyward.v1.Authorizer/Authorize', {
    key,
    method: 'POST',
    path: '/v3/mail/send',
  });
  if (!reply || reply.status !== grpc.StatusOK) fail(`Authorize on ${targets[i]} failed`);
  return reply.message.allowed === true;
}

function admin(i) {
  return { metadata: { authorization: `Bearer ${tokens[i]}` } };
}

export default function () {
  if (!connected) {
    targets.forEach((target, i) => clients[i].connect(target, { plaintext: true, reflect: true }));
    connected = true;
  }
  const writer = __ITER % targets.length;
  const others = targets.map((_, i) => i).filter((i) => i !== writer);
  const created = clients[writer].invoke(
    'keyward.v1.KeyManager/CreateKey',
    { name: 'k6 propagation', account_id: 'k6', scopes: ['mail.send'] },
    admin(writer),
  );
  check(created, { 'created': (r) => r && r.status === grpc.StatusOK });
  const key = created.message.secret;
  for (const i of others) {
    const since = Date.now();
    while (!allowed(i, key)) {
      if (Date.now() - since > 10000) fail('a created key never arrived');
    }
  }
  const deleted = clients[writer].invoke(
    'keyward.v1.KeyManager/DeleteKey',
    { key_id: created.message.key.keyId },
    admin(writer),
  );
  const acknowledged = Date.now();
  check(deleted, { 'deleted': (r) => r && r.status === grpc.StatusOK });
  for (const i of others) {
    while (allowed(i, key)) {
      if (Date.now() - acknowledged > 10000) fail('a revocation never arrived');
    }
    propagation.add(Date.now() - acknowledged);
  }
}
