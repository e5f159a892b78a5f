// Write fairness with k6, independent of the project's load tool: one VU
// renaming the quiet account's key back to back, beside NOISY VUs renaming
// the noisy account's key. Compare the quiet scenario's latency with a run
// at NOISY=0 (the summary's grpc_req_duration{scenario:quiet}).
//
//   TARGET=127.0.0.1:50051 QUIET_ID=... QUIET_KEY=SG... NOISY_ID=... NOISY_KEY=SG... \
//   NOISY=48 k6 run benches/k6/fairness.js
//
// Each key needs api_keys.update (it renames itself).
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const noisyVus = Number(__ENV.NOISY || 48);
const scenarios = {
  quiet: { executor: 'constant-vus', vus: 1, duration: __ENV.DURATION || '5s', exec: 'quiet' },
};
if (noisyVus > 0) {
  scenarios.noisy = { executor: 'constant-vus', vus: noisyVus, duration: __ENV.DURATION || '5s', exec: 'noisy' };
}
export const options = {
  scenarios,
  thresholds: { 'checks': ['rate==1'], 'grpc_req_duration{scenario:quiet}': ['p(50)>=0'] },
  summaryTrendStats: ['med', 'p(99)'],
};

const client = new grpc.Client();
let connected = false;
let n = 0;

function rename(id, key) {
  if (!connected) {
    client.connect(__ENV.TARGET, { plaintext: true, reflect: true });
    connected = true;
  }
  n += 1;
  const response = client.invoke(
    'keyward.v1.KeyManager/RenameKey',
    { key_id: id, name: `rename ${n}` },
    { metadata: { authorization: `Bearer ${key}` } },
  );
  check(response, { 'status is OK': (r) => r && r.status === grpc.StatusOK });
}

export function quiet() { rename(__ENV.QUIET_ID, __ENV.QUIET_KEY); }
export function noisy() { rename(__ENV.NOISY_ID, __ENV.NOISY_KEY); }
